r"""Engine overhead: the sharded, donated train step of `common_jax.train.Trainer` against a plain
reference step (`jax.jit(value_and_grad + optax update)`, no mesh, no logical axes) measured in
the same process on the same model and batch.

  .venv/bin/python benchmarks/vit_step.py                      # Ti/4 on 32x32, batch 64
  .venv/bin/python benchmarks/vit_step.py --variant S/16 --image_size 224 --batch 32

Prints steps/s of both and their ratio (engine / reference; 1.00 = no overhead).
"""

import argparse
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from common_jax import optim, sharding, train
from vit_jax.tasks import ClassificationTask


def _time(fn, state, batch, steps):
  state, metrics = fn(state, batch)  # compile
  jax.block_until_ready(metrics)
  began = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, batch)
  jax.block_until_ready(metrics)
  return steps / (time.perf_counter() - began)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="Ti/4")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()

  task = ClassificationTask(args.variant, num_classes=10, image_size=args.image_size)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3)
                                ).astype(np.float32),
           "label": rng.integers(0, 10, args.batch).astype(np.int32)}
  config = optim.OptimizerConfig(learning_rate=1e-3, weight_decay=0.1)
  tx = optim.make_optimizer(config, 1000)

  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
  trainer = train.Trainer(task=task, mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx)
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    global_batch = sharding.global_batch(batch, mesh)
    engine = _time(trainer.train_step, state, global_batch, args.steps)

  model = task.model
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch["image"][:1])["params"])

  @jax.jit
  def reference_step(carry, batch):
    params, opt_state = carry
    loss_fn = lambda p: task.loss_and_metrics(p, batch, jax.random.PRNGKey(0), True)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  reference = _time(reference_step, (params, tx.init(params)), batch, args.steps)
  print(f"{'step':<28}{'steps/s':>10}{'examples/s':>12}")
  print(f"{'reference (plain jit)':<28}{reference:>10.2f}{reference * args.batch:>12.0f}")
  print(f"{'engine (mesh, sharded)':<28}{engine:>10.2f}{engine * args.batch:>12.0f}")
  print(f"ratio engine / reference: {engine / reference:.2f} "
        f"({jax.device_count()} {jax.devices()[0].platform} device(s), {args.variant}, "
        f"{args.image_size}px, batch {args.batch})")


if __name__ == "__main__":
  main()
