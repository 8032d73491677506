"""Masked patch prediction: the corruption's proportions, the mean-colour targets, the task, and
fine-tuning from its workdir."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run
from configs import vit_digits_mpp
from vit_jax import mpp


def test_half_the_patches_are_corrupted_80_10_10():
  how, source = mpp.corruption(jax.random.PRNGKey(0), 512, 196, mask_prob=0.5)
  how, source = np.asarray(how), np.asarray(source)
  n = how.size
  selected = how != mpp.NOT_SELECTED
  # Binomial standard errors: 0.5 of 100,352 patches, then 0.8/0.1/0.1 of ~50,000.
  assert abs(selected.mean() - 0.5) < 5 * np.sqrt(0.25 / n)
  m = selected.sum()
  for value, share in ((mpp.MASKED, 0.8), (mpp.REPLACED, 0.1), (mpp.KEPT, 0.1)):
    assert abs((how == value).sum() / m - share) < 5 * np.sqrt(share * (1 - share) / m)
  # Another patch of the same image, never the patch itself, any of the others.
  assert (source != np.arange(196)[None]).all() and source.min() == 0 and source.max() == 195


def test_targets_are_the_3_bit_mean_colour_of_each_patch():
  images = np.full((1, 4, 4, 3), -1.0, np.float32)
  images[0, :2, 2:] = [1.0, -1.0, -1.0]  # top-right patch red: r level 7
  images[0, 2:, :2] = 0.0  # bottom-left mid grey: level 4 in each channel
  targets = np.asarray(mpp.mean_colour_targets(jnp.asarray(images), patch_size=2))
  assert targets.tolist() == [[0, 7 * 64, 4 * 64 + 4 * 8 + 4, 0]]


def test_corrupted_embeddings_change_and_only_the_selected_patches_count():
  task = mpp.MaskedPatchTask(variant="custom", image_size=8, model_options=dict(
      width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=2))
  batch = {"image": np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32),
           "mask": np.array([1, 1, 1, 0], np.float32)}
  params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(
      task.init_variables(jax.random.PRNGKey(0), batch)["params"]))
  assert params["mask_token"].shape == (1, 1, 16)
  assert params["mpp_head"]["kernel"].shape == (16, 512) and "head" not in params
  loss, metrics = task.loss_and_metrics(params, batch, jax.random.PRNGKey(1), True)
  assert np.isclose(float(loss), np.log(512), rtol=1e-5)  # a zero head: uniform over 512
  assert 0.2 < float(metrics["masked_fraction"]) < 0.8
  sums = task.eval_sums(params, batch)
  how, _ = mpp.corruption(jax.random.split(jax.random.PRNGKey(0))[0], 4, 16)
  assert float(sums["count"]) == float((np.asarray(how)[:3] != 0).sum())


@pytest.mark.slow
def test_pretrain_then_finetune_through_run_py(tmp_path):
  tiny = dict(total_steps=8, log_every=4, data_dir=str(tmp_path / "data"))

  def config(stage, **extra):
    c = vit_digits_mpp.get_config(stage)
    c.update(dict(tiny, **extra))
    c.optimizer.warmup_steps = 0
    c.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
    return c

  pretrain, finetune = tmp_path / "mpp", tmp_path / "ft"
  assert run.dispatch(config("pretrain"), str(pretrain)) == 0
  assert json.load(open(pretrain / "config.json"))["task"] == "vit_masked_patch"
  assert run.dispatch(config("finetune", init_from=str(pretrain)), str(finetune)) == 0
  result = json.load(open(finetune / "result.json"))
  assert result["step"] == 8 and 0 <= result["accuracy"] <= 1
  assert os.listdir(pretrain / "checkpoints") == ["8"]
