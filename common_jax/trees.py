"""Parameter trees as flat '/'-joined dicts, their shapes and host arrays: what every checkpoint
format needs; `stack_layers` / `unstack_layers`, the converter between the per-block and the
scanned (stacked) layout of a model's blocks; and `check_names_and_shapes`, the one check that
stored names and shapes are what a model expects (one sentence naming the first key that does not
fit, in forward-pass order)."""

import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Shape = Tuple[int, ...]
# A part of an error sentence that may depend on the key it is about.
Text = Union[str, Callable[[str], str]]


def flatten(params: Params) -> Dict[str, Any]:
  """Nested params (boxed or not) -> {"Transformer/encoder_norm/scale": leaf, ...}."""
  return flax.traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")


def unflatten(flat: Dict[str, Any]) -> Params:
  """Inverse of `flatten`: the nested dict of plain dicts that `model.init` returns."""
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def params_of(variables: Any) -> Params:
  """Accepts {"params": ...} or the params tree itself (boxed or not).

  Neither model family has a parameter called "params", so the two cannot be confused.
  """
  variables = nn.meta.unbox(variables)
  if isinstance(variables, Mapping) and "params" in variables:
    return variables["params"]
  return variables


def to_host(x: Any) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array -> one numpy array with every element."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def flat_shapes(params: Any) -> Dict[str, Shape]:
  """Params (arrays, abstract or boxed) -> {flat name: shape}."""
  return {key: tuple(np.shape(value)) for key, value in flatten(params).items()}


