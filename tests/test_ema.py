"""Polyak (EMA) weights: averaged in the optimiser state, sharded like the parameters, used by
the loop's evaluations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import run
from common_jax import optim
from common_jax import sharding
from common_jax import train
from configs import vit_digits
from vit_jax.tasks import ClassificationTask


def test_the_average_follows_the_parameters_the_updates_make():
  tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=0.1, momentum=0.0,
                                                  grad_clip_norm=None, ema_decay=0.5), 10)
  params = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(params)
  expected = np.array([1.0, 2.0])
  for grad in ([1.0, 0.0], [0.0, 2.0], [1.0, 1.0]):
    updates, state = tx.update({"w": jnp.array(grad)}, state, params)
    params = optax.apply_updates(params, updates)
    expected = 0.5 * expected + 0.5 * np.asarray(params["w"])
    np.testing.assert_allclose(optim.polyak_params(state)["w"], expected, rtol=1e-6)
  off = optim.make_optimizer(optim.OptimizerConfig(), 10).init(params)
  assert optim.polyak_params(off) is None
  with pytest.raises(ValueError, match="ema_decay=1.0 must lie in"):
    optim.make_optimizer(optim.OptimizerConfig(ema_decay=1.0), 10)


def test_the_average_is_sharded_like_the_parameters():
  task = ClassificationTask(variant="custom", num_classes=10, image_size=8, model_options=dict(
      width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=2))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1))
  tx = optim.make_optimizer(optim.OptimizerConfig(ema_decay=0.9), 10)
  trainer = train.Trainer(task=task, mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx)
  ema_shardings = optim.polyak_params(trainer.state_shardings.opt_state)
  assert jax.tree_util.tree_leaves(ema_shardings) == jax.tree_util.tree_leaves(
      trainer.state_shardings.params)


@pytest.mark.slow
def test_the_loop_evaluates_the_average(tmp_path):
  config = vit_digits.get_config()
  config.update(total_steps=6, log_every=3, eval_every=3, data_dir=str(tmp_path / "data"))
  config.optimizer.update(warmup_steps=0, ema_decay=0.5)
  config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  output = tmp_path / "out.txt"
  import contextlib  # pylint: disable=g-import-not-at-top
  with open(output, "w") as f, contextlib.redirect_stdout(f):
    assert run.dispatch(config, str(tmp_path / "w")) == 0
  assert "eval (moving average) at step 6" in output.read_text()
