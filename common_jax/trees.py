"""Parameter trees as flat '/'-joined dicts and host arrays: what every checkpoint format needs."""

from typing import Any, Dict, Mapping

import flax
import flax.linen as nn
import jax
import numpy as np

Params = Any


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
