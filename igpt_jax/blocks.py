"""The GPT-2 block of iGPT as OpenAI wrote it, with a KV-cache decode path.

The norm divides by the RMS over features (no mean subtraction, gain `g` only, eps 1e-5); the
activation is x * sigmoid(1.702 x); no biases anywhere; attention projections are
[heads, head_dim, embed] parameters (OpenAI's conv1d layout). `igpt_jax.models.ImageGPT` stacks
these blocks; its docstring lists every parameter with its initialisation. `BlockStack` is the
same blocks as one scanned block (`scan_layers=True`).
"""

import functools
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax import layers

Dtype = Any
# Per layer (key, value), each [batch * heads, positions, head_dim]: one row per (sample, head),
# so that the cache update feeds the attention dots as it is (see `Attention.decode`).
Cache = Tuple[Tuple[jax.Array, jax.Array], ...]

NORM_EPSILON = 1e-5


def to_cache_layout(x: jax.Array, positions: int) -> jax.Array:
  """Keys or values [batch, length, heads, head_dim] -> the cache's [batch * heads, positions,
  head_dim], zero at positions >= length."""
  batch, length, heads, head_dim = x.shape
  x = x.transpose(0, 2, 1, 3).reshape(batch * heads, length, head_dim)
  return jnp.pad(x, ((0, 0), (0, positions - length), (0, 0)))


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
    """One position: x [batch, 1, embed] at position `index`; cache (key, value), each
    [batch * heads, positions, head_dim] with index < positions (see `Cache`).

    Writes this position's key and value into the cache and attends over positions <= index of
    the `positions` it holds (the sampler grows it as it goes, so early steps read less of it).
    """
    batch = x.shape[0]
    rows = batch * self.num_heads
    query, key, value = (self._project(x, w).reshape(rows, self.head_dim)
                         for w in (self.q_proj, self.k_proj, self.v_proj))
    cache_key = jax.lax.dynamic_update_slice(cache[0], key[:, None].astype(cache[0].dtype),
                                             (0, index, 0))
    cache_value = jax.lax.dynamic_update_slice(cache[1], value[:, None].astype(cache[1].dtype),
                                               (0, index, 0))
    # The layout and these two dots decide the cost on CPU (HLO of the compiled step): with the
    # cache as [batch, positions, heads, head_dim], or through jax.nn.dot_product_attention, XLA
    # transposed every layer's whole key and value cache at every step to feed the dots; as
    # [batch, heads, positions, head_dim] at batch 1 it dropped the unit batch axis between the
    # update and the dots, duplicated the update and copied each key and value cache 4 times per
    # step. With one row per (sample, head) and the dots below, it reads the updated cache in
    # place (unless batch * heads == 1). Keys stored [rows, head_dim, positions] instead (the
    # dot then vectorizes along positions) measured the same per step at batch 8 and 32 (5.4
    # and 17 ms at 640 positions, load 3): the step is bound by reading the cache. Logits and
    # softmax in float32, as in `layers.dot_product_attention`.
    scores = jnp.einsum("rd,rpd->rp", query, cache_key, preferred_element_type=jnp.float32)
    visible = jnp.arange(cache_key.shape[1]) <= index
    scores = jnp.where(visible, scores * jnp.float32(self.head_dim**-0.5), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(cache_value.dtype)
    y = jnp.einsum("rp,rpd->rd", probs, cache_value).astype(self.dtype)
    return self._output(y.reshape(batch, 1, self.num_heads, self.head_dim)), (cache_key,
                                                                             cache_value)


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
    self.dropout = layers.Dropout(rate=self.dropout_rate)

  def __call__(self, x: jax.Array, *, deterministic: bool = True
               ) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    """x: [batch, length, embed] -> (output [batch, length, embed], (key, value))."""
    a, key_value = self.attn(self.ln_1(x))
    x = x + self.dropout(a, deterministic=deterministic)
    x = x + self.dropout(self.mlp(self.ln_2(x)), deterministic=deterministic)
    return layers.constrain(x, ("act_batch", "act_length", "act_embed")), key_value

  def decode(self, x: jax.Array, cache: Tuple[jax.Array, jax.Array],
             index: jax.Array) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    """x: [batch, 1, embed] at position `index`, cache as in `Attention.decode` -> (output
    [batch, 1, embed], updated cache)."""
    a, cache = self.attn.decode(self.ln_1(x), cache, index)
    x = x + a
    return x + self.mlp(self.ln_2(x)), cache


class BlockStack(nn.Module):
  """`depth` Blocks as one scanned Block (`scan_layers=True`): the parameters of the blocks are
  stacked along a leading axis (logical name "layers") under this module's own name, e.g.
  `h/attn/q_proj` [depth, heads, head_dim, embed] for the blocks' `h_{i}/attn/q_proj`.

  Called, it runs all blocks as one `nn.scan` (one block compiled, `remat_policy` per block) and
  returns the last block's output [batch, length, embed] (no keys and values).
  Indexed or iterated (`stack[i]`, `stack[:k]`, `for block in stack`), it gives one view per
  block that runs that block alone on its slice of the stacked parameters, with any of a
  Block's entry points: `block(x)`, `block.decode(...)`, `block.ln_1(x)`. The passes that go
  block by block (KV-cache prefill and decoding, probe features) use these views unchanged.
  """
  width: int
  mlp_dim: int
  num_heads: int
  depth: int
  causal: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None
  remat_policy: str = "none"

  def _block_fields(self) -> Dict[str, Any]:
    return dict(width=self.width, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                depth=self.depth, causal=self.causal, dropout_rate=self.dropout_rate,
                dtype=self.dtype, param_dtype=self.param_dtype,
                attention_implementation=self.attention_implementation)

  def setup(self):
    self.block = Block(**self._block_fields())
    nn.share_scope(self, self.block)  # the stacked parameters sit under this module's name

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """x: [batch, length, embed] -> the last block's output [batch, length, embed]."""
    return layers.scan_blocks(self.block, x, deterministic, length=self.depth,
                              remat_policy=self.remat_policy)

  def apply_block(self, index: int, method: Any, *args: Any, **kwargs: Any) -> Any:
    """`method(block, *args, **kwargs)` for block `index` alone, on its parameters' slice."""
    params = jax.tree_util.tree_map(lambda p: p[index], nn.meta.unbox(self.variables["params"]))
    rngs = {"dropout": self.make_rng("dropout")} if self.has_rng("dropout") else None
    return Block(parent=None, **self._block_fields()).apply(
        {"params": params}, *args, method=method, rngs=rngs, **kwargs)

  @nn.nowrap
  def __getitem__(self, index):
    return [_BlockView(self, i) for i in range(self.depth)][index]

  @nn.nowrap
  def __iter__(self):
    return iter(self[:])


def _call_attribute(name: str, block: Block, *args: Any, **kwargs: Any) -> Any:
  return getattr(block, name)(*args, **kwargs)


class _BlockView:
  """Block `index` of a BlockStack: called, or any attribute called, runs that block alone."""

  def __init__(self, stack: BlockStack, index: int):
    self._stack, self._index = stack, index

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    return self._stack.apply_block(self._index, Block.__call__, *args, **kwargs)

  def __getattr__(self, name: str) -> Any:  # decode, ln_1, attn, ...
    if name.startswith("_"):
      raise AttributeError(name)
    return functools.partial(self._stack.apply_block, self._index,
                             functools.partial(_call_attribute, name))
