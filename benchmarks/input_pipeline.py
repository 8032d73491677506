r"""Input pipeline throughput against the train step that consumes it, in the same process.

  .venv/bin/python benchmarks/input_pipeline.py              # the default job's pipeline and model

The default job's pipeline (Grain over `tfds.data_source` of the bundled digits, random crop,
batch 128) is timed alone, then the default job's jitted train step alone on a fixed batch.
The ratio pipeline / step > 1 means the pipeline is not what limits training; it also times
a resumed iterator's first batch (resuming at a step costs no replay of earlier batches).
"""

import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_jax import data, optim, sharding, train  # pylint: disable=g-import-not-at-top
from configs import vit_digits  # pylint: disable=g-import-not-at-top
import run  # pylint: disable=g-import-not-at-top


def _rate(iterator, count):
  next(iterator)  # start-up (opening the source, starting threads)
  began = time.perf_counter()
  for _ in range(count):
    batch = next(iterator)
  return count / (time.perf_counter() - began), batch


def main():
  config = vit_digits.get_config()
  family, plan = run.prepare(config, "/tmp/input_pipeline_benchmark", "plan")
  args = dict(dataset=config.dataset, split=config.train_split,
              preprocess=config.preprocess_train, global_batch_size=config.batch_size,
              seed=config.seed)
  pipeline, batch = _rate(data.train_iterator(**args), 200)
  began = time.perf_counter()
  resumed = next(data.train_iterator(start_step=100_000, **args))
  resume_seconds = time.perf_counter() - began

  task = family.make_task(plan)
  mesh = sharding.make_mesh(plan.mesh)
  tx = optim.make_optimizer(plan.optimizer, plan.loop.total_steps)
  trainer = train.Trainer(task=task, mesh=mesh, rules=plan.rules, tx=tx)
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    global_batch = sharding.global_batch(batch, mesh)
    state, metrics = trainer.train_step(state, global_batch)
    jax.block_until_ready(metrics)
    began = time.perf_counter()
    for _ in range(50):
      state, metrics = trainer.train_step(state, global_batch)
    jax.block_until_ready(metrics)
    step = 50 / (time.perf_counter() - began)
  print(f"pipeline: {pipeline:8.1f} batches/s of {config.batch_size} ({config.preprocess_train})")
  print(f"step:     {step:8.1f} steps/s ({jax.device_count()} {jax.devices()[0].platform} "
        "device(s), the default job's model)")
  print(f"ratio pipeline / step: {pipeline / step:.1f}; first batch of an iterator resumed at "
        f"step 100,000: {resume_seconds:.2f} s ({np.asarray(resumed['image']).shape})")


if __name__ == "__main__":
  main()
