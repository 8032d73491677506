"""Pixel-by-pixel sampling from an autoregressive iGPT, with a KV cache, and sample grids.

`sample` is the decoder to use: one jitted program that prefills the cache for the prompt in one
forward pass, then runs one compiled single-token step (`ImageGPT.decode_step`) per remaining
position inside `lax.fori_loop`. Each step attends over the whole cache it is given (positions
not yet filled are masked), so the cache grows in CACHE_SEGMENTS segments: positions [0, L/4)
run with a cache of L/4 positions, [L/4, L/2) with L/2, and so on (L = image_size**2), one
fori_loop per segment, shapes fixed within each. Steps then read 5/8 of the full cache on
average instead of all of it, which is what a step costs at large batch (the cache is
2 * depth * batch * L * width floats). Nothing runs on the host between steps.

`sample_without_cache` is the reference: it recomputes the full forward pass for every position.
Both draw token t with `jax.random.categorical(fold_in(rng, t), filtered_logits)`, so for the same
rng they produce the same tokens (up to float rounding on exact ties), which the tests check.

"No prompt" is prompt_len = 0 (`prompt=None` with `num_samples`), never a sentinel id: every id,
0 included, is a colour.
"""

import functools
import math
from typing import Any, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import models
from igpt_jax import palette as palette_lib

ArrayLike = Union[np.ndarray, jax.Array]


# The cache grows in this many steps (see the module docstring). Measured on CPU at width 256,
# depth 4, 1024 positions: 4 segments sample 1.2-1.5x faster than a full-size cache at batch 8
# and 32; each segment compiles the step once more. Measured again at batch 8 (2 shared cores,
# load 10-12, medians of 3 interleaved runs): 8 segments sampled 1.10x and 16 segments 1.16x
# faster than 4, but compiled in 52 s and 86 s instead of 27 s, so 4 it stays.
CACHE_SEGMENTS = 4


