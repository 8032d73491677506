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


def test_gpu_check_counts_a_rows_flops_on_the_cpu_as_the_row_itself():
  """On a GPU the lowered step carries no FLOP count and gpu_check lowers the same step for one
  CPU device (XLA attention): that count must be the row's own, here where both exist."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  try:
    import gpu_check  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  finally:
    sys.path.pop(0)
  from common_jax import mfu, optim, plan, sharding, train  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  tx = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-4), 100)
  for _, make_task, _ in gpu_check._rows(dry=True):  # pylint: disable=protected-access
    trainer = train.Trainer(task=make_task(), mesh=sharding.make_mesh(
        sharding.MeshConfig(data=-1)), rules=sharding.DEFAULT_RULES, tx=tx)
    own = mfu.step_flops(plan.lower_step(trainer, 8)[0])
    assert own and own > 0
    assert gpu_check._cpu_flops(make_task, 8, tx) == pytest.approx(own, rel=1e-6)  # pylint: disable=protected-access
