r"""What each model switch buys: the engine's train step (`common_jax.train.Trainer`, Adam) of
ViT-S/16 at 224px and of an iGPT of width 256 and depth 4 over 1024 tokens (32x32), with
`scan_layers`, `remat_policy`, bfloat16 activations (`dtype`) and a bfloat16 first moment
(`config.optimizer.moment_dtype`), against the default, in the same process.

  .venv/bin/python benchmarks/model_switches.py                     # both models, batch 8
  .venv/bin/python benchmarks/model_switches.py --model igpt --steps 5 --only remat

Per row: compile seconds, the median step seconds (rows timed in turn, one step each, so that
other work on the machine slows them alike), the step's temporary buffers (XLA's
`memory_analysis().temp_size_in_bytes`: activations kept for the backward pass and scratch) and
its arguments (parameters, optimiser state and batch), each with its ratio to the default row
(< 1.00 = less time or memory), and the loss of the last step: equal where only remat or the
moment dtype differ; scan_layers rows start from other initial values (per-block rngs are split
differently), bfloat16 rows round. Numbers are for the devices JAX sees (one CPU device unless
told otherwise).
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_jax import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from common_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from common_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

BF16 = jnp.bfloat16
# (row, model options, optimizer options); the first row is the baseline.
ROWS = (
    ("default", {}, {}),
    ("scan_layers", dict(scan_layers=True), {}),
    ("remat dots_saveable", dict(remat_policy="dots_saveable"), {}),
    ("remat full", dict(remat_policy="full"), {}),
    ("scan + remat full", dict(scan_layers=True, remat_policy="full"), {}),
    ("dtype bfloat16", dict(dtype=BF16), {}),
    ("moment_dtype bfloat16", {}, dict(moment_dtype="bfloat16")),
    ("scan + dots + bf16 + bf16 mu", dict(scan_layers=True, remat_policy="dots_saveable",
                                          dtype=BF16), dict(moment_dtype="bfloat16")),
)


def _task(model: str, options: dict):
  if model == "vit":
    from vit_jax.tasks import ClassificationTask  # pylint: disable=g-import-not-at-top
    return ClassificationTask("S/16", num_classes=1000, image_size=224, model_options=options)
  from igpt_jax.tasks import AutoregressiveTask  # pylint: disable=g-import-not-at-top
  palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
  return AutoregressiveTask(palette, variant="custom", image_size=32, model_options=dict(
      width=256, depth=4, num_heads=8, **options))


def _batch(model: str, size: int):
  rng = np.random.default_rng(0)
  image_size = 224 if model == "vit" else 32
  batch = {"image": rng.uniform(-1, 1, (size, image_size, image_size, 3)).astype(np.float32)}
  if model == "vit":
    batch["label"] = rng.integers(0, 1000, size).astype(np.int32)
  return batch


class Row:
  """One switch setting: its compiled train step and its state, ready to be timed."""

  def __init__(self, model: str, options: dict, optimizer: dict, batch_size: int):
    tx = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-4, **optimizer), 1000)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    self.trainer = train.Trainer(task=_task(model, options), mesh=mesh,
                                 rules=sharding.DEFAULT_RULES, tx=tx)
    with self.trainer.context():
      self.state = self.trainer.init(jax.random.PRNGKey(0))
      self.batch = sharding.global_batch(_batch(model, batch_size), mesh)
      began = time.perf_counter()
      self.step = self.trainer.train_step.lower(self.state, self.batch).compile()
      self.compile_seconds = time.perf_counter() - began
    self.memory = self.step.memory_analysis()
    self.times = []
    self.run()  # warm-up, untimed
    self.times = []

  def run(self) -> None:
    began = time.perf_counter()
    with self.trainer.context():
      self.state, metrics = self.step(self.state, self.batch)
      self.loss = float(metrics["loss"])  # waits for the step
    self.times.append(time.perf_counter() - began)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", choices=("vit", "igpt", "both"), default="both")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3, help="timed steps per row (median)")
  parser.add_argument("--only", default="", help="run only rows whose name contains this "
                      "(the default row always runs)")
  args = parser.parse_args()
  rows = [row for i, row in enumerate(ROWS) if i == 0 or args.only in row[0]]
  models = ("vit", "igpt") if args.model == "both" else (args.model,)
  names = {"vit": "ViT-S/16, 224px", "igpt": "iGPT width 256, depth 4, 1024 tokens"}
  device = f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
  mib = 2.0**20
  for model in models:
    built = [(name, Row(model, options, optimizer, args.batch))
             for name, options, optimizer in rows]
    # Round robin: a machine shared with other work slows every row alike, not one of them.
    for _ in range(args.steps):
      for _, row in built:
        row.run()
    print(f"\n{names[model]}, batch {args.batch}, Adam, {device}; median of {args.steps} "
          "steps; ratios against 'default'")
    print(f"{'switch':<30}{'compile s':>10}{'step s':>9}{'ratio':>7}{'temp MiB':>10}"
          f"{'ratio':>7}{'args MiB':>10}{'ratio':>7}{'loss':>9}")
    base = built[0][1]
    base_step = statistics.median(base.times)
    for name, row in built:
      step = statistics.median(row.times)
      temp, arguments = row.memory.temp_size_in_bytes, row.memory.argument_size_in_bytes
      print(f"{name:<30}{row.compile_seconds:>10.1f}{step:>9.3f}{step / base_step:>7.2f}"
            f"{temp / mib:>10.1f}{temp / base.memory.temp_size_in_bytes:>7.2f}"
            f"{arguments / mib:>10.1f}{arguments / base.memory.argument_size_in_bytes:>7.2f}"
            f"{row.loss:>9.4f}", flush=True)
    del built


if __name__ == "__main__":
  main()
