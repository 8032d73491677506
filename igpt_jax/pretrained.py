"""What iGPT's weight formats share, and the initializer from a pre-training run's workdir.

    from igpt_jax import pretrained
    initialize = pretrained.pretrained_initializer("workdirs/igpt", model)  # names, shapes checked
    train_and_evaluate(..., initial_params=initialize)                   # arrays read when called

The formats (igpt_jax.hf: Hugging Face ImageGPT, igpt_jax.openai: OpenAI's checkpoints) and
workdirs all arrive at our parameter names (OpenAI's), and use the helpers here to check them,
cast them and build the model they describe.
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
    r"(?:^|/|\.)h[._]?(\d+)[./]", early=("wte|sos|wpe",),
    late=(r"ln_f|(wtet|lm_head\.weight|clf|clf/w|score\.weight)$",))
# What a fine-tuning run's model may have that its pre-training run's checkpoint lacks.
_NEW_HEAD = "clf"


def model_params(model: models.ImageGPT, variables: Any, origin: str, fix: str) -> Flat:
  """The model's parameters from `variables` as host float32 arrays, checked name by name.

  Raises ValueError naming the first parameter that is missing, extra, misshapen or not a float.
  """
  params = trees.params_of(variables)
  trees.check_names_and_shapes(
      trees.flat_shapes(params), trees.flat_shapes(models.abstract_variables(model)["params"]),
      origin, fix=fix, order=ORDER)
  return trees.host_float32(params, origin, fix)


def read_checkpoint_params(workdir: str, model: models.ImageGPT, step: Optional[int] = None
                           ) -> Params:
  """The params of a workdir's checkpoint (latest, or `step`) as numpy, unchanged; names and
  shapes are checked against `model` from the checkpoint's metadata before any array is read."""
  with weights.read_workdir(workdir, step) as tensors:
    trees.check_names_and_shapes(
        tensors.shapes, trees.flat_shapes(models.abstract_variables(model)["params"]),
        tensors.origin, fix="build the model with the config the run was trained with",
        order=ORDER)
    return trees.unflatten({key: tensors.read(key) for key in tensors.shapes})


def pretrained_initializer(workdir: str, model: models.ImageGPT) -> Callable[[Params], Params]:
  """`train_and_evaluate(initial_params=...)` hook for fine-tuning from a pre-training run.

  Args:
    workdir: the workdir of an iGPT pre-training run (the params of its latest checkpoint).
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
  with weights.read_workdir(workdir) as tensors:
    _check_initial(tensors, trees.flat_shapes(models.abstract_variables(model)["params"]))
    step = tensors.step  # the checkpoint checked is the one read

  def initialize(params: Params) -> Params:
    flat = trees.flatten(params)
    with weights.read_workdir(workdir, step) as tensors:
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
  """Flat float arrays -> {"params": numpy tree} in the model's param_dtype."""
  dtype = jnp.dtype(model.param_dtype)
  return {"params": trees.unflatten({k: np.asarray(v).astype(dtype) for k, v in flat.items()})}


def model_options(options: Dict[str, Any], derived: Sequence[str], origin: str) -> Dict[str, Any]:
  """`options` for create_model, minus the shape the weights already determine."""
  clash = sorted(set(options) & set(derived))
  if clash:
    raise ValueError(f"{clash} come from {origin} and cannot be passed as model options; pass "
                     "only dtype, param_dtype, dropout_rate or attention_implementation.")
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
