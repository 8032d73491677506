r"""Accelerator check: MFU of ViT-B/16 and iGPT-S training and iGPT sampling speed, synthetic data.

  bash benchmarks/gpu_check.sh            # on a GPU/TPU host: a few minutes
  python benchmarks/gpu_check.py --dry    # tiny shapes, seconds, any machine (tested on CPU)

Needs only jax, flax, optax, orbax-checkpoint and numpy (no tensorflow-datasets, ml-collections
or Grain): the engine's model and step code import nothing else. Each row compiles the shared
engine's sharded train step (`common_jax.train.Trainer`, data parallel over every device), times
steady-state steps on a batch already on the devices, and divides XLA's FLOP count of the step as
lowered (before the backend's passes; on a GPU, where the lowered program carries no count, the
same step lowered for the CPU) by the time and by the devices' peak (`common_jax.mfu`).

Measured on one H200 (jax 0.11.2): ViT-B/16 bf16 at batch 256 trains 2,577-2,652 images/s,
28% MFU (106 GFLOP per image); a profile of its step puts 36% of the GPU time in XLA's
attention (f32 scores and softmax over 197x197, fused by XLA) and 36% in the dense matrix
products, which run at about 750 TFLOP/s.
"""

import argparse
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_jax import mfu  # pylint: disable=g-import-not-at-top,wrong-import-position
from common_jax import plan  # pylint: disable=g-import-not-at-top,wrong-import-position
from common_jax import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from common_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from common_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position


def _rows(dry: bool, extra: bool = False):
  """(name, task factory, global batch) of the training rows; a factory takes model options
  that override the row's. `extra` adds the variants that tell where a row's time goes
  (attention kernel, dropout, batch size)."""
  from vit_jax.tasks import ClassificationTask  # pylint: disable=g-import-not-at-top
  from igpt_jax.tasks import AutoregressiveTask  # pylint: disable=g-import-not-at-top
  on_gpu = jax.default_backend() == "gpu"
  bf16 = dict(dtype=jnp.bfloat16)
  palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
  if dry:
    return [
        ("ViT-Ti/16 32px (dry)", lambda **override: ClassificationTask(
            "Ti/16", num_classes=10, image_size=32,
            model_options=dict(bf16, depth=2, **override)), 8),
        ("iGPT custom 8x8 (dry)", lambda **override: AutoregressiveTask(
            palette, variant="custom", image_size=8,
            model_options=dict(bf16, width=64, depth=2, num_heads=2, **override)), 8),
    ]
  attention = dict(attention_implementation="cudnn") if on_gpu else {}
  vit = lambda **options: lambda **override: ClassificationTask(
      "B/16", num_classes=1000, image_size=224,
      model_options={**bf16, "representation_size": 768, **options, **override})
  igpt = lambda **options: lambda **override: AutoregressiveTask(
      palette, variant="S", image_size=32, model_options={**bf16, **options, **override})
  rows = [
      ("ViT-B/16 224px bf16, dropout 0.1", vit(dropout_rate=0.1), 256),
      ("iGPT-S 1024 tokens bf16" + (", cuDNN attention" if on_gpu else ""), igpt(**attention),
       64),
  ]
  if extra:
    rows += [  # the most telling first: a row takes a minute or more to compile on a GPU
        ("ViT-B/16 224px bf16, dropout 0.1, cuDNN attn", vit(dropout_rate=0.1, **attention), 256),
        ("iGPT-S 1024 tokens bf16, XLA attention", igpt(), 64),
        ("ViT-B/16 224px bf16, no dropout", vit(), 256),
        ("ViT-B/16 224px bf16, dropout 0.1, batch 512", vit(dropout_rate=0.1), 512),
    ]
  return rows


def _time_steps(trainer: train.Trainer, batch_size: int, steps: int,
                profile_dir: Optional[str] = None):
  """(steps/s, FLOPs per step) of `trainer.train_step` on one synthetic global batch; with
  `profile_dir`, a `jax.profiler` trace of three more steps is written there."""
  rng = np.random.default_rng(0)
  local = {key: (rng.uniform(-1, 1, (batch_size,) + value.shape[1:]).astype(value.dtype)
                 if value.dtype == np.float32 else
                 rng.integers(0, 10, (batch_size,) + value.shape[1:]).astype(value.dtype))
           for key, value in trainer.task.dummy_batch(1).items()}
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    batch = sharding.global_batch(local, trainer.mesh)
    lowered = trainer.train_step.lower(state, batch)
    compiled = lowered.compile()
    flops = mfu.step_flops(lowered)
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    began = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    rate = steps / (time.perf_counter() - began)
    if profile_dir:
      with jax.profiler.trace(profile_dir):
        for _ in range(3):
          state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
  return rate, flops


