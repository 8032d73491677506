"""notebooks/quickstart.ipynb: stored without outputs, and runs end to end at CI scale.

Run it alone with `.venv/bin/python -m pytest -q tests/test_notebook.py`; the kernel is this
interpreter (a kernel spec written for the test), so it sees this virtual environment.
"""

import json
import os
import sys

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
KERNEL = "vit-igpt-jax-test"  # a name of our own: no user's or system's `python3` spec shadows it


def test_the_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code, "the notebook has no code cell"
  for index, cell in enumerate(code):
    assert cell.outputs == [] and cell.execution_count is None, (
        f"code cell {index} was stored with outputs or an execution count; clear all outputs "
        "and save before committing.")


@pytest.mark.slow
def test_the_notebook_runs_end_to_end_at_ci_scale(tmp_path, monkeypatch):
  spec = tmp_path / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "vit-igpt-jax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # The kernel inherits the environment: CI scale, outputs under tmp_path, and one CPU device as
  # on a laptop or Colab. (conftest's 8 simulated devices test the sharded paths elsewhere; here
  # they only add time, and their collectives abort the process when a thread is starved for
  # 40 s on a loaded 2-core machine, which a run of this notebook at real scale met once.)
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  monkeypatch.setenv("QUICKSTART_SCALE", "ci")
  work = tmp_path / "work"
  monkeypatch.setenv("QUICKSTART_DIR", str(work))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      notebook, kernel_name=KERNEL, timeout=600,
      resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error

  outputs = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.outputs]
  assert not [output for output in outputs if output.output_type == "error"]
  pictures = [output for output in outputs if "image/png" in output.get("data", {})]
  # Predictions, attention distance and rollout, palette, completions.
  assert len(pictures) >= 5, f"{len(pictures)} pictures shown"
  for name in ("vit_digits/attention_rollout.png", "vit_digits.safetensors",
               "igpt_digits/completions.png", "igpt_digits/probe.json"):
    assert (work / name).exists(), name
  text = "".join(output.get("text", "") for output in outputs)
  assert "timm: max |logit difference|" in text or "timm is not installed" in text
