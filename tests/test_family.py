"""The family protocol: run.py dispatches tasks and modes it does not name; checks come first."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import run
from common_jax import checkpoint
from common_jax.task import Task
from configs import igpt_digits
from configs import vit_digits
from igpt_jax import models as igpt_models
from vit_jax.family import FAMILY as VIT


class _PixelLinear(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, images, train=False):
    del train
    return nn.Dense(self.num_classes)(images.reshape(images.shape[0], -1))


class PixelLinearTask(Task):
  """A linear classifier on the raw pixels: the smallest task the shared loop can train."""

  headline_metric = "accuracy"

  def __init__(self, num_classes: int, image_size: int):
    self.num_classes, self.image_size = num_classes, image_size
    self.model = _PixelLinear(num_classes)

  def dummy_batch(self, batch_size):
    return {"image": np.zeros((batch_size, self.image_size, self.image_size, 3), np.float32),
            "label": np.zeros((batch_size,), np.int32)}

  def loss_and_metrics(self, params, batch, rng, train):
    logits = self.model.apply({"params": params}, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  def eval_sums(self, params, batch):
    logits = self.model.apply({"params": params}, batch["image"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"accuracy": jnp.sum(correct * batch["mask"]), "count": jnp.sum(batch["mask"])}


def _vit_config(data_dir, **overrides):
  config = vit_digits.get_config()
  config.update(dict(data_dir=str(data_dir), total_steps=40, log_every=20, eval_every=0,
                     checkpoint_every=0), **overrides)
  config.optimizer.warmup_steps = 0
  return config


def test_a_task_and_a_mode_added_to_a_family_run_through_the_dispatch(tmp_path, monkeypatch,
                                                                      capsys):
  monkeypatch.setitem(VIT.tasks, "pixel_linear",
                      lambda run_: PixelLinearTask(run_.num_classes, run_.image_size))
  config = _vit_config(tmp_path / "data", task="pixel_linear")
  workdir = tmp_path / "workdir"
  assert run.dispatch(config, str(workdir)) == 0
  result = json.load(open(workdir / "result.json"))
  assert result["step"] == 40 and result["accuracy"] > 0.5  # chance is 0.1
  assert json.load(open(workdir / "config.json"))["task"] == "pixel_linear"

  assert run.dispatch(config, str(workdir), "plan") == 0
  assert "plan OK: _PixelLinear with 1,930 parameters" in capsys.readouterr().out  # 192*10+10
  assert run.dispatch(config, str(workdir), "eval") == 0
  assert f"eval of step 40: accuracy {result['accuracy']:.4f}" in capsys.readouterr().out

  seen = []
  monkeypatch.setitem(VIT.modes, "note", lambda run_: seen.append(run_.task) or 0)
  assert run.dispatch(config, str(workdir), "note") == 0 and seen == ["pixel_linear"]
  monkeypatch.delitem(VIT.modes, "note")
  assert run.dispatch(config, str(workdir), "note") == 2
  assert capsys.readouterr().err.strip() == (
      "error: --mode note is not a mode of ViT tasks such as 'pixel_linear'; use one of train, "
      "eval, plan, sweep, export, fewshot, attention, predict.")


def _igpt_config(data_dir, **overrides):
  config = igpt_digits.get_config()
  config.update(dict(data_dir=str(data_dir)), **overrides)
  config.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
  return config


def _pretraining_workdir(path, width):
  """A workdir as an iGPT pre-training run leaves it: a palette and a checkpoint of the state."""
  model = igpt_models.create_model("custom", image_size=8, num_clusters=16, width=width, depth=2,
                                   num_heads=2, mlp_dim=64)
  params = nn.meta.unbox(igpt_models.abstract_variables(model))["params"]
  params = jax.tree_util.tree_map(lambda x: np.ones(x.shape, x.dtype), params)
  writer = checkpoint.Checkpointer(str(path), asynchronous=False)
  writer.save(10, {"step": np.int32(10), "params": params,
                   "opt_state": jax.tree_util.tree_map(np.zeros_like, params)})
  writer.close()
  np.save(path / "palette.npy", np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(
      np.float32))
  return params


def test_igpt_init_from_a_workdir_of_another_size_fails_before_compute(tmp_path):
  _pretraining_workdir(tmp_path / "pretrained", width=48)
  config = _igpt_config(tmp_path / "data", task="igpt_finetune_ar",
                        init_from=str(tmp_path / "pretrained"))
  workdir = tmp_path / "finetune"
  with pytest.raises(ValueError) as error:
    run.prepare(config, str(workdir))
  message = str(error.value)
  assert str(tmp_path / "pretrained") in message and "shape" in message
  assert message.endswith("use the same model options as the pre-training run.")
  assert message.count(". ") == 0  # one sentence
  assert not workdir.exists()


def test_igpt_init_from_of_the_same_size_loads_every_pretrained_parameter(tmp_path):
  pretrained = _pretraining_workdir(tmp_path / "pretrained", width=32)
  config = _igpt_config(tmp_path / "data", task="igpt_finetune_ar",
                        init_from=str(tmp_path / "pretrained"))
  family, prepared = run.prepare(config, str(tmp_path / "finetune"))
  fresh = nn.meta.unbox(family.abstract_params(prepared))
  fresh = jax.tree_util.tree_map(lambda x: np.full(x.shape, 7, x.dtype), fresh)
  loaded = prepared.initial_params(fresh)
  assert set(loaded) == set(pretrained) | {"clf"}
  np.testing.assert_array_equal(loaded["clf"], fresh["clf"])  # the new head stays as it was
  for key in pretrained:
    for got, want in zip(jax.tree_util.tree_leaves(loaded[key]),
                         jax.tree_util.tree_leaves(pretrained[key])):
      np.testing.assert_array_equal(got, want)
