"""Serving exports (`run.py --mode export --format stablehlo`): the file alone is the model.

A reloaded export runs at any batch size and gives the model's own logits; the directory is
recognised as an export (so --overwrite may replace it) and is never replaced without it; what
cannot be exported this way is refused with one sentence. Nothing is trained: the workdirs hold
random parameters written through the Checkpointer.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import run
from common_jax import checkpoint
from common_jax import family as family_lib
from common_jax import serving
from configs import igpt_digits
from configs import vit_digits
from igpt_jax.family import FAMILY as IGPT
from vit_jax import models as vit_models
from vit_jax.family import FAMILY as VIT

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=2)
TOLERANCE = 1e-6  # float32, max abs difference of logits
STEP = 4


def _config(name, data_dir, **overrides):
  config = (vit_digits if name == "vit" else igpt_digits).get_config()
  config.update(dict(data_dir=str(data_dir), **overrides))
  config.model.update(TINY)
  return config


def _workdir(path, config):
  """A workdir as a training run leaves it, without the training: random parameters of the
  config's model in a checkpoint at STEP (and, for iGPT, a palette)."""
  family, run_ = run.read(config, str(path), "export")
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
      nn.meta.unbox(family.abstract_params(run_)))
  writer = checkpoint.Checkpointer(str(path), asynchronous=False)
  writer.save(STEP, {"step": np.int32(STEP), "params": params})
  writer.close()
  if family is IGPT:
    palette = rng.uniform(-1, 1, (config.palette_clusters, 3)).astype(np.float32)
    np.save(path / "palette.npy", palette)
  return family, family.model(run_), params


def _inputs(name, batch, seed):
  rng = np.random.default_rng(seed)
  if name == "vit":
    return rng.uniform(-1, 1, (batch, 8, 8, 3)).astype(np.float32)
  return rng.integers(0, 16, (batch, 64)).astype(np.int32)


def _export(config, workdir, output, overwrite=False):
  return run.dispatch(config, str(workdir), "export",
                      family_lib.ExportRequest(str(output), serving.FORMAT, overwrite))


def _one_sentence(text):
  lines = [line for line in text.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), text
  return lines[0]


@pytest.mark.parametrize("name", ["vit", "igpt"])
def test_export_gives_the_models_logits_at_any_batch_size(tmp_path, capsys, name):
  config = _config(name, tmp_path / "data")
  family, model, params = _workdir(tmp_path / "run", config)
  output = tmp_path / "serving"
  assert _export(config, tmp_path / "run", output) == 0
  assert sorted(os.listdir(output)) == [serving.MODEL_FILE, serving.SPEC_FILE]

  exported = jax.export.deserialize(bytearray((output / serving.MODEL_FILE).read_bytes()))
  reference = jax.jit(lambda x: model.apply({"params": params}, x))
  for batch in (1, 3):  # the batch dimension is symbolic: one file serves every size
    x = _inputs(name, batch, seed=batch)
    actual, expected = np.asarray(exported.call(x)), np.asarray(reference(x))
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    assert actual.shape == ((batch, 10) if name == "vit" else (batch, 64, 16))
    assert np.abs(actual - expected).max() <= TOLERANCE
    assert np.abs(expected).max() > 0.1  # random weights: logits that could differ

  spec = json.loads((output / serving.SPEC_FILE).read_text())
  (inputs,), (outputs,) = spec["inputs"], spec["outputs"]
  if name == "vit":
    assert inputs["name"] == "images" and inputs["shape"] == ["batch", 8, 8, 3]
    assert inputs["dtype"] == "float32" and "[-1, 1]" in inputs["note"]
    assert outputs["shape"] == ["batch", 10]
    assert spec["preprocess"] == config.preprocess_eval
  else:
    assert inputs["name"] == "ids" and inputs["shape"] == ["batch", 64]
    assert inputs["dtype"] == "int32" and outputs["shape"] == ["batch", 64, 16]
    np.testing.assert_array_equal(np.asarray(spec["palette"], np.float32),
                                  np.load(tmp_path / "run" / "palette.npy"))
  assert outputs["dtype"] == "float32"
  assert spec["family"] == family.name and spec["task"] == config.task
  assert spec["step"] == STEP and spec["jax_version"] == jax.__version__
  assert spec["model"]["width"] == TINY["width"]
  assert spec["file_bytes"] == (output / serving.MODEL_FILE).stat().st_size
  assert spec["parameter_bytes"] == serving.parameter_bytes(params)
  assert serving.load(str(output))[1] == spec

  # An export, of this family only: --overwrite may replace it, and only with --overwrite.
  other = IGPT if family is VIT else VIT
  assert family.is_export(str(output), serving.FORMAT)
  assert not other.is_export(str(output), serving.FORMAT)
  assert not family.is_export(str(tmp_path / "run"), serving.FORMAT)
  before = {entry: (output / entry).read_bytes() for entry in os.listdir(output)}
  capsys.readouterr()
  assert _export(config, tmp_path / "run", output) == 2
  assert "--overwrite" in _one_sentence(capsys.readouterr().err)
  assert {entry: (output / entry).read_bytes() for entry in os.listdir(output)} == before
  assert _export(config, tmp_path / "run", output, overwrite=True) == 0


def test_what_cannot_be_exported_is_refused_in_one_sentence(tmp_path, capsys):
  config = _config("vit", tmp_path / "data")
  _workdir(tmp_path / "run", config)
  # Into the workdir: exports never mix with checkpoints.
  assert _export(config, tmp_path / "run", tmp_path / "run" / "serving") == 2
  assert "outside" in _one_sentence(capsys.readouterr().err)
  # A masked-patch-prediction run has no classifier to serve.
  mpp = _config("vit", tmp_path / "data", task="vit_masked_patch")
  assert _export(mpp, tmp_path / "mpp", tmp_path / "mpp_serving") == 2
  assert "--format stablehlo exports a classifier" in _one_sentence(capsys.readouterr().err)
  # No checkpoint yet.
  assert _export(config, tmp_path / "empty", tmp_path / "empty_serving") == 2
  _one_sentence(capsys.readouterr().err)
  assert not any(os.path.exists(tmp_path / name)
                 for name in ("run/serving", "mpp_serving", "empty_serving"))


def test_models_over_two_gib_of_weights_are_refused_before_any_work():
  def abstract(variant):
    return vit_models.abstract_variables(vit_models.create_model(variant))["params"]

  serving.check_size(abstract("L/16"), "ViT L/16")  # 1.2 GB: fits
  with pytest.raises(ValueError, match=r"ViT H/14 has 2\.\d\d GiB of parameters") as error:
    serving.check_size(abstract("H/14"), "ViT H/14")  # 632M float32 parameters
  assert "\n" not in str(error.value) and str(error.value).endswith("instead.")
