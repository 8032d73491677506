"""The ViT encoder: pre-LayerNorm blocks (`Encoder1DBlock`) and the `Encoder` that adds the
position information (`vit_jax.posemb`), runs the blocks (per block, or scanned with
`scan_layers`, each optionally rematerialised) and normalises the output (`encoder_norm`).
"""

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax import layers
from vit_jax import posemb as posemb_lib
from vit_jax.layers import AddPositionEmbs, MlpBlock, MultiHeadDotProductAttention, posemb_sincos_2d

Dtype = Any


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm Transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  attention_implementation: Optional[str] = None
  relative_grid: Optional[Tuple[int, int]] = None  # posemb="relative": the patch grid
  num_prefix: int = 0  # tokens before the patches (the class token)
  drop_path: float = 0.0  # stochastic depth: each example skips each branch with this rate

  def _drop_path(self, branch: jax.Array, deterministic: bool) -> jax.Array:
    """The residual branch, zeroed for a random `drop_path` share of the examples (the others
    scaled up by the keep probability), in training only."""
    if deterministic or not self.drop_path:
      return branch
    keep, keep_prob = layers.dropout_keep_mask(self.make_rng("dropout"),
                                               (branch.shape[0], 1, 1), self.drop_path)
    return jnp.where(keep, branch / jnp.asarray(keep_prob, branch.dtype), 0)

  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool) -> jax.Array:
    """inputs: [batch, length, embed] -> [batch, length, embed]."""
    bias = None
    if self.relative_grid:
      bias = posemb_lib.RelativeBias(self.relative_grid, self.num_heads, self.num_prefix,
                                     param_dtype=self.param_dtype, name="relative_posemb")()
    norm = functools.partial(
        nn.LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype,
        scale_init=layers.param_with_axes(nn.initializers.ones, ("embed",)),
        bias_init=layers.param_with_axes(nn.initializers.zeros, ("embed",)))
    x = norm(name="LayerNorm_0")(inputs)
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        implementation=self.attention_implementation,
        name="MultiHeadDotProductAttention_1")(x, bias)
    x = layers.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = self._drop_path(x, deterministic) + inputs
    y = norm(name="LayerNorm_2")(x)
    y = MlpBlock(
        mlp_dim=self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
        dropout_rate=self.dropout_rate, gelu_approximate=self.gelu_approximate,
        name="MlpBlock_3")(y, deterministic=deterministic)
    return x + self._drop_path(y, deterministic)


class Encoder(nn.Module):
  """Position embeddings, dropout, `depth` blocks and the final LayerNorm `encoder_norm`.

  The blocks are `encoderblock_{i}`, or with `scan_layers` one scanned `encoderblock` whose
  parameters are stacked [depth, ...]; `remat_policy` puts each block under `jax.checkpoint`.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  posemb: str = "learn"  # see vit_jax.posemb
  posemb_where: str = "first"
  width: int = 0  # of the tokens (learn2d's tables)
  grid: Tuple[int, int] = (0, 0)  # the patch grid
  num_prefix: int = 0  # tokens before the patches (the class token)
  # Stochastic depth: block i drops its branches with rate stoch_depth * i / (depth - 1), from 0
  # at the first block to stoch_depth at the last (as timm and DeiT schedule it).
  stoch_depth: float = 0.0
  gelu_approximate: bool = True
  attention_implementation: Optional[str] = None
  scan_layers: bool = False
  remat_policy: str = "none"

  def _position_adder(self, name: str):
    """x -> x plus an absolute position embedding (a module named `name` if it has parameters);
    None for posemb none or relative."""
    if self.posemb == "learn":  # every token, the class token too (the official layout)
      return AddPositionEmbs(param_dtype=self.param_dtype, name=name)
    if self.posemb == "learn2d":
      module = posemb_lib.Learned2D(self.grid, self.width, param_dtype=self.param_dtype,
                                    name=name)
      table = lambda: module()
    elif self.posemb == "sincos2d":
      table = lambda: posemb_sincos_2d(*self.grid, self.width)
    else:
      return None

    def add(x):  # the patches only
      patches = x[:, self.num_prefix:] + table().astype(x.dtype)
      return jnp.concatenate([x[:, :self.num_prefix], patches], axis=1)
    return add

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    first = self._position_adder("posembed_input") if self.posemb_where != "every_layer" else None
    if first is not None:
      x = first(x)
    x = layers.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    block = functools.partial(
        Encoder1DBlock, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
        param_dtype=self.param_dtype, dropout_rate=self.dropout_rate,
        gelu_approximate=self.gelu_approximate,
        attention_implementation=self.attention_implementation,
        relative_grid=self.grid if self.posemb == "relative" else None,
        num_prefix=self.num_prefix)
    if self.scan_layers:
      x = layers.scan_blocks(block(name="encoderblock"), x, deterministic, length=self.depth,
                             remat_policy=self.remat_policy)
    else:
      for i in range(self.depth):
        if i and self.posemb_where == "every_layer_shared" and first is not None:
          x = first(x)  # the same embedding again before every block
        elif self.posemb_where == "every_layer":
          adder = self._position_adder(f"posembed_{i}")
          x = adder(x) if adder is not None else x
        rate = self.stoch_depth * i / max(self.depth - 1, 1)
        x = layers.call_block(block(name=f"encoderblock_{i}", drop_path=rate), x, deterministic,
                              remat_policy=self.remat_policy)
    return nn.LayerNorm(
        dtype=self.dtype, param_dtype=self.param_dtype,
        scale_init=layers.param_with_axes(nn.initializers.ones, ("embed",)),
        bias_init=layers.param_with_axes(nn.initializers.zeros, ("embed",)),
        name="encoder_norm")(x)
