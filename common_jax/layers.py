"""What both model families' layers share: logical axis names, attention, dropout, parameter counts.

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

import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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
    bias: Optional[jax.Array] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
  """Scaled dot-product attention through `jax.nn.dot_product_attention`.

  Args:
    query: [batch, q_length, heads, head_dim].
    key, value: [batch, kv_length, heads, head_dim].
    causal: apply a lower-triangular mask (query i sees keys <= i; q_length == kv_length).
    mask: optional boolean mask broadcastable to [batch, heads, q_length, kv_length], True = keep.
    bias: optional float bias added to the logits, broadcastable as `mask` is.
    implementation: None, "xla" or "cudnn" (flash attention on NVIDIA GPUs; needs bf16/fp16).

  Returns:
    [batch, q_length, heads, head_dim] in the dtype of `query`.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
        f"attention_implementation={implementation!r} is not supported; use one of "
        f"{ATTENTION_IMPLEMENTATIONS}.")
  if implementation == "cudnn" and (query.shape[1] % 2 or key.shape[1] % 2):
    return even_length_attention(query, key, value, causal=causal, mask=mask, bias=bias,
                                 implementation=implementation)
  return jax.nn.dot_product_attention(
      query, key, value, bias=bias, mask=mask, is_causal=causal, implementation=implementation)


def even_length_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    causal: bool = False,
    mask: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
  """`dot_product_attention` with odd lengths padded by one position that no query sees.

  cuDNN's flash attention in JAX trains only on even lengths: ViT's 197 tokens (196 patches and
  the class token) were refused on an H200 with jax 0.11.2 ("Unsupported sequence length Q 197,
  KV 197": the check for training with a bias sees the zero-size placeholder JAX puts in place
  of a missing bias; jax 0.10.2's code reads the same). Query, key and value get one zero position
  at the end of an odd length, the real lengths go to JAX as `query_seq_lengths` and
  `key_value_seq_lengths` (a padding mask: no query attends to the added key), `bias` and
  `mask` are padded alike, and the added query's output is dropped. The result equals the
  unpadded attention, which tests check through the XLA implementation.
  """
  batch, q_length = query.shape[:2]
  kv_length = key.shape[1]
  q_pad, kv_pad = q_length % 2, kv_length % 2
  along_length = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))

  def logits_shaped(x, fill):  # [..., q, kv] broadcastable; size-1 axes stay broadcast
    if x is None:
      return None
    x = jnp.asarray(x)
    widths = [(0, 0)] * (x.ndim - 2) + [(0, q_pad if x.shape[-2] > 1 else 0),
                                        (0, kv_pad if x.shape[-1] > 1 else 0)]
    return jnp.pad(x, widths, constant_values=fill)

  lengths = lambda n: constrain(jnp.full((batch,), n, jnp.int32), ("act_batch",))
  out = jax.nn.dot_product_attention(
      along_length(query, q_pad), along_length(key, kv_pad), along_length(value, kv_pad),
      bias=logits_shaped(bias, 0), mask=logits_shaped(mask, False), is_causal=causal,
      query_seq_lengths=lengths(q_length), key_value_seq_lengths=lengths(kv_length),
      implementation=implementation)
  return out[:, :q_length]


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


# Dropout ------------------------------------------------------------------------------------

# Bits of randomness per element: the fewest whose threshold puts the actual drop probability
# within 2% (relative) of the requested rate; 8 for every rate a recipe uses (0.1 -> 26/256).
_MASK_BITS = (8, 16, 32)
_RATE_TOLERANCE = 0.02
# Word i of a mask is a hash of i as a uint32; a mask of more words than this takes its words
# from threefry instead (never reached by this project's activations: ViT-H/14 at batch 4096
# needs 1.4e9 words).
_MAX_HASHED_WORDS = 2**32


def keep_threshold(rate: float) -> Tuple[int, int]:
  """(bits per element, threshold): an element is kept when a uniform `bits`-bit integer is below
  `threshold`, i.e. with probability threshold / 2**bits, the one closest to 1 - rate among the
  fewest bits (8, 16, 32) that come within 2% (relative) of `rate`."""
  if not 0.0 < rate < 1.0:
    raise ValueError(f"dropout rate {rate} must lie in (0, 1).")
  for bits in _MASK_BITS:
    threshold = min(max(round((1.0 - rate) * 2**bits), 1), 2**bits - 1)
    if abs((2**bits - threshold) / 2**bits - rate) <= _RATE_TOLERANCE * rate:
      break
  return bits, threshold


