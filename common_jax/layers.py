"""What both model families' layers share: logical axis names, attention, parameter counts.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) through
`param_with_axes`; activations carry names of their own (`act_batch`, `act_length`, `act_embed`,
...) through `constrain`, a no-op outside a mesh. `common_jax.sharding.DEFAULT_RULES` maps both
kinds to mesh axes, so a rule for parameters never re-shards activations by accident.
Layers only one family uses live in that family's models module.
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