def _cpu_flops(make_task, batch_size: int, tx) -> Optional[float]:
  """XLA's FLOPs of the same training step lowered for one CPU device, with XLA's attention
  (the same arithmetic): a GPU backend may give no count for a lowered program."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices("cpu")[:1])
  trainer = train.Trainer(task=make_task(attention_implementation=None), mesh=mesh,
                          rules=sharding.DEFAULT_RULES, tx=tx)
  return mfu.step_flops(plan.lower_step(trainer, batch_size)[0])


def _sampling(dry: bool, batch: int):
  """Tokens/s of KV-cache sampling of `batch` whole images from an iGPT."""
  import igpt_jax  # pylint: disable=g-import-not-at-top
  options = dict(width=64, depth=2, num_heads=2) if dry else {}
  model = igpt_jax.create_model("custom" if dry else "S", image_size=8 if dry else 32,
                                num_clusters=512, dtype=jnp.bfloat16, **options)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0),
                                  jnp.zeros((1, model.seq_len), jnp.int32))
  sample = lambda key: igpt_jax.sample(model, variables, key, num_samples=batch)
  jax.block_until_ready(sample(jax.random.PRNGKey(0)))  # compile
  began = time.perf_counter()
  jax.block_until_ready(sample(jax.random.PRNGKey(1)))
  return batch * model.seq_len / (time.perf_counter() - began)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry", action="store_true", help="tiny shapes, a few steps")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
  parser.add_argument("--only", default="", help="the training rows whose name holds this")
  parser.add_argument("--profile", default=None,
                      help="write a jax.profiler trace of the first row's steps to this folder")
  parser.add_argument("--sampling", default="8", help="sampling batch sizes, comma separated")
  parser.add_argument("--extra", action="store_true",
                      help="also the variant rows (attention kernel, dropout, batch size)")
  args = parser.parse_args()
  steps = args.steps or (2 if args.dry else 20)
  peak, source = mfu.device_peak()
  devices = jax.device_count()
  import flax  # pylint: disable=g-import-not-at-top
  print(f"{devices} x {jax.devices()[0].device_kind} ({jax.default_backend()}); peak: {source}; "
        f"jax {jax.__version__}, flax {flax.__version__}")
  print(f"{'workload':<44}{'batch':>6}{'steps/s':>10}{'examples/s':>12}{'TFLOP/s':>10}"
        f"{'MFU':>8}")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
  tx = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-4, weight_decay=0.1), 1000)
  rows = [row for row in _rows(args.dry, args.extra) if args.only in row[0]]
  for index, (name, make_task, batch_size) in enumerate(rows):
    try:
      trainer = train.Trainer(task=make_task(), mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx)
      rate, flops = _time_steps(trainer, batch_size, steps, args.profile if index == 0 else None)
    except Exception as error:  # pylint: disable=broad-except
      if not args.extra:
        raise
      print(f"{name:<44}{batch_size:>6}  failed: {type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}", flush=True)
      continue
    if not flops and jax.default_backend() != "cpu":
      try:
        flops = _cpu_flops(make_task, batch_size, tx)
      except Exception as error:  # pylint: disable=broad-except
        print(f"  (no FLOP count for {name}: {type(error).__name__}: "
              f"{str(error).splitlines()[0][:160]})", flush=True)
    achieved = (flops or 0.0) * rate
    utilisation = mfu.utilisation(flops, rate, devices, peak) if flops else float("nan")
    print(f"{name:<44}{batch_size:>6}{rate:>10.2f}{rate * batch_size:>12.0f}"
          f"{achieved / 1e12:>10.2f}{utilisation:>8.1%}", flush=True)
  for batch in [int(b) for b in args.sampling.split(",") if b]:
    print(f"iGPT sampling (KV cache), batch {batch}: {_sampling(args.dry, batch):,.0f} tokens/s",
          flush=True)


if __name__ == "__main__":
  main()