def host_float32(params: Any, origin: str, fix: str) -> Dict[str, np.ndarray]:
  """Params (boxed or not, sharded or not) -> {flat name: host float32 array}, what exports
  write: float32 stays bit-identical, bfloat16/float16 widen exactly; other dtypes are refused."""
  flat = {}
  for key, value in flatten(params).items():
    array = to_host(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(f"`{key}` in {origin} has dtype {array.dtype}, not a float; {fix}.")
    flat[key] = np.ascontiguousarray(array.astype(np.float32))
  if not flat:
    raise ValueError(f"{origin} hold no parameters; {fix}.")
  return flat


# ------------------------------------------------------------------------------------------------
# Per-block and scanned layouts of a model's blocks
#
# A model with `scan_layers=False` keeps block i's parameters under `{prefix}_{i}/...` (the
# official names: ViT's `Transformer/encoderblock_{i}`, iGPT's `h_{i}`); with `scan_layers=True`
# one scanned block keeps them stacked along a new leading axis under `{prefix}/...`:
#   {prefix}_0/a/b [3, 4], {prefix}_1/a/b [3, 4]   <->   {prefix}/a/b [2, 3, 4]
# The functions below take a flat dict whose values are arrays (default) or anything else through
# `stack` / `unstack` (shapes: `stack_shapes` / `unstack_shapes`). Names outside the prefix pass
# unchanged, and a dict already in the requested layout comes back as it is.

# Where the models keep a scanned block stack: the weight-decay mask (common_jax.optim) judges a
# leaf under one of these by its per-block shape, so both layouts train the same way.
LAYER_STACKS = ("Transformer/encoderblock", "h")


def _block_part(name: str, prefix: str) -> Optional[Tuple[int, str]]:
  """"{prefix}_{i}/{rest}" -> (i, rest); anything else -> None."""
  match = re.match(re.escape(prefix) + r"_(\d+)/(.+)$", name)
  return (int(match.group(1)), match.group(2)) if match else None


def stack_layers(flat: Mapping[str, Any], prefix: str, *,
                 stack: Callable[[Sequence[Any]], Any] = np.stack,
                 origin: str = "the parameters") -> Dict[str, Any]:
  """Per-block layout -> scanned layout: `{prefix}_{i}/{rest}` for i = 0 .. n-1 becomes
  `{prefix}/{rest}` = stack([value_0, ..., value_{n-1}]).

  Raises ValueError, one sentence naming `origin` and the key, when a block lacks a parameter
  that another block has (the blocks could not be stacked).
  """
  out, blocks = {}, {}
  for name, value in flat.items():
    part = _block_part(name, prefix)
    if part is None:
      out[name] = value
    else:
      blocks.setdefault(part[1], {})[part[0]] = value
  depth = 1 + max((i for values in blocks.values() for i in values), default=-1)
  for rest, values in sorted(blocks.items()):
    for i in range(depth):
      if i not in values:
        raise ValueError(f"`{prefix}_{i}/{rest}` is missing from {origin} (block "
                         f"{min(values)} has `{prefix}_{min(values)}/{rest}`), so the {depth} "
                         "blocks cannot be stacked for a scan_layers=True model; pass complete "
                         "parameters.")
    out[f"{prefix}/{rest}"] = stack([values[i] for i in range(depth)])
  return out


def unstack_layers(flat: Mapping[str, Any], prefix: str, *,
                   unstack: Callable[[Any], Sequence[Any]] = list) -> Dict[str, Any]:
  """Scanned layout -> per-block layout: `{prefix}/{rest}` [n, ...] becomes `{prefix}_{i}/{rest}`
  = unstack(value)[i] for i = 0 .. n-1 (for numpy arrays: views of the stacked array)."""
  out = {}
  for name, value in flat.items():
    if name.startswith(prefix + "/"):
      rest = name[len(prefix) + 1:]
      for i, part in enumerate(unstack(value)):
        out[f"{prefix}_{i}/{rest}"] = part
    else:
      out[name] = value
  return out


def stack_shapes(shapes: Mapping[str, Shape], prefix: str, origin: str = "the parameters"
                 ) -> Dict[str, Shape]:
  """`stack_layers` of {name: shape}: {prefix}_{i}/x (s) -> {prefix}/x (n, *s).

  Raises ValueError, one sentence, when the blocks lack a parameter or differ in a shape.
  """
  stacked = stack_layers(shapes, prefix, stack=tuple, origin=origin)
  out = {}
  for name, value in stacked.items():
    if name not in shapes:  # made by stacking: a tuple of the blocks' shapes
      rest = name[len(prefix) + 1:]
      for i, shape in enumerate(value):
        if tuple(shape) != tuple(value[0]):
          raise ValueError(f"`{prefix}_{i}/{rest}` has shape {tuple(shape)} in {origin} but "
                           f"`{prefix}_0/{rest}` has {tuple(value[0])}, so the blocks cannot "
                           "be stacked for a scan_layers=True model; pass parameters whose "
                           "blocks all have one shape.")
      value = (len(value),) + tuple(value[0])
    out[name] = value
  return out


def unstack_shapes(shapes: Mapping[str, Shape], prefix: str) -> Dict[str, Shape]:
  """`unstack_layers` of {name: shape}: {prefix}/x (n, *s) -> {prefix}_{i}/x (s)."""
  return unstack_layers(shapes, prefix, unstack=lambda shape: [tuple(shape[1:])] * shape[0])


def in_layout(flat: Mapping[str, Any], prefix: str, scanned: bool) -> Dict[str, Any]:
  """Arrays in the layout of a model with `scan_layers=scanned`, whichever layout they are in."""
  return stack_layers(flat, prefix) if scanned else unstack_layers(flat, prefix)


def forward_order(block: str, early: Sequence[str] = (), late: Sequence[str] = ()
                  ) -> Callable[[str], Tuple[Any, ...]]:
  """A sort key that puts flat names in the order of the forward pass, so that "the first key
  that does not fit" is the earliest and most telling one.

  Args:
    block: regex whose first group is the block index (blocks sort by index; a group left out,
      as for a scanned stack's names, counts as 0).
    early: regexes of what comes before the blocks, in this order (e.g. embeddings).
    late: regexes of what comes after the blocks, in this order (final norm, heads).
  Names that match none come last. Within a place, names sort by module, `.../bias` after the
  module's other leaves.
  """

  def key(name: str) -> Tuple[Any, ...]:
    module, _, leaf = name.rpartition("/")
    within = (module, leaf == "bias", name)
    index = re.search(block, name)
    if index:  # a scanned stack (the group did not take part) sorts as block 0
      return (len(early), int(index.group(1) or 0)) + within
    for rank, pattern in enumerate(late):
      if re.search(pattern, name):
        return (len(early) + 1 + rank, 0) + within
    for rank, pattern in enumerate(early):
      if re.search(pattern, name):
        return (rank, 0) + within
    return (len(early) + 1 + len(late), 0) + within

  return key


def check_names_and_shapes(stored: Mapping[str, Shape], target: Mapping[str, Shape], origin: str,
                           *, fix: Text, shape_fix: Optional[Text] = None,
                           expected_by: Text = "the model",
                           order: Optional[Callable[[str], Any]] = None,
                           may_be_missing: Callable[[str], bool] = lambda key: False) -> None:
  """Raises ValueError, one sentence, unless `stored` holds every name of `target` with its
  shape and nothing else; reads no array.

  Args:
    stored: {name: shape} of a file or checkpoint (`Tensors.shapes`).
    target: {name: shape} that is expected, e.g. `flat_shapes(abstract params)`.
    origin: how the sentence names where `stored` is ("the checkpoint at step 3 in ...").
    fix: what to do about a missing or extra name: text, or name -> text.
    shape_fix: what to do about a name with another shape (default: `fix`).
    expected_by: what expects `target` ("the model", "config.json (n_layer=2)"): text, or
      name -> text.
    order: sort key of the names (default alphabetical); the first that does not fit is named.
    may_be_missing: name -> True for a target name that `stored` may lack (e.g. a new head).
  """
  def text(part: Text, key: str) -> str:
    return part(key) if callable(part) else part

  for key in sorted(target, key=order):
    want = tuple(target[key])
    if key not in stored:
      if may_be_missing(key):
        continue
      raise ValueError(f"{origin} has no `{key}` {want}, which {text(expected_by, key)} needs; "
                       f"{text(fix, key)}.")
    if tuple(stored[key]) != want:
      raise ValueError(f"`{key}` has shape {tuple(stored[key])} in {origin} but "
                       f"{text(expected_by, key)} expects {want}; "
                       f"{text(fix if shape_fix is None else shape_fix, key)}.")
  for key in sorted(stored, key=order):
    if key not in target:
      raise ValueError(f"{origin} holds `{key}` {tuple(stored[key])}, which "
                       f"{text(expected_by, key)} does not have; {text(fix, key)}.")

