"""How a ViT is told where each patch is: the position embeddings of the paper's ablation
(Appendix D.4), as `config.model.posemb`:

  none       no position information (a bag of patches)
  learn      a learned 1-D embedding [1, tokens, width] (the paper's default; `posembed_input`)
  learn2d    two learned embeddings, one per grid axis, each half the width, concatenated:
             row i, column j -> [row_embedding[i], column_embedding[j]]
  sincos2d   fixed 2-D sine-cosine (big_vision's default; no parameters)
  relative   a learned bias on the attention logits of every layer, one per head and relative
             offset (dy, dx) between two patches; the class token's pairs have their own three
             (class -> patch, patch -> class, class -> class)

and where absolute embeddings enter (`config.model.posemb_where`): `first` (added to the
tokens once, before the first block), `every_layer` (each block adds its own before it) or
`every_layer_shared` (one embedding added before every block).

The absolute embeddings cover the patches only, except `learn` (the official checkpoints'
layout: the class token has a position too).
"""

from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common_jax import layers

Dtype = Any
POSEMBS = ("none", "learn", "learn2d", "sincos2d", "relative")
POSEMB_WHERE = ("first", "every_layer", "every_layer_shared")
_INIT = nn.initializers.normal(stddev=0.02)


class Learned2D(nn.Module):
  """[1, grid_h * grid_w, width]: row embedding (width // 2) beside column embedding (the rest)."""
  grid: Tuple[int, int]
  width: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    half = self.width // 2
    rows = self.param("row_embedding", layers.param_with_axes(_INIT, (None, "embed")),
                      (self.grid[0], half), self.param_dtype)
    cols = self.param("column_embedding", layers.param_with_axes(_INIT, (None, "embed")),
                      (self.grid[1], self.width - half), self.param_dtype)
    table = jnp.concatenate([jnp.repeat(rows, self.grid[1], axis=0),
                             jnp.tile(cols, (self.grid[0], 1))], axis=1)
    return table[None]


def relative_index(grid: Tuple[int, int], num_prefix: int) -> np.ndarray:
  """int32 [tokens, tokens]: the bias row of each (query, key) pair. Patch pairs index their
  offset (dy, dx) in [0, (2 gh - 1)(2 gw - 1)); with a class token (num_prefix=1) the next three
  rows are class -> patch, patch -> class and class -> class."""
  gh, gw = grid
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  rows, cols = rows.ravel(), cols.ravel()
  dy = rows[:, None] - rows[None] + gh - 1
  dx = cols[:, None] - cols[None] + gw - 1
  patches = (dy * (2 * gw - 1) + dx).astype(np.int32)
  if not num_prefix:
    return patches
  offsets = (2 * gh - 1) * (2 * gw - 1)
  n = gh * gw + 1
  index = np.empty((n, n), np.int32)
  index[1:, 1:] = patches
  index[0, 1:], index[1:, 0], index[0, 0] = offsets, offsets + 1, offsets + 2
  return index


class RelativeBias(nn.Module):
  """[1, heads, tokens, tokens] bias on the attention logits, from a learned table
  `relative_bias` [offsets (+3 with a class token), heads], zero-initialised (the model starts
  position-blind and learns the offsets that matter)."""
  grid: Tuple[int, int]
  num_heads: int
  num_prefix: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    index = relative_index(self.grid, self.num_prefix)
    rows = (2 * self.grid[0] - 1) * (2 * self.grid[1] - 1) + 3 * bool(self.num_prefix)
    table = self.param("relative_bias", layers.param_with_axes(nn.initializers.zeros,
                                                               (None, "heads")),
                       (rows, self.num_heads), self.param_dtype)
    return jnp.transpose(table[index], (2, 0, 1))[None]
