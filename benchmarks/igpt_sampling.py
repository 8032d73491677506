"""iGPT sampling speed: the KV-cache decoder against the no-cache reference, in one process.

Both decoders sample a whole image (image_size**2 tokens, 1024 at 32x32) with the same model,
parameters and rng; each is compiled first (compile time reported separately), then timed. The
no-cache decoder recomputes the full forward pass for every position, so its cost grows with the
square of the sequence length; the cache decoder runs one single-token step per position.

  python benchmarks/igpt_sampling.py                      # width 128, 4 layers, 32x32, batch 1
  python benchmarks/igpt_sampling.py --width 256 --depth 6 --num_heads 8 --batch 4 \
      --no_cache_positions 32

Measured on 2 shared CPU cores (jax 0.10.2, CPU; timings vary with load): the default run takes
under a minute; the cache decoder samples 1024 tokens in 0.33-0.47 s, the no-cache one in
44-47 s, a 95-134x speed-up, with identical tokens. The second command gave 73x (extrapolated).

With `--no_cache_positions N` the no-cache decoder samples only the last N positions (the rest is
a prompt) and its full-image time is extrapolated as time * length / N; the output says so.
Never part of the test run.
"""

import argparse
import os
import statistics
import sys
import time

# Run as a script from anywhere: the repository root goes first on the import path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import igpt_jax
from igpt_jax import sampling


def random_variables(model, seed=0):
  """Parameters of the model's shapes drawn with numpy (gains near 1), far from uniform logits."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    scale = 0.02 if path[-1].key != "wtet" else 1.0
    return (scale * rng.standard_normal(leaf.shape) + (path[-1].key == "g")).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
      draw, nn.meta.unbox(igpt_jax.abstract_variables(model)))


def compile_and_time(model, variables, rng, prompt, *, use_cache, top_k, repeats):
  """-> (ids, compile seconds, list of run seconds)."""
  decoder = sampling.make_decoder(model, use_cache=use_cache, top_k=top_k)
  temperature = jnp.float32(1.0)
  start = time.perf_counter()
  compiled = decoder.lower(variables, rng, prompt, temperature).compile()
  compile_s = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    ids, _ = compiled(variables, rng, prompt, temperature)
    ids = jax.block_until_ready(ids)
    runs.append(time.perf_counter() - start)
  return np.asarray(ids), compile_s, runs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--num_heads", type=int, default=4)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_clusters", type=int, default=512)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--top_k", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cache decoder")
  parser.add_argument("--no_cache_positions", type=int, default=0,
                      help="0 = time the no-cache decoder on all positions (default); N > 0 = "
                           "only the last N positions, extrapolated")
  args = parser.parse_args()

  model = igpt_jax.create_model("custom", width=args.width, depth=args.depth,
                                num_heads=args.num_heads, image_size=args.image_size,
                                num_clusters=args.num_clusters)
  variables = random_variables(model)
  length = model.seq_len
  rng = jax.random.PRNGKey(0)
  no_prompt = jnp.zeros((args.batch, 0), jnp.int32)
  print(f"iGPT sampling, {jax.devices()[0].platform} ({jax.device_count()} devices visible, "
        f"one used), jax {jax.__version__}")
  print(f"model: width {args.width}, depth {args.depth}, heads {args.num_heads}, "
        f"{args.num_clusters} clusters, {igpt_jax.models.layers.count_params(variables):,} "
        f"parameters; {args.image_size}x{args.image_size} = {length} tokens, batch {args.batch}")

  cache_ids, cache_compile, cache_runs = compile_and_time(
      model, variables, rng, no_prompt, use_cache=True, top_k=args.top_k, repeats=args.repeats)
  cache_s = statistics.median(cache_runs)

  positions = args.no_cache_positions or length
  if not 0 < positions <= length:
    raise ValueError(f"--no_cache_positions must be in [0, {length}].")
  # The prompt is the cache decoder's own sample, so a full run of both must agree token for token.
  prompt = jnp.asarray(cache_ids[:, :length - positions])
  ref_ids, ref_compile, ref_runs = compile_and_time(
      model, variables, rng, prompt, use_cache=False, top_k=args.top_k, repeats=1)
  ref_s = ref_runs[0] * length / positions
  identical = bool(np.array_equal(ref_ids, cache_ids))

  extrapolated = positions < length
  rows = [
      ("KV cache", cache_compile, cache_s, length),
      ("no cache" + (" (extrapolated)" if extrapolated else ""), ref_compile, ref_s, length),
  ]
  print()
  print(f"{'decoder':<26}{'compile s':>10}{'sample s':>11}{'ms/token':>10}{'tokens/s':>11}")
  for name, compile_s, run_s, tokens in rows:
    print(f"{name:<26}{compile_s:>10.2f}{run_s:>11.3f}{1e3 * run_s / tokens:>10.3f}"
          f"{args.batch * tokens / run_s:>11.1f}")
  print()
  if extrapolated:
    print(f"NOTE: the no-cache decoder was timed on the last {positions} of {length} positions "
          f"({ref_runs[0]:.2f} s) and scaled by {length}/{positions}; each of its steps costs "
          "the same (a full forward pass), so the scaling is linear.")
  print(f"cache runs (s): {', '.join(f'{r:.3f}' for r in cache_runs)} (median used)")
  print(f"tokens identical to the no-cache decoder: {'yes' if identical else 'NO'}")
  print(f"speed-up of the KV cache: {ref_s / cache_s:.1f}x")


if __name__ == "__main__":
  main()
