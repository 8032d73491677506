r"""What dropout costs in a ViT train step: our model (`common_jax.layers.Dropout`) against a
straightforward Flax ViT with `nn.Dropout`, written here the way a user would, on the same shapes,
timed in interleaved rounds in one process (medians), against this machine's matmul rate.

  .venv/bin/python benchmarks/vit_dropout.py                 # ViT-S/16, 224px, batch 8, fp32
  .venv/bin/python benchmarks/vit_dropout.py --candidates    # + our model with the rejected masks

Every step is jit(value_and_grad + optax.adam update) with the dropout key an argument that changes
every step (a constant key lets XLA precompute the masks). Rows:
  ours (Trainer)      common_jax.train.Trainer's train step on a one-device mesh (the engine's step)
  ours (plain jit)    the same model, plain jit (no mesh, no logical axes)
  ours, no dropout    dropout_rate=0: what the rest of the step costs
  plain Flax ViT      nn.Conv patches, class token, nn.MultiHeadDotProductAttention, nn.Dense,
                      nn.LayerNorm, nn.Dropout (a float32 uniform per element from threefry)
With --candidates, our model again with the masks `common_jax.layers.Dropout` rejected:
nn.Dropout's, threefry 8 bits per element, rbg 8 bits per element.

Columns: ms per step (median over rounds, and the spread), XLA's FLOPs of the lowered step,
the fraction of the float32 matmul rate measured in the same rounds
(`common_jax.mfu.measured_matmul_rate`), dropout's cost over the no-dropout step, speed relative
to the plain Flax step, and the same on CPU seconds per step. Timings on a shared CPU move:
compare rows of one run only.
"""

import argparse
import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common_jax import layers, mfu, sharding, train
import vit_jax
from vit_jax.tasks import ClassificationTask

# ---------------------------------------------------------------------------------------------
# The plain Flax ViT a user would write (same shapes as ours: pre-LN blocks, class token).


class PlainBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, train):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y, deterministic=True)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = nn.LayerNorm()(x)
    y = nn.gelu(nn.Dense(self.mlp_dim)(y))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    y = nn.Dense(x.shape[-1])(y)
    return x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class PlainViT(nn.Module):
  num_classes: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float

  @nn.compact
  def __call__(self, images, train=False):
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                padding="VALID")(images)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for _ in range(self.depth):
      x = PlainBlock(self.num_heads, self.mlp_dim, self.dropout_rate)(x, train)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.num_classes)(x[:, 0])


# ---------------------------------------------------------------------------------------------
# The masks `common_jax.layers.Dropout` rejected, for --candidates (same interface).


class _BitsDropout(nn.Module):
  """8 bits per element from `impl`'s jax.random.bits, compared with round(keep * 256)."""
  rate: float
  impl: str = "threefry2x32"

  @nn.compact
  def __call__(self, x, *, deterministic):
    if deterministic or not self.rate:
      return x
    key = self.make_rng("dropout")
    if self.impl != "threefry2x32":  # an rbg key drawn from the threefry one: still resumable
      key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=self.impl)
    bits = jax.random.bits(key, x.shape[:-1] + (x.shape[-1] // 4,), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(bits, jnp.uint8).reshape(x.shape)
    threshold = round((1 - self.rate) * 256)
    return jnp.where(bits < threshold, x * (256 / threshold), 0).astype(x.dtype)


CANDIDATES = {
    "ours, nn.Dropout masks": nn.Dropout,
    "ours, threefry 8 bit": functools.partial(_BitsDropout, impl="threefry2x32"),
    "ours, rbg 8 bit": functools.partial(_BitsDropout, impl="rbg"),
}

# ---------------------------------------------------------------------------------------------


def _plain_step(model, tx, images, labels, dropout_class=None):
  """(lowered step, run(index) -> loss): run holds the parameters and optimiser state; the
  step is jit(value_and_grad + update) of (params, opt_state, images, labels, index)."""
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])["params"])

  def step(params, opt_state, images, labels, index):
    key = jax.random.fold_in(jax.random.PRNGKey(1), index)

    def loss_fn(p):
      logits = model.apply({"params": p}, images, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  original = layers.Dropout
  if dropout_class is not None:  # swapped in while the step is traced
    layers.Dropout = dropout_class
  try:
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, opt_state, images, labels, jnp.int32(0))
    compiled = lowered.compile()
  finally:
    layers.Dropout = original
  state = [params, opt_state]

  def run(index):
    state[0], state[1], loss = compiled(state[0], state[1], images, labels, jnp.int32(index))
    return loss

  return lowered, run


