"""What iGPT's weight formats share, and the initializer from a pre-training run's workdir.

    from igpt_jax import pretrained
    initialize = pretrained.pretrained_initializer("workdirs/igpt", model)  # names, shapes checked
    train_and_evaluate(..., initial_params=initialize)                   # arrays read when called

The formats (igpt_jax.hf: Hugging Face ImageGPT, igpt_jax.openai: OpenAI's checkpoints) and
workdirs all arrive at our parameter names (OpenAI's), and use the helpers here to check them,
cast them and build the model they describe. Formats hold the blocks per block (`h_{i}/...`); a
scan_layers=True model stacks them (`h/...` [depth, ...]): `cast_params` and the workdir readers
give every model its own layout, whichever layout the weights were stored in.
"""

import math
import os
from typing import Any, Callable, Dict, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from common_jax import trees
from common_jax import weights
from igpt_jax import models

Params = Any
Flat = Dict[str, np.ndarray]

# The forward pass (embeddings, blocks 0..n, final norm, heads), whatever the naming scheme: ours,
# OpenAI's (`model/h3/...`) or Hugging Face's (`transformer.h.3....`).
ORDER = trees.forward_order(
    r"(?:^|/|\.)h(?:[._]?(\d+))?[./]", early=("wte|sos|wpe",),
    late=(r"ln_f|(wtet|lm_head\.weight|clf|clf/w|score\.weight)$",))
# What a fine-tuning run's model may have that its pre-training run's checkpoint lacks.
_NEW_HEAD = "clf"
# The blocks: `h_{i}/...`, or stacked under `h/...` in a scan_layers=True model.
BLOCKS = "h"


def in_model_layout(tensors: weights.Tensors, model: models.ImageGPT) -> weights.Tensors:
  """Stored tensors under the block layout of `model` (per block, or stacked for scan_layers)."""
  return weights.in_layout(tensors, BLOCKS, model.scan_layers)


def model_params(model: models.ImageGPT, variables: Any, origin: str, fix: str) -> Flat:
  """The model's parameters from `variables` (in the model's block layout) as host float32
  arrays in the per-block layout of the formats, checked name by name.

  Raises ValueError naming the first parameter that is missing, extra, misshapen or not a float.
  """
  params = trees.params_of(variables)
  trees.check_names_and_shapes(
      trees.flat_shapes(params), trees.flat_shapes(models.abstract_variables(model)["params"]),
      origin, fix=fix, order=ORDER)
  flat = trees.unstack_layers(trees.host_float32(params, origin, fix), BLOCKS)
  return {key: np.ascontiguousarray(value) for key, value in flat.items()}


def read_checkpoint_params(workdir: str, model: models.ImageGPT, step: Optional[int] = None
                           ) -> Params:
  """The params of a workdir's checkpoint (latest, or `step`) as numpy, unchanged but for the
  block layout, which becomes `model`'s; names and shapes are checked against `model` from the
  checkpoint's metadata before any array is read."""
  with weights.read_workdir(workdir, step) as stored:
    tensors = in_model_layout(stored, model)  # a run of the other block layout too
    trees.check_names_and_shapes(
        tensors.shapes, trees.flat_shapes(models.abstract_variables(model)["params"]),
        tensors.origin, fix="build the model with the config the run was trained with",
        order=ORDER)
    return trees.unflatten({key: tensors.read(key) for key in tensors.shapes})


def pretrained_initializer(workdir: str, model: models.ImageGPT) -> Callable[[Params], Params]:
  """`train_and_evaluate(initial_params=...)` hook for fine-tuning from a pre-training run.

  Args:
    workdir: the workdir of an iGPT pre-training run (the params of its latest checkpoint; the
      run may have had scan_layers or not, whatever `model` has).
    model: the model about to be trained. Only its classifier head (`clf`) may be new: every
      other parameter must be in the checkpoint with the same shape, and the checkpoint may hold
      nothing the model lacks.

  Names and shapes are checked now, from the checkpoint's metadata (no array is read), so a run
  of another size fails before any compute with one sentence naming the workdir, the first
  parameter that does not fit and the fix.

  Returns:
    host params -> host params: the checkpoint's arrays, each in the dtype of the fresh
    parameter it replaces, and the fresh `clf`. The arrays are read when it is called.
  """
  workdir = os.fspath(workdir)
  with weights.read_workdir(workdir) as stored:
    _check_initial(in_model_layout(stored, model),
                   trees.flat_shapes(models.abstract_variables(model)["params"]))
    step = stored.step  # the checkpoint checked is the one read

  def initialize(params: Params) -> Params:
    flat = trees.flatten(params)
    with weights.read_workdir(workdir, step) as stored:
      tensors = in_model_layout(stored, model)
      _check_initial(tensors, trees.flat_shapes(flat))
      for key in tensors.shapes:
        flat[key] = np.asarray(tensors.read(key)).astype(flat[key].dtype)
    return trees.unflatten(flat)

  return initialize


def _check_initial(tensors: weights.Tensors, target: Dict[str, Any]) -> None:
  trees.check_names_and_shapes(
      tensors.shapes, target, tensors.origin, order=ORDER,
      fix="use the same model options as the pre-training run",
      may_be_missing=lambda key: key.split("/")[0] == _NEW_HEAD)


def cast_params(flat: Flat, model: models.ImageGPT) -> Dict[str, Params]:
  """Flat float arrays (either block layout) -> {"params": numpy tree} in the model's
  param_dtype and block layout."""
  dtype = jnp.dtype(model.param_dtype)
  flat = trees.in_layout(flat, BLOCKS, model.scan_layers)
  return {"params": trees.unflatten({k: np.asarray(v).astype(dtype) for k, v in flat.items()})}


def model_options(options: Dict[str, Any], derived: Sequence[str], origin: str) -> Dict[str, Any]:
  """`options` for create_model, minus the shape the weights already determine."""
  clash = sorted(set(options) & set(derived))
  if clash:
    raise ValueError(f"{clash} come from {origin} and cannot be passed as model options; pass "
                     "only dtype, param_dtype, dropout_rate, attention_implementation, "
                     "scan_layers or remat_policy.")
  return dict(options)


def square_side(positions: int, what: str, fix: str) -> int:
  """The image side of `positions` = side**2 raster positions."""
  side = math.isqrt(positions)
  if side * side != positions:
    raise ValueError(f"{what} has {positions} positions, which is not image_size**2 for a square "
                     f"image; {fix}.")
  return side


def checked_clusters(clusters: Any, num_clusters: int) -> np.ndarray:
  """The palette that goes with a model: finite float [num_clusters, 3] -> float32."""
  clusters = np.asarray(clusters)
  if (clusters.shape != (num_clusters, 3) or not np.issubdtype(clusters.dtype, np.floating)
      or not np.all(np.isfinite(clusters))):
    raise ValueError(f"clusters must be the model's palette, finite float [{num_clusters}, 3], "
                     f"got {clusters.dtype} {clusters.shape}; pass igpt_jax.load_palette(...).")
  return clusters.astype(np.float32)
