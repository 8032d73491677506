r"""Does the train loop ever wait for data? The loop's step rate with real data (the default job:
pipeline, batches sent to the devices ahead of their step, logging) against the same jitted step
run back to back on one batch already on the devices, in the same process.

  .venv/bin/python benchmarks/loop_overhead.py                   # the default job, 300 steps
  .venv/bin/python benchmarks/loop_overhead.py --steps 600 --rounds 3

Each round runs the bare step `--steps` times, then `common_jax.train.train_and_evaluate` for
`--steps` steps on the default job's data in a fresh workdir (no evaluation, one checkpoint at
the end, a log line every `--steps // 4` steps); the loop's rate is that of its progress
reports after the first (compilation excluded), read from its metrics.jsonl; then the loop again
on one host batch repeated (everything but the pipeline's work: the transfers, the checks and
the logging). Ratio loop / bare = 1.00: the step never waits on the host. Medians over rounds.

On a CPU the pipeline's threads and the step share the same cores, so the pipeline's CPU time
comes out of the step's: the gap between the two loops is what the pipeline costs there. On an
accelerator host the step runs on the devices, and the loop on one batch repeated shows what
the loop itself costs.
"""

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_jax import optim, sharding, train  # pylint: disable=g-import-not-at-top
from configs import vit_digits  # pylint: disable=g-import-not-at-top
import run  # pylint: disable=g-import-not-at-top


def bare_rate(trainer, state, batch, steps):
  state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  began = time.perf_counter()
  for _ in range(steps):
    state, metrics = trainer.train_step(state, batch)
  jax.block_until_ready(metrics)
  return steps / (time.perf_counter() - began), state


def loop_rate(plan, task, steps, workdir, train_data):
  loop = dataclasses.replace(plan.loop, total_steps=steps, log_every=steps // 4, eval_every=0,
                             checkpoint_every=0)
  train.train_and_evaluate(task, loop=loop, optimizer=plan.optimizer, mesh_config=plan.mesh,
                           workdir=workdir, train_data=train_data, rules=plan.rules,
                           tensorboard=False)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rates = [json.loads(line).get("steps_per_sec") for line in f]
  rates = [rate for rate in rates if rate][1:]  # the first report follows the compiled step
  return statistics.median(rates)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  config = vit_digits.get_config()
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, args.steps)
  with tempfile.TemporaryDirectory() as root:
    family, plan = run.prepare(config, os.path.join(root, "plan"), "plan")
    task = family.make_task(plan)
    mesh = sharding.make_mesh(plan.mesh)
    tx = optim.make_optimizer(plan.optimizer, args.steps)
    trainer = train.Trainer(task=task, mesh=mesh, rules=plan.rules, tx=tx)
    batch = next(plan.train_data(0))
    with trainer.context():
      state = trainer.init(jax.random.PRNGKey(0))
      device_batch = sharding.global_batch(batch, mesh)
    repeated = lambda start_step: itertools.repeat(batch)
    bare, looped, looped_repeated = [], [], []
    for round_ in range(args.rounds):
      with trainer.context():
        rate, state = bare_rate(trainer, state, device_batch, args.steps)
      bare.append(rate)
      looped.append(loop_rate(plan, task, args.steps, os.path.join(root, f"loop{round_}"),
                              plan.train_data))
      looped_repeated.append(loop_rate(plan, task, args.steps,
                                       os.path.join(root, f"repeated{round_}"), repeated))
      print(f"round {round_}: bare {bare[-1]:.1f} steps/s, loop {looped[-1]:.1f} steps/s, "
            f"loop on one batch {looped_repeated[-1]:.1f} steps/s", flush=True)
  bare = statistics.median(bare)
  rows = (("bare step, one batch on device", bare),
          ("loop with the default job data", statistics.median(looped)),
          ("loop on one host batch repeated", statistics.median(looped_repeated)))
  print(f"\n{'':<34}{'steps/s':>9}{'/ bare':>8}")
  for name, rate in rows:
    print(f"{name:<34}{rate:>9.1f}{rate / bare:>8.3f}")
  print(f"({jax.device_count()} {jax.devices()[0].platform} device(s), batch "
        f"{config.batch_size}, {config.preprocess_train}; load average "
        f"{os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
  main()
