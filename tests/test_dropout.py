"""Dropout (`common_jax.layers.Dropout`): the rate and the expectation it promises, masks that look
independent, identity in evaluation, deterministic given the key, and the same masks however the
train step is sharded or interrupted."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import igpt_jax
import vit_jax
from common_jax import layers
from common_jax import optim
from common_jax import sharding
from common_jax import train
from vit_jax.tasks import ClassificationTask

# Bounds in standard deviations of the estimate: a fair coin exceeds 7 sigma with probability
# ~1e-12, so these tests cannot flake (and with fixed keys they are deterministic anyway).
SIGMAS = 7.0


def _mask(key, shape, rate):
  keep, keep_prob = jax.jit(layers.dropout_keep_mask, static_argnums=(1, 2))(key, shape, rate)
  return np.asarray(keep), keep_prob


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.9, 0.999])
def test_the_actual_rate_is_within_two_percent_of_the_requested_one(rate):
  bits, threshold = layers.keep_threshold(rate)
  assert bits in (8, 16, 32)
  drop = 1.0 - threshold / 2**bits
  assert abs(drop - rate) <= 0.02 * rate
  if rate in (0.05, 0.1, 0.2, 0.3, 0.5):  # the rates recipes use cost 8 bits per element
    assert bits == 8
  assert layers.keep_threshold(0.1) == (8, 230)


@pytest.mark.parametrize("rate, shape", [
    (0.1, (16, 197, 384)),
    (0.5, (8, 65, 1536)),
    (0.01, (4, 1023, 301)),  # 16 bits per element; the last axis is not a multiple of the pack
    (0.3, (1000, 1001)),
])
def test_elements_are_kept_with_the_keep_probability(rate, shape):
  keep, keep_prob = _mask(jax.random.PRNGKey(0), shape, rate)
  assert keep.shape == shape and keep.dtype == bool
  n = keep.size
  sigma = np.sqrt(keep_prob * (1 - keep_prob) / n)
  assert abs(keep.mean() - keep_prob) < SIGMAS * sigma
  # Every byte lane of the packed words, and every position along each axis, keeps at that rate.
  for lane in range(4):
    column = keep[..., lane::4]
    assert abs(column.mean() - keep_prob) < SIGMAS * np.sqrt(
        keep_prob * (1 - keep_prob) / column.size)
  for axis in range(keep.ndim):
    rates = keep.mean(axis=tuple(a for a in range(keep.ndim) if a != axis))
    per = n // keep.shape[axis]
    assert np.all(np.abs(rates - keep_prob) < SIGMAS * np.sqrt(keep_prob * (1 - keep_prob) / per))


def _correlation_bound(n):
  return SIGMAS / np.sqrt(n)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_masks_look_independent_across_elements_and_keys(rate):
  shape = (32, 197, 384)
  keep, _ = _mask(jax.random.PRNGKey(1), shape, rate)
  other, _ = _mask(jax.random.PRNGKey(2), shape, rate)
  folded, _ = _mask(jax.random.fold_in(jax.random.PRNGKey(1), 1), shape, rate)
  k = keep.astype(np.float64)

  def corr(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return np.corrcoef(a, b)[0, 1], a.size

  pairs = {
      "neighbour in a word": (k[..., 0::4], k[..., 1::4]),
      "across words": (k[..., 3:-1:4], k[..., 4::4]),
      "next row": (k[:, :-1], k[:, 1:]),
      "next example": (k[:-1], k[1:]),
      "another key": (keep, other),
      "a folded key": (keep, folded),
  }
  for name, (a, b) in pairs.items():
    c, n = corr(a, b)
    assert abs(c) < _correlation_bound(n), (name, c)
  assert not np.array_equal(keep, other)


def test_every_byte_of_the_mask_words_is_uniform():
  hashed_words = layers._hashed_words  # pylint: disable=protected-access
  words = np.asarray(jax.jit(hashed_words, static_argnums=1)(jax.random.PRNGKey(0), (1024, 1024)))
  words = words.ravel()
  for byte in range(4):
    counts = np.bincount((words >> (8 * byte)) & 255, minlength=256)
    expected = words.size / 256
    chi2 = ((counts - expected)**2 / expected).sum()
    assert chi2 < 255 + SIGMAS * np.sqrt(2 * 255), (byte, chi2)  # chi-square, 255 dof


def test_dropout_keeps_the_expectation_and_zeroes_the_rest():
  x = jax.random.normal(jax.random.PRNGKey(0), (4096,)) + 2.0
  keys = jax.random.split(jax.random.PRNGKey(3), 2000)
  outs = np.asarray(jax.jit(jax.vmap(lambda k: layers.dropout(x, 0.1, k)))(keys))
  _, keep_prob = _mask(keys[0], x.shape, 0.1)
  x = np.asarray(x)
  kept = outs != 0
  np.testing.assert_allclose(outs[kept], np.broadcast_to(x / keep_prob, outs.shape)[kept],
                             rtol=1e-6)
  # Mean over 2000 keys per element against x: std |x| sqrt((1-p)/p) / sqrt(2000).
  sigma = np.abs(x) * np.sqrt((1 - keep_prob) / keep_prob / len(keys))
  assert np.all(np.abs(outs.mean(0) - x) < SIGMAS * sigma)
  # And over all elements and keys together, the relative error of the sum is tiny.
  assert abs(outs.mean() / x.mean() - 1) < SIGMAS * np.sqrt(
      (1 - keep_prob) / keep_prob / outs.size) * np.sqrt((x**2).mean()) / x.mean()


def test_bfloat16_stays_bfloat16_and_keeps_the_scale():
  x = jnp.ones((64, 128), jnp.bfloat16)
  y = layers.dropout(x, 0.1, jax.random.PRNGKey(0))
  assert y.dtype == jnp.bfloat16
  _, keep_prob = _mask(jax.random.PRNGKey(0), x.shape, 0.1)
  values = set(np.unique(np.asarray(y, np.float32)).tolist())
  assert values == {0.0, float(jnp.asarray(1 / keep_prob, jnp.bfloat16))}


def test_evaluation_is_the_identity_and_training_is_deterministic():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  module = layers.Dropout(rate=0.1)
  assert module.apply({}, x, deterministic=True) is x  # no rng needed
  assert layers.Dropout(rate=0.0).apply({}, x, deterministic=False,
                                        rngs={"dropout": jax.random.PRNGKey(1)}) is x
  a = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  b = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  c = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match="must lie in"):
    layers.keep_threshold(1.0)


def test_two_calls_of_one_module_draw_different_masks():
  """iGPT's Block calls one Dropout twice (attention and MLP branches)."""

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      drop = layers.Dropout(0.5)
      return drop(x, deterministic=False), drop(x, deterministic=False)

  a, b = Twice().apply({}, jnp.ones((8, 64)), rngs={"dropout": jax.random.PRNGKey(0)})
  assert not np.array_equal(a, b)


