"""The accelerator check runs where only jax, flax, optax and orbax are installed."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the GPU image lacks: importing any of these fails in the check below.
ABSENT = ("tensorflow_datasets", "tensorflow", "ml_collections", "grain", "tensorboardX",
          "array_record")


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_without_the_data_libraries():
  program = (f"import sys, runpy\nfor name in {ABSENT!r}:\n  sys.modules[name] = None\n"
             "sys.argv = ['gpu_check.py', '--dry']\n"
             "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n")
  result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, JAX_NUM_CPU_DEVICES="2"))
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith("2 x cpu") and "measured fp32 matmul rate" in lines[0]
  rows = [line for line in lines if "(dry)" in line]
  assert len(rows) == 2 and all(line.rstrip().endswith("%") for line in rows)
  assert "tokens/s" in lines[-1]
