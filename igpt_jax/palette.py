"""The colour palette of iGPT: k-means over RGB pixels, and pixel <-> cluster-id maps.

iGPT (Chen et al., 2020) reduces each RGB pixel, scaled to [-1, 1], to the id of the nearest of
512 k-means centres ("9-bit colour"), so an image becomes a sequence of ids in [0, 512). The
palette is a [num_clusters, 3] float32 array saved as a `.npy` file, the same layout as OpenAI's
`kmeans_centers.npy`, so their palette loads with `load_palette` as it is.
"""

import functools
import os
from typing import Any, Iterable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from common_jax import weights as weights_lib  # `weights` names k-means weights here

ArrayLike = Union[np.ndarray, jax.Array]

# Largest number of pixel-to-centre distances `quantize` holds at once (256 MiB in float32).
_MAX_DISTANCES = 2**26
# Pixels per chunk of the k-means assignment step, and pixels used to seed k-means++.
_KMEANS_CHUNK = 8192
_KMEANS_INIT_PIXELS = 65536


def _squared_distances(pixels: jax.Array, centres: jax.Array) -> jax.Array:
  """pixels [..., 3], centres [k, 3] -> [..., k] float32 squared Euclidean distances.

  Written as a sum of squared differences (not |x|^2 - 2x.c + |c|^2) so that it is exact to
  float32 rounding on every backend (no TF32 matmul) and XLA fuses it into one reduction.
  """
  diff = pixels[..., None, :].astype(jnp.float32) - centres.astype(jnp.float32)
  return jnp.sum(diff * diff, axis=-1)


# ------------------------------------------------------------------------------------------------
# k-means


def _gather_pixels(pixels: Union[ArrayLike, Iterable[Any]], max_pixels: int,
                   seed: int) -> np.ndarray:
  """An array, or an iterable of arrays / {"image": array} batches -> [n, 3] float32."""
  if isinstance(pixels, (np.ndarray, jax.Array)):
    batches = [pixels]
  else:
    batches, total = [], 0
    for batch in pixels:
      batches.append(batch["image"] if isinstance(batch, dict) else batch)
      total += np.size(batches[-1]) // 3
      if total >= max_pixels:
        break
  for batch in batches:
    if np.ndim(batch) < 1 or np.shape(batch)[-1] != 3:
      raise ValueError(f"fit_palette needs pixels shaped [..., 3] (RGB in [-1, 1]), got an array "
                       f"of shape {np.shape(batch)}; pass images [batch, height, width, 3].")
  if not batches:
    raise ValueError("fit_palette got no pixels; pass a non-empty array or iterable of images.")
  flat = np.concatenate([np.asarray(b, np.float32).reshape(-1, 3) for b in batches], axis=0)
  if len(flat) > max_pixels:
    # A seeded subsample: the fit is deterministic for a seed and bounded in memory.
    keep = np.random.default_rng(seed).choice(len(flat), max_pixels, replace=False)
    flat = flat[np.sort(keep)]
  return flat


