"""Layers both model families share.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, ...) through
`nn.with_logical_partitioning`; `common_jax.sharding` maps them to mesh axes. Activations are
constrained with `constrain`, a no-op outside a mesh.
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# Values accepted for `attention_implementation`: None lets JAX choose (XLA on CPU/TPU),
# "cudnn" forces the cuDNN flash-attention kernel on NVIDIA GPUs, "xla" forces the plain path.
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names (no-op outside a mesh)."""
  return nn.with_logical_constraint(x, tuple(names))


def param_with_axes(init: Initializer, names: Sequence[Optional[str]]) -> Initializer:
  """Wraps an initializer so the parameter it makes carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(names))


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool = False,
    mask: Optional[jax.Array] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
  """Scaled dot-product attention through `jax.nn.dot_product_attention`.

  Args:
    query: [batch, q_length, heads, head_dim].
    key, value: [batch, kv_length, heads, head_dim].
    causal: apply a lower-triangular mask (query i sees keys <= i; q_length == kv_length).
    mask: optional boolean mask broadcastable to [batch, heads, q_length, kv_length], True = keep.
    implementation: None, "xla" or "cudnn" (flash attention on NVIDIA GPUs; needs bf16/fp16).

  Returns:
    [batch, q_length, heads, head_dim] in the dtype of `query`.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
        f"attention_implementation={implementation!r} is not supported; use one of "
        f"{ATTENTION_IMPLEMENTATIONS}.")
  return jax.nn.dot_product_attention(
      query, key, value, mask=mask, is_causal=causal, implementation=implementation)


class HeadsProjection(nn.Module):
  """x [batch, length, embed] -> [batch, length, heads, head_dim]; kernel [embed, heads, head_dim].

  Same parameters as `nn.DenseGeneral(features=(heads, head_dim))`, whose initialisation sees
  the kernel as [embed, heads * head_dim]; written out so the kernel can carry 3 axis names.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1], self.num_heads, self.head_dim)
    init = lambda rng, _, dtype: self.kernel_init(
        rng, (shape[0], shape[1] * shape[2]), dtype).reshape(shape)
    kernel = self.param("kernel", param_with_axes(init, ("embed", "heads", "kv")), shape,
                        self.param_dtype)
    y = jnp.einsum("ble,ehd->blhd", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", param_with_axes(self.bias_init, ("heads", "kv")),
                        (self.num_heads, self.head_dim), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class HeadsMerge(nn.Module):
  """y [batch, length, heads, head_dim] -> [batch, length, features]; kernel [heads, head_dim, features].

  Same parameters as `nn.DenseGeneral(features, axis=(-2, -1))` (initialised as a
  [heads * head_dim, features] matrix).
  """
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    heads, head_dim = y.shape[-2:]
    shape = (heads, head_dim, self.features)
    init = lambda rng, _, dtype: self.kernel_init(
        rng, (heads * head_dim, self.features), dtype).reshape(shape)
    kernel = self.param("kernel", param_with_axes(init, ("heads", "kv", "embed")), shape,
                        self.param_dtype)
    x = jnp.einsum("blhd,hde->ble", y.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", param_with_axes(self.bias_init, ("embed",)), (self.features,),
                        self.param_dtype)
      x = x + bias.astype(self.dtype)
    return x


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the parameter layout of the official ViT checkpoints.

  Submodules `query`, `key`, `value` have kernels [embed, heads, head_dim] and biases
  [heads, head_dim]; `out` has kernel [heads, head_dim, embed] and bias [embed].
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  causal: bool = False
  implementation: Optional[str] = None
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """x: [batch, length, embed] -> [batch, length, embed]."""
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"width {features} is not divisible by num_heads {self.num_heads}; "
                       "choose a width that is a multiple of the number of heads.")
    head_dim = features // self.num_heads
    projection = lambda name: HeadsProjection(
        num_heads=self.num_heads, head_dim=head_dim, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, bias_init=self.bias_init,
        name=name)
    query = constrain(projection("query")(x), ("batch", "length", "heads", "kv"))
    key = constrain(projection("key")(x), ("batch", "length", "heads", "kv"))
    value = constrain(projection("value")(x), ("batch", "length", "heads", "kv"))
    y = dot_product_attention(query, key, value, causal=self.causal, mask=mask,
                              implementation=self.implementation)
    y = HeadsMerge(features=features, use_bias=self.use_bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                   bias_init=self.bias_init, name="out")(y)
    return constrain(y, ("batch", "length", "embed"))


class MlpBlock(nn.Module):
  """Dense -> activation -> dropout -> Dense -> dropout, named `Dense_0`, `Dense_1`."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  activation: Callable[[jax.Array], jax.Array] = nn.gelu
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """x: [batch, length, embed] -> [batch, length, embed]."""
    features = x.shape[-1]
    x = nn.Dense(self.mlp_dim, use_bias=self.use_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype,
                 kernel_init=param_with_axes(self.kernel_init, ("embed", "mlp")),
                 bias_init=param_with_axes(self.bias_init, ("mlp",)))(x)
    x = constrain(x, ("batch", "length", "mlp"))
    x = self.activation(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype,
                 kernel_init=param_with_axes(self.kernel_init, ("mlp", "embed")),
                 bias_init=param_with_axes(self.bias_init, ("embed",)))(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    return constrain(x, ("batch", "length", "embed"))


def count_params(variables_or_shapes: Any) -> int:
  """Number of scalars in a (possibly abstract, possibly boxed) parameter tree."""
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(variables_or_shapes))
  total = 0
  for leaf in leaves:
    size = 1
    for dim in leaf.shape:
      size *= int(dim)
    total += size
  return total