def test_words_from_threefry_beyond_the_hash_range(monkeypatch):
  """A mask of 2**32 words or more takes its words from threefry; same rate, same guarantees."""
  monkeypatch.setattr(layers, "_MAX_HASHED_WORDS", 1000)
  keep, keep_prob = _mask(jax.random.PRNGKey(0), (256, 1024), 0.1)
  assert abs(keep.mean() - keep_prob) < SIGMAS * np.sqrt(keep_prob * (1 - keep_prob) / keep.size)


@pytest.mark.parametrize("family", ["vit", "igpt"])
def test_models_drop_only_in_training(family):
  if family == "vit":
    model = vit_jax.create_model("custom", num_classes=0, image_size=8, width=16, depth=2,
                                 mlp_dim=32, num_heads=2, patch_size=2, dropout_rate=0.1)
    inputs = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
  else:
    model = igpt_jax.create_model("custom", image_size=4, num_clusters=16, width=16, depth=2,
                                  num_heads=2, dropout_rate=0.1)
    inputs = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 16)
  # Random parameters: both models start with a zero head.
  shapes = nn.meta.unbox(model.init(jax.random.PRNGKey(1), inputs))
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
  variables = jax.tree_util.tree_unflatten(
      tree, [0.1 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)])
  evaluation = model.apply(variables, inputs)
  np.testing.assert_array_equal(
      evaluation, model.apply(variables, inputs, rngs={"dropout": jax.random.PRNGKey(2)}))
  one = model.apply(variables, inputs, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  again = model.apply(variables, inputs, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  other = model.apply(variables, inputs, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(one, again)
  assert not np.allclose(one, evaluation) and not np.allclose(one, other)


# Sharded and interrupted train steps with dropout draw the masks of the single-device, unbroken
# run.

TASK = ClassificationTask("custom", num_classes=10, image_size=8, model_options=dict(
    width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=2, dropout_rate=0.1))


def _batch(step, size=16):
  rng = np.random.default_rng(step)
  return {"image": rng.uniform(-1, 1, (size, 8, 8, 3)).astype(np.float32),
          "label": rng.integers(0, 10, size).astype(np.int32)}


def _trainer(mesh_config, devices, task=TASK):
  mesh = sharding.make_mesh(mesh_config, devices)
  # SGD for the comparison (see tests/test_sharding.py: Adam magnifies float noise).
  tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=0.1), 10)
  return train.Trainer(task=task, mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx), mesh


def _steps(trainer, mesh, state, first, last):
  losses = []
  with trainer.context():
    for step in range(first, last):
      state, metrics = trainer.train_step(state, sharding.global_batch(_batch(step), mesh))
      losses.append(float(metrics["loss"]))
  return state, losses


def _run(mesh_config, devices, steps=2, task=TASK):
  trainer, mesh = _trainer(mesh_config, devices, task)
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
  state, losses = _steps(trainer, mesh, state, 0, steps)
  return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def reference():
  return _run(sharding.MeshConfig(data=1), jax.devices()[:1])


def test_dropout_is_on_in_the_train_step(reference):
  no_dropout = ClassificationTask("custom", num_classes=10, image_size=8, model_options=dict(
      TASK.model_options, dropout_rate=0.0))
  losses, _ = _run(sharding.MeshConfig(data=1), jax.devices()[:1], task=no_dropout)
  assert not np.allclose(losses, reference[0], rtol=1e-4)


@pytest.mark.parametrize("mesh_config", [
    sharding.MeshConfig(data=-1),
    sharding.MeshConfig(data=1, fsdp=-1),
    sharding.MeshConfig(data=2, fsdp=2, tensor=2),
], ids=["data", "fsdp", "data_x_fsdp_x_tensor"])
def test_sharded_step_with_dropout_equals_single_device(reference, mesh_config):
  ref_losses, ref_params = reference
  losses, params = _run(mesh_config, jax.devices())
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         params, ref_params)


