"""Reading a workdir: parameters only, never the optimiser state."""

import os
import subprocess
import sys

import numpy as np

from common_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT_STATE_MB = 192

# Prints how much the process's resident memory grew by reading the checkpoint (the result
# held), in MB.
_READER = """
import sys
from common_jax import checkpoint
import orbax.checkpoint as ocp

def resident_mb():
  with open("/proc/self/status") as status:
    return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

reader = checkpoint.Checkpointer(sys.argv[1], read_only=True)
reader.params_metadata()  # opens the checkpoint once: its fixed cost is not the read's
before = resident_mb()
if sys.argv[2] == "params":
  tree = reader.read_params()
else:  # the whole train state, as a resume restores it
  with ocp.StandardCheckpointer() as full:
    tree = full.restore(sys.argv[1] + "/checkpoints/1/default")
print(resident_mb() - before)
"""


def _peak_growth_mb(workdir, what):
  result = subprocess.run([sys.executable, "-c", _READER, str(workdir), what], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr
  return float(result.stdout.strip().splitlines()[-1])


def test_read_params_brings_no_optimiser_state_into_memory(tmp_path):
  params = {"dense": {"kernel": np.full((256, 256), 0.5, np.float32)}}  # 0.25 MB
  moments = np.ones((OPT_STATE_MB * 2**20 // 8,), np.float32)  # two of them: OPT_STATE_MB
  writer = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)
  writer.save(1, {"params": params, "opt_state": {"mu": moments, "nu": moments + 1}})
  writer.close()

  reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  read = reader.read_params()
  assert set(read) == {"dense"}
  np.testing.assert_array_equal(read["dense"]["kernel"], params["dense"]["kernel"])
  step, shapes = reader.params_metadata()
  assert step == 1 and shapes["dense"]["kernel"].shape == (256, 256)

  # The full restore is the control: it must show the optimiser state, or the measure is blind.
  assert _peak_growth_mb(tmp_path, "all") > 0.9 * OPT_STATE_MB
  assert _peak_growth_mb(tmp_path, "params") < 0.25 * OPT_STATE_MB


def test_read_params_names_the_missing_step(tmp_path):
  writer = checkpoint.Checkpointer(str(tmp_path), asynchronous=False)
  writer.save(3, {"params": {"w": np.zeros(2, np.float32)}})
  writer.close()
  reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  try:
    reader.read_params(7)
  except ValueError as error:
    assert str(error) == (f"{tmp_path}/checkpoints holds no checkpoint at step 7; train first or "
                          "point config.init_from / --workdir at a run that saved one (steps: "
                          "[3]).")
  else:
    raise AssertionError("read_params(7) should have failed")