def kth_largest(values: jax.Array, k: int) -> jax.Array:
  """The k-th largest of values [..., n] float32 along the last axis, as [..., 1]; exactly
  `jax.lax.top_k(values, k)[0][..., -1:]`, without its sort.

  Builds the answer bit by bit in an order-preserving integer code of float32 (32 count-and-
  compare passes over [..., n]). On CPU top_k sorts every row, calling a comparator per
  comparison: at batch 32 and 512 clusters the top-40 filter took 2.6 ms per decode step that
  way and 0.6 ms this way (2 shared cores).
  """
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)
  # Sign-magnitude -> two's complement order, then offset to unsigned: a < b iff code(a) < code(b).
  order = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
  codes = jax.lax.bitcast_convert_type(order, jnp.uint32) ^ jnp.uint32(0x80000000)
  answer = jnp.zeros((*values.shape[:-1], 1), jnp.uint32)
  for bit in reversed(range(32)):
    candidate = answer | jnp.uint32(1 << bit)
    # The largest code with at least k values >= it is the k-th largest value's code.
    enough = jnp.sum(codes >= candidate, axis=-1, keepdims=True) >= k
    answer = jnp.where(enough, candidate, answer)
  order = jax.lax.bitcast_convert_type(answer ^ jnp.uint32(0x80000000), jnp.int32)
  bits = jnp.where(order < 0, order ^ jnp.int32(0x7FFFFFFF), order)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: Optional[int]) -> jax.Array:
  """logits [..., vocab] / temperature, with all but the top_k largest set to -inf."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    logits = jnp.where(logits < kth_largest(logits, top_k), -jnp.inf, logits)
  return logits


def _draw(rng: jax.Array, index: jax.Array, logits: jax.Array, temperature: jax.Array,
          top_k: Optional[int]) -> jax.Array:
  """Token for position `index`: [batch, vocab] logits -> [batch] int32."""
  key = jax.random.fold_in(rng, index)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_k)).astype(jnp.int32)


def segment_ends(prompt_len: int, length: int, segments: int = CACHE_SEGMENTS) -> List[int]:
  """Cache sizes of the segments that hold positions to sample: the multiples of length /
  segments (rounded up) above prompt_len, length last; empty when nothing is left to sample."""
  ends = sorted({-(-length * i // segments) for i in range(1, segments + 1)})
  return [end for end in ends if end > prompt_len]


def _grow(cache: Any, positions: int) -> Any:
  """Pads every [rows, filled, head_dim] array of the cache to [rows, positions, head_dim]."""
  return jax.tree_util.tree_map(
      lambda x: jnp.pad(x, ((0, 0), (0, positions - x.shape[1]), (0, 0))), cache)


def _decode_with_cache(model: models.ImageGPT, top_k: Optional[int], return_logits: bool,
                       variables: Any, rng: jax.Array, prompt: jax.Array,
                       temperature: jax.Array):
  batch, prompt_len = prompt.shape
  length = model.seq_len
  ids = jnp.zeros((batch, length), jnp.int32).at[:, :prompt_len].set(prompt.astype(jnp.int32))
  logits_buffer = jnp.zeros((batch, length if return_logits else 0, model.num_clusters),
                            jnp.float32)
  ends = segment_ends(prompt_len, length)
  if not ends:
    return ids, logits_buffer

  def step(index, carry):
    ids, cache, logits_buffer = carry
    previous = jax.lax.dynamic_index_in_dim(ids, jnp.maximum(index - 1, 0), axis=1,
                                            keepdims=False)
    logits, cache = model.apply(variables, previous, index, cache,
                                method=models.ImageGPT.decode_step)
    token = _draw(rng, index, logits, temperature, top_k)
    ids = jax.lax.dynamic_update_slice(ids, token[:, None], (0, index))
    if return_logits:
      logits_buffer = jax.lax.dynamic_update_slice(logits_buffer, logits[:, None], (0, index, 0))
    return ids, cache, logits_buffer

  cache = model.apply(variables, prompt, ends[0], method=models.ImageGPT.prefill)
  start = prompt_len
  for end in ends:
    # Positions [start, end) with a cache of `end` positions: one compiled step per segment.
    ids, cache, logits_buffer = jax.lax.fori_loop(start, end, step,
                                                  (ids, _grow(cache, end), logits_buffer))
    start = end
  return ids, logits_buffer


def _decode_without_cache(model: models.ImageGPT, top_k: Optional[int], return_logits: bool,
                          variables: Any, rng: jax.Array, prompt: jax.Array,
                          temperature: jax.Array):
  batch, prompt_len = prompt.shape
  length = model.seq_len
  ids = jnp.zeros((batch, length), jnp.int32).at[:, :prompt_len].set(prompt.astype(jnp.int32))
  logits_buffer = jnp.zeros((batch, length if return_logits else 0, model.num_clusters),
                            jnp.float32)

  def step(index, carry):
    ids, logits_buffer = carry
    # The whole sequence every time; the causal mask keeps positions >= index (not yet sampled)
    # from influencing position index.
    all_logits = model.apply(variables, ids)
    logits = jax.lax.dynamic_index_in_dim(all_logits, index, axis=1, keepdims=False)
    token = _draw(rng, index, logits, temperature, top_k)
    ids = jax.lax.dynamic_update_slice(ids, token[:, None], (0, index))
    if return_logits:
      logits_buffer = jax.lax.dynamic_update_slice(logits_buffer, logits[:, None], (0, index, 0))
    return ids, logits_buffer

  return jax.lax.fori_loop(prompt_len, length, step, (ids, logits_buffer))


@functools.lru_cache(maxsize=32)
def make_decoder(model: models.ImageGPT, *, use_cache: bool = True, top_k: Optional[int] = None,
                 return_logits: bool = False):
  """The jitted decoder `fn(variables, rng, prompt, temperature) -> (ids, logits)`.

  prompt: [batch, prompt_len] int32 (prompt_len may be 0); temperature: float32 scalar.
  ids: [batch, image_size**2] int32; logits: [batch, image_size**2, num_clusters] float32 raw
  model logits of every sampled position (zeros at prompt positions), or [batch, 0, vocab] when
  return_logits is False. Exposed for benchmarks (`.lower(...).compile()`); use `sample`.
  """
  decode = _decode_with_cache if use_cache else _decode_without_cache
  return jax.jit(functools.partial(decode, model, top_k, return_logits))


def _check_request(model: models.ImageGPT, num_samples: Optional[int],
                   prompt: Optional[ArrayLike], temperature: float,
                   top_k: Optional[int]) -> jax.Array:
  """Validates a sampling request; returns the prompt [batch, prompt_len] int32."""
  if not isinstance(model, models.ImageGPT) or not model.causal:
    raise ValueError("sampling needs an autoregressive iGPT; build it with "
                     "igpt_jax.create_model(..., causal=True).")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0; use top_k=1 for greedy decoding.")
  if top_k is not None and not 1 <= top_k <= model.num_clusters:
    raise ValueError(f"top_k={top_k} must be in [1, num_clusters={model.num_clusters}] or None.")
  if prompt is None:
    if num_samples is None or num_samples < 1:
      raise ValueError("pass num_samples >= 1 to sample without a prompt, or a prompt "
                       "[batch, prompt_len].")
    return jnp.zeros((num_samples, 0), jnp.int32)
  if np.ndim(prompt) != 2 or np.shape(prompt)[1] > model.seq_len:
    raise ValueError(f"prompt must be ids [batch, prompt_len] with prompt_len <= "
                     f"{model.seq_len}, got shape {np.shape(prompt)}.")
  if num_samples is not None and num_samples != np.shape(prompt)[0]:
    raise ValueError(f"num_samples={num_samples} differs from the prompt's batch "
                     f"{np.shape(prompt)[0]}; repeat the prompt rows (np.repeat) to get several "
                     "samples per prompt and leave num_samples unset.")
  if isinstance(prompt, np.ndarray) and prompt.size and (
      prompt.min() < 0 or prompt.max() >= model.num_clusters):
    raise ValueError(f"prompt ids must be in [0, {model.num_clusters}); quantize images with "
                     "the model's palette.")
  return jnp.asarray(prompt, jnp.int32)


def sample(model: models.ImageGPT, variables: Any, rng: jax.Array, *,
           num_samples: Optional[int] = None, prompt: Optional[ArrayLike] = None,
           temperature: float = 1.0, top_k: Optional[int] = None,
           return_logits: bool = False) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
  """Samples images token by token with a KV cache.

  Args:
    model: an autoregressive `ImageGPT`; variables: its {"params": ...}.
    rng: PRNG key; token t uses fold_in(rng, t).
    num_samples: batch size when there is no prompt.
    prompt: optional [batch, prompt_len] int ids of the first prompt_len pixels (raster order),
      e.g. the top half of images; these are kept and the rest is sampled.
    temperature: > 0; logits are divided by it.
    top_k: sample only among the k most likely ids (None = all).
    return_logits: also return the raw logits of the sampled positions.

  Returns:
    ids [batch, image_size**2] int32 (and logits [batch, image_size**2, num_clusters] float32,
    zeros at prompt positions, when return_logits).
  """
  prompt = _check_request(model, num_samples, prompt, temperature, top_k)
  decoder = make_decoder(model, use_cache=True, top_k=top_k, return_logits=return_logits)
  ids, logits = decoder(variables, rng, prompt, jnp.float32(temperature))
  return (ids, logits) if return_logits else ids


def sample_without_cache(model: models.ImageGPT, variables: Any, rng: jax.Array, *,
                         num_samples: Optional[int] = None, prompt: Optional[ArrayLike] = None,
                         temperature: float = 1.0, top_k: Optional[int] = None,
                         return_logits: bool = False
                         ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
  """Reference decoder: as `sample`, but recomputes the full forward pass for every position."""
  prompt = _check_request(model, num_samples, prompt, temperature, top_k)
  decoder = make_decoder(model, use_cache=False, top_k=top_k, return_logits=return_logits)
  ids, logits = decoder(variables, rng, prompt, jnp.float32(temperature))
  return (ids, logits) if return_logits else ids


# ------------------------------------------------------------------------------------------------
# Pictures


def sample_grid(palette: ArrayLike, samples: ArrayLike, *, originals: Optional[ArrayLike] = None,
                prompt_len: int = 0, scale: int = 4, separator: int = 2) -> np.ndarray:
  """A picture with one row per image: prompt | samples ... | original.

  Args:
    palette: [num_clusters, 3] float in [-1, 1].
    samples: [rows, columns, length] (or [rows, length]) int ids, length a square number.
    originals: optional [rows, length] int ids of the true images; with prompt_len > 0 the first
      cell of a row shows the prompt (their first prompt_len pixels, the rest grey), and the last
      cell shows the whole original.
    prompt_len: number of prompt pixels (0 = no prompt cell).
    scale: each pixel becomes a scale x scale block, so 32x32 images are visible.
    separator: width in pixels of the white lines between cells.

  Returns:
    [height, width, 3] uint8.
  """
  samples = np.asarray(samples)
  if samples.ndim == 2:
    samples = samples[:, None]
  rows, columns, length = samples.shape
  side = math.isqrt(length)
  if side * side != length:
    raise ValueError(f"samples have {length} tokens, not a square image; pass ids "
                     "[rows, columns, height * width].")
  if prompt_len and originals is None:
    raise ValueError("prompt_len > 0 needs the originals the prompts were cut from.")
  colours = np.asarray(palette_lib.dequantize(samples, palette))
  cells = [colours[:, j] for j in range(columns)]
  if originals is not None:
    originals = np.asarray(originals).reshape(rows, length)
    original_colours = np.asarray(palette_lib.dequantize(originals, palette))
    if prompt_len:
      prompt_cell = np.zeros_like(original_colours)  # 0 = mid grey in [-1, 1]
      prompt_cell[:, :prompt_len] = original_colours[:, :prompt_len]
      cells.insert(0, prompt_cell)
    cells.append(original_colours)
  cells = [np.clip(np.rint(127.5 * (c + 1.0)), 0, 255).astype(np.uint8) for c in cells]
  cell_size = side * scale
  height = rows * cell_size + (rows + 1) * separator
  width = len(cells) * cell_size + (len(cells) + 1) * separator
  grid = np.full((height, width, 3), 255, np.uint8)
  for i in range(rows):
    for j, cell in enumerate(cells):
      image = cell[i].reshape(side, side, 3).repeat(scale, axis=0).repeat(scale, axis=1)
      top = separator + i * (cell_size + separator)
      left = separator + j * (cell_size + separator)
      grid[top:top + cell_size, left:left + cell_size] = image
  return grid


def save_sample_grid(path: str, palette: ArrayLike, samples: ArrayLike, **kwargs: Any
                     ) -> np.ndarray:
  """Writes `sample_grid(palette, samples, **kwargs)` as a PNG at `path` (whole or not at all);
  returns the array."""
  from PIL import Image  # Only this function needs Pillow.
  from common_jax import weights  # pylint: disable=g-import-not-at-top
  grid = sample_grid(palette, samples, **kwargs)
  weights.write_atomically(path, lambda temporary: Image.fromarray(grid).save(temporary,
                                                                             format="PNG"))
  return grid