def _mix32(h: jax.Array) -> jax.Array:
  """A bijective mixer of uint32 (C. Wellons' "lowbias32": flipping any input bit flips each
  output bit with probability 0.5 +- 0.001)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _hashed_words(key: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
  """uint32 [*shape]: word i (row-major index) = mix(mix(i ^ s0) + s1), (s0, s1) drawn from `key`
  with threefry. Two keyed rounds: streams of different keys are unrelated, not shifted or
  permuted copies of one another (as one round, mix(i ^ s0), would make them)."""
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return _mix32(_mix32(index ^ seeds[0]) + seeds[1])


def dropout_keep_mask(key: jax.Array, shape: Sequence[int], rate: float
                      ) -> Tuple[jax.Array, float]:
  """(bool [*shape], True = keep; the probability that an element is kept: threshold / 2**bits
  of `keep_threshold(rate)`). A function of the key and the shape only, so it is the same
  however the computation is sharded."""
  shape = tuple(int(d) for d in shape)
  bits, threshold = keep_threshold(rate)
  per_word = 32 // bits
  lead, last = shape[:-1], (shape[-1] if shape else 1)
  words_shape = lead + (-(-last // per_word),)  # elements packed along the last axis
  if math.prod(words_shape) < _MAX_HASHED_WORDS:
    words = _hashed_words(key, words_shape)
  else:
    words = jax.random.bits(key, words_shape, jnp.uint32)
  if per_word > 1:
    unit = jnp.uint8 if bits == 8 else jnp.uint16
    words = lax.bitcast_convert_type(words, unit).reshape(lead + (words_shape[-1] * per_word,))
    words = words[..., :last]
  keep = words.reshape(shape) < jnp.asarray(threshold, words.dtype)
  return keep, threshold / 2**bits


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """x [any shape] with each element zeroed with probability ~rate (see `keep_threshold`) and the
  others divided by the actual keep probability, so that E[dropout(x)] = x exactly."""
  keep, keep_prob = dropout_keep_mask(key, x.shape, rate)
  compute = jnp.promote_types(x.dtype, jnp.float32)  # the scale is not rounded to bf16
  kept = (x.astype(compute) * jnp.asarray(1.0 / keep_prob, compute)).astype(x.dtype)
  return jnp.where(keep, kept, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """Dropout whose masks cost little: `nn.Dropout`'s interface and meaning (`rate` = probability
  that an element is zeroed; kept elements scaled so the expectation equals the input; identity
  when `deterministic` or `rate == 0`; one key per call from the `rng_collection` stream), with
  cheaper random bits.

  How the mask is drawn: 8 random bits per element (16 or 32 only for a rate that 8 bits cannot
  express within 2%: `keep_threshold`), compared with round((1 - rate) * 256); the kept elements
  are divided by the resulting keep probability (0.8984 for rate 0.1), so the expectation stays
  exact. The bits are four to a uint32 word, word i being a two-round integer hash of i keyed by
  two threefry words drawn from the call's key (`_hashed_words`). The key is flax's
  `make_rng("dropout")`, itself a function of the key the train step passes
  (fold_in(state.rng, step)): masks are deterministic, a resumed run redraws exactly the masks of
  an unbroken one, and, the words being a function of each element's global index, a sharded step
  draws the very masks of a single-device one (tests/test_dropout.py).

  Why this and not the others. ViT-S/16 224px batch 8 fp32 train step on the 2-core CPU this
  project is developed on (`benchmarks/vit_dropout.py --candidates`, one run, load average ~4:
  step 1.83 s without dropout; what dropout 0.1 adds to it, medians of 8 interleaved rounds; XLA's
  profile of one encoder block ranks them the same way):
    * `nn.Dropout` (a float32 uniform per element from threefry): +431 ms, 24%.
    * threefry, 8 bits per element (`jax.random.bits` of [..., n/4] uint32): +179 ms. Threefry's
      20 rounds per 64 bits are still the bulk of the cost.
    * `rbg` key (drawn from the threefry key, so still resumable), 8 bits per element: +166 ms.
      XLA's RngBitGenerator is no cheaper than threefry on CPU; its bits differ between CPU, GPU and
      TPU; and it keeps sharded == single device only by making every device generate the whole
      global mask and keep its slice (seen on 8 CPU devices: [16, 197, 96] words generated per
      device for a [16, 197, 384] activation split 8 ways), 8x the work with 8-way data
      parallelism. `unsafe_rbg` behaves the same here; the XLA flag that partitions it (TPU only)
      makes the masks depend on the sharding.
    * this hash, 8 bits per element: +55 ms, 3%, 1/8 of `nn.Dropout`'s cost.
  The hash is not a cryptographic generator; dropout needs uniform, independent-looking bits,
  which tests/test_dropout.py checks (keep rate, neighbours, different keys).
  """
  rate: float
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    """x [any shape] -> the same shape and dtype."""
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng(self.rng_collection))


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