def test_sharded_masks_are_the_single_device_masks():
  """The masks themselves, bit for bit, on a batch- and a feature-sharded activation."""
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  x = jnp.ones((16, 9, 64), jnp.float32)
  key = jax.random.PRNGKey(5)
  single = np.asarray(jax.jit(layers.dropout, static_argnums=1)(x, 0.1, key))
  for spec in (jax.P("data"), jax.P(None, None, "tensor"), jax.P("data", None, "tensor")):
    shard = jax.sharding.NamedSharding(mesh, spec)
    sharded = jax.jit(layers.dropout, static_argnums=1, out_shardings=shard)(
        jax.device_put(x, shard), 0.1, key)
    np.testing.assert_array_equal(np.asarray(sharded), single, err_msg=str(spec))


def test_an_interrupted_run_draws_the_masks_of_an_unbroken_one():
  """The step's key is fold_in(state.rng, state.step): a state saved to the host and put back
  (what a checkpoint does) continues with exactly the unbroken run's dropout masks."""
  devices = jax.devices()[:2]
  trainer, mesh = _trainer(sharding.MeshConfig(data=-1), devices)
  with trainer.context():
    start = trainer.init(jax.random.PRNGKey(0))
  unbroken, unbroken_losses = _steps(trainer, mesh, start, 0, 3)

  trainer, mesh = _trainer(sharding.MeshConfig(data=-1), devices)
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
  state, first_losses = _steps(trainer, mesh, state, 0, 1)
  saved = jax.device_get(state)
  resumed_trainer, mesh = _trainer(sharding.MeshConfig(data=-1), devices)
  state = jax.device_put(saved, resumed_trainer.state_shardings)
  state, rest_losses = _steps(resumed_trainer, mesh, state, 1, 3)
  assert first_losses + rest_losses == unbroken_losses
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params),
                         jax.device_get(unbroken.params))
