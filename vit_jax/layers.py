"""The ViT-only layers, with the parameter names and shapes of the official checkpoints: the
position embedding, the attention (written out; the comment above `_Projection` says why) and the
MLP block. What both families use is in `common_jax.layers`.
"""

import functools
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common_jax import layers

Dtype = Any


def posemb_sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [1, height * width, dim] (as in big_vision)."""
  if dim % 4:
    raise ValueError(f"width {dim} must be a multiple of 4 for posemb='sincos2d'.")
  y, x = np.mgrid[:height, :width]
  omega = np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1)
  omega = 1. / (temperature**omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding `pos_embedding` [1, length, width]."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = layers.param_with_axes(nn.initializers.normal(stddev=0.02), (None, None, "embed"))
    pe = self.param("pos_embedding", init, (1, x.shape[1], x.shape[2]), self.param_dtype)
    return x + pe.astype(x.dtype)


# Why the attention is written out rather than taken from Flax: the official ViT code uses
# `nn.MultiHeadDotProductAttention`, whose `nn.DenseGeneral` projections give these very names
# and initial values, but DenseGeneral calls kernel_init with the flattened [in, out] matrix
# shape, so a kernel boxed with three logical names ([embed, heads, kv]) fails its sharding
# constraint under a mesh; and one kernel_init serves all four projections there, while `out`
# needs other names ([heads, kv, embed]). `_Projection` keeps DenseGeneral's parameters and
# initialisation (Xavier-uniform over the flattened matrix, zero bias) with 3-D names.
HEADS = ("act_batch", "act_length", "act_heads", "act_kv")
TOKENS = ("act_batch", "act_length", "act_embed")


class _Projection(nn.Module):
  """`equation` of the input with `kernel` [*kernel_shape], plus `bias` [*kernel_shape[n_in:]]."""
  equation: str  # e.g. "ble,ehd->blhd"
  kernel_shape: Tuple[int, ...]
  kernel_names: Tuple[str, ...]
  n_in: int  # leading kernel axes contracted with the input
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = int(np.prod(self.kernel_shape[:self.n_in]))
    flat = (fan_in, int(np.prod(self.kernel_shape)) // fan_in)
    kernel_init = lambda rng, shape, dtype: nn.initializers.xavier_uniform()(
        rng, flat, dtype).reshape(shape)
    kernel = self.param("kernel", layers.param_with_axes(kernel_init, self.kernel_names),
                        self.kernel_shape, self.param_dtype)
    bias_shape = self.kernel_shape[self.n_in:]
    bias = self.param("bias", layers.param_with_axes(nn.initializers.zeros,
                                                     self.kernel_names[self.n_in:]),
                      bias_shape, self.param_dtype)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with the parameter layout of the official ViT checkpoints.

  Submodules `query`, `key`, `value` have kernels [embed, heads, head_dim] and biases
  [heads, head_dim]; `out` has kernel [heads, head_dim, embed] and bias [embed].
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """x: [batch, length, embed] -> [batch, length, embed]; bias: added to the attention logits,
    broadcastable to [batch, heads, length, length] (`posemb="relative"`).

    When the "intermediates" collection is mutable (attention analysis), the attention weights
    [batch, heads, length, length] are sown there as "attention_weights", computed on the side.
    """
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"width {features} is not divisible by num_heads {self.num_heads}; "
                       "choose a width that is a multiple of the number of heads.")
    heads = (self.num_heads, features // self.num_heads)
    project = functools.partial(_Projection, dtype=self.dtype, param_dtype=self.param_dtype)
    query, key, value = (
        layers.constrain(project("ble,ehd->blhd", (features,) + heads, ("embed", "heads", "kv"),
                                 1, name=name)(x), HEADS)
        for name in ("query", "key", "value"))
    y = layers.dot_product_attention(query, key, value, bias=bias,
                                     implementation=self.implementation)
    if self.is_mutable_collection("intermediates"):
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) / jnp.sqrt(
          jnp.float32(heads[1]))
      if bias is not None:
        logits = logits + bias
      self.sow("intermediates", "attention_weights", jax.nn.softmax(logits, axis=-1))
    y = project("blhd,hde->ble", heads + (features,), ("heads", "kv", "embed"), 2, name="out")(y)
    return layers.constrain(y, TOKENS)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout, named `Dense_0`, `Dense_1`."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """x: [batch, length, embed] -> [batch, length, embed]."""
    dense = lambda features, names: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.param_with_axes(nn.initializers.xavier_uniform(), names),
        bias_init=layers.param_with_axes(nn.initializers.normal(stddev=1e-6), names[1:]))
    features = x.shape[-1]
    x = layers.constrain(dense(self.mlp_dim, ("embed", "mlp"))(x),
                         ("act_batch", "act_length", "act_mlp"))
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = layers.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(features, ("mlp", "embed"))(x)
    x = layers.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    return layers.constrain(x, TOKENS)