def _kmeans_plus_plus(rng: jax.Array, pixels: jax.Array, num_clusters: int) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii, 2007): pixels [n, 3] -> centres [k, 3]."""
  first_rng, rng = jax.random.split(rng)
  first = pixels[jax.random.randint(first_rng, (), 0, pixels.shape[0])]
  centres = jnp.zeros((num_clusters, 3), jnp.float32).at[0].set(first)
  nearest = _squared_distances(pixels, first[None])[:, 0]

  def add_centre(i, carry):
    centres, nearest = carry
    # Next centre drawn with probability proportional to the squared distance to the nearest one.
    index = jax.random.categorical(jax.random.fold_in(rng, i), jnp.log(nearest))
    centre = pixels[index]
    nearest = jnp.minimum(nearest, _squared_distances(pixels, centre[None])[:, 0])
    return centres.at[i].set(centre), nearest

  centres, _ = jax.lax.fori_loop(1, num_clusters, add_centre, (centres, nearest))
  return centres


@functools.partial(jax.jit, static_argnames=("num_clusters", "iterations"))
def _kmeans(rng: jax.Array, init_pixels: jax.Array, pixels: jax.Array, weights: jax.Array, *,
            num_clusters: int, iterations: int):
  """Lloyd iterations over chunked pixels [chunks, chunk, 3] with weights [chunks, chunk].

  Returns (centres [k, 3], mean squared distance per iteration [iterations]).
  """
  centres = _kmeans_plus_plus(rng, init_pixels, num_clusters)
  flat_pixels = pixels.reshape(-1, 3)
  total_weight = jnp.sum(weights)

  def assign(carry, chunk):
    centres, sums, counts = carry
    x, w = chunk
    distances = _squared_distances(x, centres)
    ids = jnp.argmin(distances, axis=-1)
    # One-hot matmul rather than a scatter-add: deterministic on every backend.
    one_hot = jax.nn.one_hot(ids, num_clusters, dtype=jnp.float32) * w[:, None]
    sums = sums + jnp.dot(one_hot.T, x, precision=jax.lax.Precision.HIGHEST)
    counts = counts + jnp.sum(one_hot, axis=0)
    return (centres, sums, counts), jnp.min(distances, axis=-1) * w

  def lloyd_step(centres, _):
    zeros = (jnp.zeros((num_clusters, 3), jnp.float32), jnp.zeros((num_clusters,), jnp.float32))
    (_, sums, counts), nearest = jax.lax.scan(assign, (centres, *zeros), (pixels, weights))
    nearest = nearest.reshape(-1)
    updated = sums / jnp.maximum(counts, 1.0)[:, None]
    empty = counts == 0

    def reseed(updated):
      # An empty cluster moves to one of the pixels farthest from their centre (the i-th empty
      # cluster to the i-th farthest pixel), so no centre is wasted and the result stays
      # deterministic.
      _, farthest = jax.lax.top_k(nearest, num_clusters)
      rank = jnp.clip(jnp.cumsum(empty) - 1, 0, num_clusters - 1)
      return jnp.where(empty[:, None], flat_pixels[farthest[rank]], updated)

    updated = jax.lax.cond(jnp.any(empty), reseed, lambda u: u, updated)
    return updated, jnp.sum(nearest) / total_weight

  return jax.lax.scan(lloyd_step, centres, None, length=iterations)


def fit_palette(pixels: Union[ArrayLike, Iterable[Any]], num_clusters: int = 512, *,
                iterations: int = 20, seed: int = 0, max_pixels: int = 2**20) -> np.ndarray:
  """Fits the colour palette by k-means (k-means++ seeding, then Lloyd iterations) in JAX.

  Args:
    pixels: RGB in [-1, 1], either one array [..., 3] (e.g. images [n, height, width, 3]) or an
      iterable of such arrays or of {"image": array} batches. An iterable is read until
      `max_pixels` pixels are gathered, so it should yield shuffled images.
    num_clusters: k, the number of colours (512 in the paper).
    iterations: Lloyd iterations (each one pass over the gathered pixels).
    seed: the same seed and pixels give the same palette.
    max_pixels: at most this many pixels are used (a seeded random subset of larger inputs).

  Returns:
    centres [num_clusters, 3] float32 in [-1, 1]. A cluster left empty by an iteration is moved
    to a pixel far from its centre.
  """
  if num_clusters < 1 or iterations < 1:
    raise ValueError(f"fit_palette needs num_clusters >= 1 and iterations >= 1, got "
                     f"num_clusters={num_clusters}, iterations={iterations}.")
  flat = _gather_pixels(pixels, max_pixels, seed)
  if len(flat) < num_clusters:
    raise ValueError(f"fit_palette got {len(flat)} pixels for {num_clusters} clusters; pass at "
                     "least as many pixels as clusters.")
  rng = np.random.default_rng(seed)
  init = flat if len(flat) <= _KMEANS_INIT_PIXELS else flat[
      np.sort(rng.choice(len(flat), _KMEANS_INIT_PIXELS, replace=False))]
  chunk = min(_KMEANS_CHUNK, len(flat))
  padded = -len(flat) % chunk
  weights = np.concatenate([np.ones(len(flat), np.float32), np.zeros(padded, np.float32)])
  flat = np.concatenate([flat, np.zeros((padded, 3), np.float32)])
  centres, _ = _kmeans(jax.random.PRNGKey(seed), jnp.asarray(init),
                       jnp.asarray(flat.reshape(-1, chunk, 3)),
                       jnp.asarray(weights.reshape(-1, chunk)),
                       num_clusters=num_clusters, iterations=iterations)
  return np.asarray(centres, np.float32)


# ------------------------------------------------------------------------------------------------
# Files


def save_palette(path: str, centres: ArrayLike) -> None:
  """Writes centres [num_clusters, 3] as a float32 `.npy` file (OpenAI's layout), atomically;
  only process 0 writes."""
  centres = np.asarray(centres)
  if centres.ndim != 2 or centres.shape[1] != 3:
    raise ValueError(f"a palette is [num_clusters, 3], got shape {centres.shape}; pass the "
                     "centres that fit_palette returned.")
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)

  def write(temporary: str) -> None:
    with open(temporary, "wb") as f:  # a file object: np.save would append ".npy" to a name
      np.save(f, centres.astype(np.float32))

  # Written whole or not at all, so an interrupted write never leaves a truncated palette that a
  # later run would take for a fitted one.
  weights_lib.write_atomically(path, write)


def load_palette(path: str, num_clusters: Optional[int] = None) -> np.ndarray:
  """Reads a palette `.npy` file -> [num_clusters, 3] float32.

  Raises ValueError (one sentence naming the path and the fix) when the file is missing,
  unreadable, not a float [k, 3] array, holds NaN or inf, or has a k other than `num_clusters`.
  """
  fix = ("fit one first with run.py's `palette` mode (or igpt_jax.fit_palette + save_palette), "
         "or point the config at OpenAI's kmeans_centers.npy")
  if not os.path.isfile(path):
    raise ValueError(f"palette file {path!r} does not exist; {fix}.")
  try:
    centres = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"palette file {path!r} is not a readable .npy array ({e}); {fix}.") from e
  if centres.ndim != 2 or centres.shape[1] != 3 or not np.issubdtype(centres.dtype, np.floating):
    raise ValueError(f"palette file {path!r} holds a {centres.dtype} array of shape "
                     f"{centres.shape}, not float [num_clusters, 3]; {fix}.")
  if not np.all(np.isfinite(centres)):
    raise ValueError(f"palette file {path!r} holds non-finite colours (NaN or inf); {fix}.")
  if num_clusters is not None and centres.shape[0] != num_clusters:
    raise ValueError(f"palette file {path!r} has {centres.shape[0]} colours but the model "
                     f"expects num_clusters={num_clusters}; set num_clusters to "
                     f"{centres.shape[0]} or fit a palette with {num_clusters} clusters.")
  return centres.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Pixels <-> ids


def _position_chunks(batch: int, positions: int, num_clusters: int) -> int:
  """Smallest divisor of `positions` that keeps batch * positions / d * k under the cap."""
  for chunks in range(1, positions + 1):
    if positions % chunks == 0 and batch * (positions // chunks) * num_clusters <= _MAX_DISTANCES:
      return chunks
  return positions


@jax.jit
def quantize(images: ArrayLike, palette: ArrayLike) -> jax.Array:
  """Nearest palette colour of every pixel.

  Args:
    images: [..., 3] float RGB in [-1, 1] (e.g. [batch, height, width, 3]).
    palette: [num_clusters, 3] float.

  Returns:
    ids [...] int32 in [0, num_clusters): argmin of the squared distance (lowest id on ties).
    Jittable; the distance matrix is computed in chunks of positions (the leading batch axis is
    kept whole, so a batch-sharded input stays sharded) to bound memory for large batches.
  """
  images = jnp.asarray(images)
  palette = jnp.asarray(palette, jnp.float32)
  lead_shape = images.shape[:-1]
  if images.ndim <= 2:
    pixels = images.reshape(1, -1, 3)
  else:
    pixels = images.reshape(images.shape[0], -1, 3)
  batch, positions, _ = pixels.shape
  chunks = _position_chunks(batch, positions, palette.shape[0])
  if chunks == 1:
    ids = jnp.argmin(_squared_distances(pixels, palette), axis=-1)
  else:
    pixels = pixels.reshape(batch, chunks, positions // chunks, 3).transpose(1, 0, 2, 3)
    ids = jax.lax.map(lambda x: jnp.argmin(_squared_distances(x, palette), axis=-1), pixels)
    ids = ids.transpose(1, 0, 2)
  return ids.reshape(lead_shape).astype(jnp.int32)


@jax.jit
def dequantize(ids: ArrayLike, palette: ArrayLike) -> jax.Array:
  """ids [...] int in [0, num_clusters), palette [num_clusters, 3] -> RGB [..., 3] float32."""
  return jnp.take(jnp.asarray(palette, jnp.float32), jnp.asarray(ids), axis=0)
