"""Sharded training equals single-device training: data parallel, FSDP, data x FSDP, tensor."""

import jax
import numpy as np
import pytest

from common_jax import optim
from common_jax import sharding
from common_jax import train
from vit_jax.tasks import ClassificationTask

TASK = ClassificationTask("custom", num_classes=10, image_size=8, model_options=dict(
    width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=2))


def _batch(step, size=16):
  rng = np.random.default_rng(step)
  return {"image": rng.uniform(-1, 1, (size, 8, 8, 3)).astype(np.float32),
          "label": rng.integers(0, 10, size).astype(np.int32)}


def _run(mesh_config, devices, steps=2, accum_steps=1):
  mesh = sharding.make_mesh(mesh_config, devices)
  # SGD: Adam divides by sqrt(v), which turns float noise in near-zero gradients into whole
  # learning-rate-sized steps, so it would compare summation order rather than sharding.
  tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=0.1), 10)
  trainer = train.Trainer(task=TASK, mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx,
                          accum_steps=accum_steps)
  losses = []
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    for step in range(steps):
      state, metrics = trainer.train_step(state, sharding.global_batch(_batch(step), mesh))
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def reference():
  return _run(sharding.MeshConfig(data=1), jax.devices()[:1])


@pytest.mark.parametrize("mesh_config", [
    sharding.MeshConfig(data=-1),  # pure data parallel
    sharding.MeshConfig(data=1, fsdp=-1),  # FSDP
    sharding.MeshConfig(data=2, fsdp=-1),  # data x FSDP
    sharding.MeshConfig(data=2, fsdp=2, tensor=2),  # and tensor parallel
], ids=["data", "fsdp", "data_x_fsdp", "data_x_fsdp_x_tensor"])
def test_sharded_step_equals_single_device(reference, mesh_config):
  ref_losses, ref_params, _ = reference
  losses, params, state = _run(mesh_config, jax.devices())
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         params, ref_params)


def test_fsdp_really_shards_parameters():
  _, _, state = _run(sharding.MeshConfig(data=1, fsdp=-1), jax.devices(), steps=1)
  kernel = state.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp"
  # Each device holds 1/8 of the kernel, and so does the optimiser state's first moment.
  assert kernel.addressable_shards[0].data.shape == (32 // 8, 64)


def test_gradient_accumulation_equals_the_full_batch(reference):
  ref_losses, ref_params, _ = reference
  losses, params, _ = _run(sharding.MeshConfig(data=1), jax.devices()[:1], accum_steps=2)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         params, ref_params)


def test_mesh_errors_name_the_field():
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh(sharding.MeshConfig(data=3, fsdp=1))
  with pytest.raises(ValueError, match="more than one axis"):
    sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=-1))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
  with pytest.raises(ValueError, match="config.batch_size=12 is not divisible by the 8"):
    sharding.check_batch_size(12, mesh)


def test_parameters_and_activations_have_names_and_rules_of_their_own(monkeypatch):
  """A rule written for parameters can never re-shard activations by accident, and back."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import igpt_jax  # pylint: disable=g-import-not-at-top
  from common_jax import layers  # pylint: disable=g-import-not-at-top
  from vit_jax import models as vit_models  # pylint: disable=g-import-not-at-top
  activation_names = set()
  constrain = layers.constrain

  def recording(x, names):
    activation_names.update(names)
    return constrain(x, names)

  monkeypatch.setattr(layers, "constrain", recording)
  vit = vit_models.create_model("custom", num_classes=10, image_size=8, width=32, depth=1,
                                mlp_dim=64, num_heads=4, patch_size=4)
  igpt = igpt_jax.create_model("custom", image_size=4, num_clusters=16, width=32, depth=1,
                               num_heads=4)
  parameter_names = set()
  for model in (vit, igpt):
    variables = (vit_models.abstract_variables if model is vit else igpt_jax.abstract_variables)(
        model)
    for spec in jax.tree_util.tree_leaves(nn.get_partition_spec(variables),
                                          is_leaf=lambda x: isinstance(x, jax.P)):
      parameter_names.update(name for name in spec if name)
  assert activation_names and parameter_names
  assert all(name.startswith("act_") for name in activation_names), activation_names
  assert not any(name.startswith("act_") for name in parameter_names), parameter_names
  ruled = {name for name, _ in sharding.DEFAULT_RULES}
  assert activation_names | parameter_names <= ruled  # every name has its rule
