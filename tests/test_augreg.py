"""AugReg's regularisers as switches: stochastic depth, sigmoid cross-entropy, mixup."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from vit_jax import encoder
from vit_jax import models
from vit_jax import tasks

SHAPE = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=2)


def test_stochastic_depth_drops_whole_branches_of_whole_examples():
  block = encoder.Encoder1DBlock(mlp_dim=32, num_heads=2, drop_path=0.99)
  x = np.random.default_rng(0).normal(size=(64, 5, 16)).astype(np.float32)
  params = block.init(jax.random.PRNGKey(0), x, deterministic=True)
  kept = block.apply(params, x, deterministic=True)
  assert np.abs(np.asarray(kept) - x).max() > 1e-3  # evaluation: every branch counts
  dropped = np.asarray(block.apply(params, x, deterministic=False,
                                   rngs={"dropout": jax.random.PRNGKey(1)}))
  same = [np.array_equal(dropped[i], x[i]) for i in range(64)]
  assert sum(same) >= 55  # both branches of nearly every example skipped: the input itself


def test_stochastic_depth_rises_from_zero_at_the_first_block():
  model = models.create_model("custom", num_classes=3, image_size=8, stoch_depth=0.99, **SHAPE)
  x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), x)
  _, state = model.apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)},
                         mutable=["intermediates"])
  # Block 0 has rate 0: its attention ran on every example (weights sown for all 32).
  assert jax.tree_util.tree_leaves(state["intermediates"])[0].shape[0] == 32
  with pytest.raises(ValueError, match="set scan_layers=False"):
    models.create_model("custom", num_classes=3, image_size=8, stoch_depth=0.1,
                        scan_layers=True, **SHAPE)


def _task(**options):
  return tasks.ClassificationTask(variant="custom", num_classes=4, image_size=8,
                                  model_options=dict(SHAPE), **options)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
          "label": rng.integers(0, 4, 8).astype(np.int32),
          "mask": np.ones(8, np.float32)}


def _params(task):
  rng = np.random.default_rng(3)
  return jax.tree_util.tree_map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                                nn.meta.unbox(task.init_variables(jax.random.PRNGKey(0),
                                                                  _batch())["params"]))


def test_sigmoid_loss_is_the_sum_of_binary_cross_entropies():
  task = _task(loss="sigmoid")
  params, batch = _params(task), _batch()
  loss, _ = task.loss_and_metrics(params, batch, jax.random.PRNGKey(0), False)
  logits = task.model.apply({"params": params}, batch["image"])
  expected = optax.sigmoid_binary_cross_entropy(
      logits, jax.nn.one_hot(batch["label"], 4)).sum(-1).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  with pytest.raises(ValueError, match="config.loss='hinge' is unknown"):
    _task(loss="hinge")


def test_mixup_mixes_images_and_targets_with_the_larger_share_first():
  task, plain = _task(mixup=0.5), _task()
  params, batch = _params(task), _batch()
  rng = jax.random.PRNGKey(5)
  mixed, _ = task.loss_and_metrics(params, batch, rng, True)
  again, _ = task.loss_and_metrics(params, batch, rng, True)
  unmixed, _ = plain.loss_and_metrics(params, batch, rng, True)
  assert float(mixed) == float(again) and abs(float(mixed) - float(unmixed)) > 1e-4
  # The same loss by hand: the share drawn the way the task draws it.
  _, mix_rng = jax.random.split(rng)
  share = float(jax.random.beta(mix_rng, 0.5, 0.5))
  share = max(share, 1 - share)
  images = share * batch["image"] + (1 - share) * np.roll(batch["image"], 1, axis=0)
  targets = jax.nn.one_hot(batch["label"], 4)
  targets = share * targets + (1 - share) * np.roll(targets, 1, axis=0)
  logits = task.model.apply({"params": params}, images)
  np.testing.assert_allclose(mixed, optax.softmax_cross_entropy(logits, targets).mean(),
                             rtol=1e-5)
  # Evaluation never mixes.
  evaluated = task.eval_sums(params, batch)["loss"]
  assert float(evaluated) == float(plain.eval_sums(params, batch)["loss"])
