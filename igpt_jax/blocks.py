"""The GPT-2 block of iGPT as OpenAI wrote it, with a KV-cache decode path.

The norm divides by the RMS over features (no mean subtraction, gain `g` only, eps 1e-5); the
activation is x * sigmoid(1.702 x); no biases anywhere; attention projections are
[heads, head_dim, embed] parameters (OpenAI's conv1d layout). `igpt_jax.models.ImageGPT` stacks
these blocks; its docstring lists every parameter with its initialisation.
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax import layers

Dtype = Any
# Per layer (key, value), each [batch, length, heads, head_dim].
Cache = Tuple[Tuple[jax.Array, jax.Array], ...]

NORM_EPSILON = 1e-5


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI's `gelu2`: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class RMSNorm(nn.Module):
  """OpenAI's `norm`: x / sqrt(mean(x^2) + 1e-5) * g, computed in float32, gain `g` only."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., embed] -> [..., embed] in `dtype`."""
    g = self.param("g", layers.param_with_axes(nn.initializers.ones, ("embed",)),
                   (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + NORM_EPSILON)
    return (x * g.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
  """Multi-head attention without biases; projections [heads, head_dim, embed] as in OpenAI's."""
  width: int
  num_heads: int
  depth: int
  causal: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def setup(self):
    shape = (self.num_heads, self.head_dim, self.width)
    axes = ("heads", "kv", "embed")
    qkv_init = layers.param_with_axes(nn.initializers.normal(self.width**-0.5), axes)
    out_init = layers.param_with_axes(
        nn.initializers.normal((self.width * self.depth)**-0.5), axes)
    self.q_proj = self.param("q_proj", qkv_init, shape, self.param_dtype)
    self.k_proj = self.param("k_proj", qkv_init, shape, self.param_dtype)
    self.v_proj = self.param("v_proj", qkv_init, shape, self.param_dtype)
    self.c_proj = self.param("c_proj", out_init, shape, self.param_dtype)

  def _project(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    # As a 2-D [heads * head_dim, embed] matmul: XLA then reads the kernel as it is stored
    # instead of copying it to a transposed layout (which it would do at every decode step).
    kernel = kernel.astype(self.dtype).reshape(self.width, self.width)
    y = jnp.einsum("bsf,nf->bsn", x, kernel)
    y = y.reshape(*x.shape[:2], self.num_heads, self.head_dim)
    return layers.constrain(y, ("act_batch", "act_length", "act_heads", "act_kv"))

  def _output(self, y: jax.Array) -> jax.Array:
    kernel = self.c_proj.astype(self.dtype).reshape(self.width, self.width)
    y = jnp.einsum("bsn,nf->bsf", y.reshape(*y.shape[:2], self.width), kernel)
    return layers.constrain(y, ("act_batch", "act_length", "act_embed"))

  def __call__(self, x: jax.Array) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    """x: [batch, length, embed] -> (output [batch, length, embed], (key, value))."""
    query, key, value = (self._project(x, w) for w in (self.q_proj, self.k_proj, self.v_proj))
    y = layers.dot_product_attention(query, key, value, causal=self.causal,
                                     implementation=self.implementation)
    return self._output(y), (key, value)

  def decode(self, x: jax.Array, cache: Tuple[jax.Array, jax.Array],
             index: jax.Array) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    """One position: x [batch, 1, embed] at position `index`; cache [batch, length, heads, kv].

    Writes this position's key and value into the cache and attends over positions <= index.
    """
    query, key, value = (self._project(x, w) for w in (self.q_proj, self.k_proj, self.v_proj))
    cache_key = jax.lax.dynamic_update_slice(cache[0], key.astype(cache[0].dtype),
                                             (0, index, 0, 0))
    cache_value = jax.lax.dynamic_update_slice(cache[1], value.astype(cache[1].dtype),
                                               (0, index, 0, 0))
    visible = jnp.arange(cache_key.shape[1]) <= index
    # One query against the whole pre-allocated cache, future positions masked out, on the plain
    # XLA path (a flash kernel gains nothing for one query). On CPU XLA transposes the cache for
    # this dot at every step; hand-written multiply-reduces avoid that and were 1.7x faster at
    # batch 4, but 10x slower at batch 1, so the shared attention function stays.
    y = layers.dot_product_attention(query, cache_key, cache_value,
                                     mask=visible[None, None, None, :], implementation="xla")
    return self._output(y), (cache_key, cache_value)


class Mlp(nn.Module):
  """c_fc -> x * sigmoid(1.702 x) -> c_proj, no biases."""
  width: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, length, embed] -> [batch, length, embed]."""
    init = nn.initializers.normal(0.02)
    c_fc = self.param("c_fc", layers.param_with_axes(init, ("embed", "mlp")),
                      (self.width, self.mlp_dim), self.param_dtype)
    c_proj = self.param("c_proj", layers.param_with_axes(init, ("mlp", "embed")),
                        (self.mlp_dim, self.width), self.param_dtype)
    h = jnp.einsum("bsf,fm->bsm", x, c_fc.astype(self.dtype))
    h = quick_gelu(layers.constrain(h, ("act_batch", "act_length", "act_mlp")))
    y = jnp.einsum("bsm,mf->bsf", h, c_proj.astype(self.dtype))
    return layers.constrain(y, ("act_batch", "act_length", "act_embed"))


class Block(nn.Module):
  """Pre-norm GPT-2 block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  width: int
  mlp_dim: int
  num_heads: int
  depth: int
  causal: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None

  def setup(self):
    self.ln_1 = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype)
    self.attn = Attention(width=self.width, num_heads=self.num_heads, depth=self.depth,
                          causal=self.causal, dtype=self.dtype, param_dtype=self.param_dtype,
                          implementation=self.attention_implementation)
    self.ln_2 = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype)
    self.mlp = Mlp(width=self.width, mlp_dim=self.mlp_dim, dtype=self.dtype,
                   param_dtype=self.param_dtype)
    self.dropout = nn.Dropout(rate=self.dropout_rate)

  def __call__(self, x: jax.Array, *, deterministic: bool = True
               ) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    """x: [batch, length, embed] -> (output [batch, length, embed], (key, value))."""
    a, key_value = self.attn(self.ln_1(x))
    x = x + self.dropout(a, deterministic=deterministic)
    x = x + self.dropout(self.mlp(self.ln_2(x)), deterministic=deterministic)
    return layers.constrain(x, ("act_batch", "act_length", "act_embed")), key_value

  def decode(self, x: jax.Array, cache: Tuple[jax.Array, jax.Array],
             index: jax.Array) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    """x: [batch, 1, embed] at position `index` -> (output [batch, 1, embed], updated cache)."""
    a, cache = self.attn.decode(self.ln_1(x), cache, index)
    x = x + a
    return x + self.mlp(self.ln_2(x)), cache
