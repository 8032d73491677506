"""What both model families' layers share: logical axis names, attention, parameter counts.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) through
`param_with_axes`; activations carry names of their own (`act_batch`, `act_length`, `act_embed`,
...) through `constrain`, a no-op outside a mesh. `common_jax.sharding.DEFAULT_RULES` maps both
kinds to mesh axes, so a rule for parameters never re-shards activations by accident.
Layers only one family uses live in that family's models module.

Both families run their blocks the same ways: one module per block (`<name>_{i}`, `call_block`),
or with `scan_layers=True` one block compiled once and run `depth` times by `nn.scan` over
parameters stacked [depth, ...] under `<name>` (logical axis `LAYERS`, `scan_blocks`); either way
optionally under `jax.checkpoint` (`remat_policy`). `common_jax.trees.stack_layers` converts
between the two parameter layouts.
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

# Logical axis name of the leading axis of a scanned block's stacked parameters.
LAYERS = "layers"
# `remat_policy` -> what `jax.checkpoint` keeps from a block's forward pass for the backward pass:
# "none": no checkpointing (everything the backward pass needs is kept); "dots_saveable": the
# results of matrix multiplications are kept and the cheap element-wise work between them is
# recomputed; "full": nothing but the block's input is kept and the whole block is recomputed.
REMAT_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


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


def check_remat_policy(remat_policy: str) -> None:
  """Raises one sentence for a `remat_policy` that is not one of `REMAT_POLICIES`."""
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy={remat_policy!r} is unknown; use one of "
                     f"{', '.join(REMAT_POLICIES)}.")


def _block_output(block: nn.Module, x: jax.Array, deterministic: bool) -> jax.Array:
  out = block(x, deterministic=deterministic)
  # A block may return more than its output (iGPT: keys and values); only the output goes on.
  return out[0] if isinstance(out, tuple) else out


def call_block(block: nn.Module, x: jax.Array, deterministic: bool, *,
               remat_policy: str = "none", scanned: bool = False) -> jax.Array:
  """`block(x, deterministic=deterministic)` (its first element when it returns a tuple), under
  `jax.checkpoint` with `remat_policy` unless that is "none".

  The checkpoint wraps this call, not the block's class, so the block's other entry points (and
  calls elsewhere, e.g. KV-cache decoding) are unchanged. `deterministic` stays a Python bool
  (a static argument), so dropout is still switched on and off at trace time. `scanned`: the call
  runs inside `scan_blocks`, whose loop already keeps XLA from merging the recomputation into the
  forward pass, so jax.checkpoint's common-subexpression guard is left off there.
  """
  check_remat_policy(remat_policy)
  if remat_policy == "none":
    return _block_output(block, x, deterministic)
  run = nn.remat(_block_output, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scanned,
                 static_argnums=(2,))
  return run(block, x, deterministic)


def scan_blocks(block: nn.Module, x: jax.Array, deterministic: bool, *, length: int,
                remat_policy: str = "none") -> jax.Array:
  """Runs `block` `length` times, each time with its own parameters, as one `nn.scan`: one block
  is compiled, whatever the depth.

  Args:
    block: the block module, created in the caller's scope under the name its stacked
      parameters get; `block(x, deterministic=...)` returns the next x (or a tuple whose first
      element is it).
    x: the first block's input, e.g. [batch, length, embed].
    deterministic: passed to every block unchanged (a Python bool).
    length: the number of blocks.
    remat_policy: as for `call_block`, applied to each block.

  Returns:
    The last block's output. The block's parameters are stacked [length, ...] with the logical
    axis name `LAYERS` in front; "params" and "dropout" rngs are split per block.
  """
  check_remat_policy(remat_policy)

  def body(module, carry, deterministic):
    return call_block(module, carry, deterministic, remat_policy=remat_policy,
                      scanned=True), None

  scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=nn.broadcast, length=length,
                 metadata_params={nn.PARTITION_NAME: LAYERS})
  return scan(block, x, deterministic)[0]


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
