r"""What "nothing trained is ever lost" costs per step, measured in one process.

  .venv/bin/python benchmarks/resilience_overhead.py                   # Ti/4 on 32x32, batch 64
  .venv/bin/python benchmarks/resilience_overhead.py --variant S/16 --image_size 224 --batch 32

1. The train step of `common_jax.train.Trainer` with its non-finite guard (the loss and gradient
   norm judged on the device; "skip" also masks the update with jnp.where) against the same step
   without the guard (the step as it was before), same model, batch and mesh, the three timed
   in alternation (the fastest of --repeats rounds: on a shared machine the fastest round is the
   one least disturbed).
2. The work the loop adds: `Checkpointer.poll` after every step (a failed save noticed at once);
   with several processes, JAX's preemption sync point after every step (the agreed stop),
   measured here in a one-process jax.distributed run, the same C++ call a multi-process run
   makes (--no_distributed skips it); and at every log or checkpoint step one pass over the
   parameters (`Trainer.params_finite`), shown per call and spread over --log_every steps.

Prints a table and ratios guarded / unguarded (1.00 = no overhead).
"""

import argparse
import socket
import tempfile
import time

import jax
import numpy as np
import optax

from common_jax import checkpoint, optim, sharding, train
from vit_jax.tasks import ClassificationTask


class UnguardedTrainer(train.Trainer):
  """The step before the guard: gradients, update, metrics; no flag, no masking."""

  def _train_step(self, state, batch):
    loss, metrics, grads = self._gradients(state, batch)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _steps_per_second(trainer, state, batch, steps):
  began = time.perf_counter()
  for _ in range(steps):
    state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  return state, steps / (time.perf_counter() - began)


def _per_call_us(fn, calls=200_000):
  began = time.perf_counter()
  for i in range(calls):
    fn(i)
  return (time.perf_counter() - began) / calls * 1e6


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="Ti/4")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_distributed", action="store_true")
  parser.add_argument("--log_every", type=int, default=50)
  args = parser.parse_args()

  if not args.no_distributed:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)

  task = ClassificationTask(args.variant, num_classes=10, image_size=args.image_size)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3)
                                ).astype(np.float32),
           "label": rng.integers(0, 10, args.batch).astype(np.int32)}
  tx = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3, weight_decay=0.1), 1000)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
  trainers = {
      "unguarded (before)": UnguardedTrainer(task=task, mesh=mesh, rules=sharding.DEFAULT_RULES,
                                             tx=tx),
      "guard, on_nonfinite=stop": train.Trainer(task=task, mesh=mesh,
                                                rules=sharding.DEFAULT_RULES, tx=tx),
      "guard, on_nonfinite=skip": train.Trainer(task=task, mesh=mesh,
                                                rules=sharding.DEFAULT_RULES, tx=tx,
                                                on_nonfinite="skip"),
  }
  rates = {name: [] for name in trainers}
  with jax.set_mesh(mesh):
    global_batch = sharding.global_batch(batch, mesh)
    states = {}
    for name, trainer in trainers.items():
      with trainer.context():
        states[name] = trainer.init(jax.random.PRNGKey(0))
        states[name], _ = _steps_per_second(trainer, states[name], global_batch, 2)  # compile
    for _ in range(args.repeats):
      for name, trainer in trainers.items():
        with trainer.context():
          states[name], rate = _steps_per_second(trainer, states[name], global_batch, args.steps)
        rates[name].append(rate)

  base = max(rates["unguarded (before)"])
  print(f"{'train step':<30}{'steps/s':>10}{'ms/step':>10}{'ratio':>8}")
  for name in trainers:
    rate = max(rates[name])
    print(f"{name:<30}{rate:>10.2f}{1e3 / rate:>10.2f}{base / rate:>8.3f}")
  print(f"(fastest of {args.repeats} alternating rounds of {args.steps} steps; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {args.variant}, "
        f"{args.image_size}px, batch {args.batch}; ratio = time per step / unguarded)")

  step_us = 1e6 / base
  guarded = trainers["guard, on_nonfinite=stop"]
  with guarded.context():
    params = states["guard, on_nonfinite=stop"].params
    jax.device_get(guarded.params_finite(params))  # compile
    check_us = _per_call_us(lambda _: jax.device_get(guarded.params_finite(params)), 200)
  with tempfile.TemporaryDirectory() as workdir:
    checkpointer = checkpoint.Checkpointer(workdir, asynchronous=True)
    checkpointer.save(1, {"w": np.zeros((256, 256), np.float32)})
    poll_us = _per_call_us(lambda _: checkpointer.poll(), 20_000)
    checkpointer.close()
  print(f"\n{'work the loop adds':<46}{'us/call':>10}{'per step':>11}")
  print(f"{'Checkpointer.poll, every step':<46}{poll_us:>10.2f}{poll_us / step_us:>10.4%}")
  print(f"{f'params_finite, every {args.log_every} steps (log)':<46}{check_us:>10.1f}"
        f"{check_us / args.log_every / step_us:>10.4%}")
  if not args.no_distributed:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    sync_us = _per_call_us(multihost_utils.reached_preemption_sync_point)
    print(f"{'JAX preemption sync point, every step':<46}{sync_us:>10.2f}"
          f"{sync_us / step_us:>10.4%}")


if __name__ == "__main__":
  main()