def _trainer_step(variant, image_size, rate, tx, images, labels):
  task = ClassificationTask(variant, num_classes=1000, image_size=image_size,
                            model_options=dict(dropout_rate=rate))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
  trainer = train.Trainer(task=task, mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx)
  batch = sharding.global_batch({"image": np.asarray(images), "label": np.asarray(labels)}, mesh)
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    lowered = trainer.train_step.lower(state, batch)
    compiled = lowered.compile()
  holder = [state]

  def run(index):  # the Trainer folds state.step into the key: a new key every step
    del index
    holder[0], metrics = compiled(holder[0], batch)
    return metrics["loss"]

  return lowered, run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="S/16")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--steps", type=int, default=1, help="steps per row per round")
  parser.add_argument("--candidates", action="store_true")
  args = parser.parse_args()

  load_before = os.getloadavg()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3)),
                       jnp.float32)
  labels = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
  tx = optax.adam(1e-3)
  ours = lambda rate: vit_jax.create_model(args.variant, num_classes=1000,
                                          image_size=args.image_size, dropout_rate=rate)
  shape = vit_jax.models.parse_variant(args.variant)
  plain = PlainViT(num_classes=1000, patch_size=shape["patch_size"], width=shape["width"],
                   depth=shape["depth"], mlp_dim=shape["mlp_dim"], num_heads=shape["num_heads"],
                   dropout_rate=args.dropout)

  rows = {
      "ours (Trainer)": lambda: _trainer_step(args.variant, args.image_size, args.dropout, tx,
                                              images, labels),
      "ours (plain jit)": lambda: _plain_step(ours(args.dropout), tx, images, labels),
      "ours, no dropout": lambda: _plain_step(ours(0.0), tx, images, labels),
      "plain Flax ViT": lambda: _plain_step(plain, tx, images, labels),
  }
  if args.candidates:
    for name, dropout_class in CANDIDATES.items():
      rows[name] = functools.partial(_plain_step, ours(args.dropout), tx, images, labels,
                                     dropout_class)
  steps, flops = {}, {}
  for name, build in rows.items():
    lowered, steps[name] = build()
    flops[name] = mfu.step_flops(lowered)
    jax.block_until_ready(steps[name](0))  # warm up

  times = {name: [] for name in rows}
  cpu_times = {name: [] for name in rows}  # CPU seconds of all threads: less moved by other jobs
  rates = []
  index = 1
  for _ in range(args.rounds):
    rates.append(mfu.measured_matmul_rate.__wrapped__())  # the cached one is measured once
    for name, run in steps.items():
      began, began_cpu = time.perf_counter(), time.process_time()
      for _ in range(args.steps):
        loss = run(index)
        index += 1
      jax.block_until_ready(loss)
      times[name].append((time.perf_counter() - began) / args.steps)
      cpu_times[name].append((time.process_time() - began_cpu) / args.steps)
  rate = float(np.median(rates))

  median = {name: float(np.median(t)) for name, t in times.items()}
  cpu = {name: float(np.median(t)) for name, t in cpu_times.items()}
  print(f"ViT-{args.variant} {args.image_size}px batch {args.batch} float32 train step "
        f"(value_and_grad + adam), dropout {args.dropout}; {jax.devices()[0].device_kind}, "
        f"{args.rounds} interleaved rounds x {args.steps} steps, medians")
  print(f"matmul rate (float32 1024^3, best of 10, median over rounds): {rate / 1e9:.1f} GFLOP/s "
        f"(rounds: {', '.join(f'{r / 1e9:.0f}' for r in rates)})")
  header = (f"{'step':<26}{'ms/step':>9}{'spread':>15}{'GFLOP':>8}{'of matmul':>11}"
            f"{'dropout ms':>12}{'vs Flax':>9}{'CPU s':>8}{'vs Flax':>9}")
  print(header)
  print("-" * len(header))
  for name in rows:
    spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
    fraction = flops[name] / median[name] / rate if flops[name] else float("nan")
    dropout_ms = (median[name] - median["ours, no dropout"]) * 1e3
    print(f"{name:<26}{median[name] * 1e3:>9.0f}{spread:>15}{flops[name] / 1e9:>8.1f}"
          f"{fraction:>11.2f}{dropout_ms:>12.0f}{median['plain Flax ViT'] / median[name]:>8.2f}x"
          f"{cpu[name]:>8.2f}{cpu['plain Flax ViT'] / cpu[name]:>8.2f}x")
  print("CPU s: CPU seconds per step, all threads (median); its 'vs Flax' is the same ratio on "
        "CPU time, which other jobs on the machine move less than wall time.")
  print(f"ours (Trainer) / plain Flax ViT speed: "
        f"{median['plain Flax ViT'] / median['ours (Trainer)']:.2f}x; ours (plain jit) / plain "
        f"Flax ViT: {median['plain Flax ViT'] / median['ours (plain jit)']:.2f}x")
  load_after = os.getloadavg()
  print(f"load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
  main()
