"""ViT weights from any source: the loop's initializer, exports, and a workdir's parameters.

    from vit_jax import pretrained
    train_and_evaluate(..., initial_params=pretrained.pretrained_initializer("ViT-B_16.npz", model))
    pretrained.export(variables, "/tmp/mine.safetensors", "safetensors")
    pretrained.export_from_checkpoint("workdirs/ft", model, "/tmp/ft.npz", "npz")

A source is an official-layout `.npz` (vit_jax.npz), a timm-named `.safetensors` (vit_jax.timm) or
the workdir of a training run, read through `common_jax.weights.read_workdir` (parameters only).
"""

import os
from typing import Any, Callable, Optional, Tuple

from common_jax import trees
from common_jax import weights
from vit_jax import adapt
from vit_jax import models
from vit_jax import npz
from vit_jax import timm

Params = Any
FORMATS = ("npz", "safetensors")


def _open(path: str, model: models.VisionTransformer, step: Optional[int] = None
          ) -> weights.Tensors:
  """The stored parameters at `path`: a workdir (its latest checkpoint, or `step`), .npz or
  .safetensors."""
  if os.path.isdir(path):
    return weights.read_workdir(path, step)
  if path.endswith(".npz"):
    return npz.open_npz(path)
  if path.endswith(".safetensors"):
    return timm.open_safetensors(path, model.num_heads)
  raise ValueError(f"pretrained weights {path} must be a training workdir, an .npz (official "
                   "layout) or a .safetensors file (timm names); fix the path or convert the file.")


def pretrained_initializer(path: str, model: models.VisionTransformer
                           ) -> Callable[[Params], Params]:
  """`train_and_evaluate(initial_params=...)` hook for `config.init_from`.

  Args:
    path: an official-layout .npz, a timm-named .safetensors, or the workdir of an earlier
      training run (the params of its latest checkpoint, from a run with or without
      scan_layers).
    model: the model about to be trained; the weights are adapted to it as in `load_npz`
      (new head, resized position embedding, pre_logits dropped, blocks in its layout).

  The stored names and shapes are checked against `model` now (headers and metadata only), so
  weights that cannot fit fail before any compute; the arrays are read when the loop calls the
  hook with the freshly initialised host params, which give the dtypes and the new head.

  Returns:
    host params -> host params (numpy tree). The loop calls it for a fresh run only, never when
    it resumes from its own checkpoint.
  """
  path = os.fspath(path)
  with _open(path, model) as tensors:
    adapt.plan(tensors, model, trees.flat_shapes(models.abstract_variables(model)["params"]))
    step = tensors.step  # a workdir's checkpoint: the one checked is the one read

  def initialize(params: Params) -> Params:
    with _open(path, model, step) as tensors:
      return adapt.adapt(tensors, model, {"params": params}, None)["params"]

  return initialize


def export(variables: Any, path: str, format: str) -> str:  # pylint: disable=redefined-builtin
  """`export_npz` or `export_safetensors` by `format` ("npz" or "safetensors")."""
  if format == "npz":
    return npz.export_npz(variables, path)
  if format == "safetensors":
    return timm.export_safetensors(variables, path)
  raise ValueError(f"export format {format!r} is unknown; use one of {FORMATS}.")


def read_checkpoint_params(workdir: str, model: models.VisionTransformer,
                           step: Optional[int] = None) -> Tuple[int, Params]:
  """The params of a workdir's Orbax checkpoint (latest by default) as numpy, unchanged.

  Only the `params` subtree is read, straight to host memory, so the checkpoint may come from
  any mesh and optimiser; nothing under `workdir` is written. Names and shapes must be the
  model's exactly (no adaptation: this is for exporting what was trained), up to the block
  layout: a scan_layers run's stacked blocks are returned per block for a per-block model and
  the other way round.

  Returns:
    (step, params tree of numpy arrays in the stored dtypes, the tree of `model.init`'s params).
  """
  with weights.read_workdir(workdir, step) as stored:
    tensors = adapt.in_model_layout(stored, model)  # a run of the other block layout too
    trees.check_names_and_shapes(
        tensors.shapes, trees.flat_shapes(models.abstract_variables(model)["params"]),
        tensors.origin, order=adapt.ORDER, shape_fix="use the config the run was trained with",
        fix=lambda key: f"use the config the run was trained with ({adapt.model_fix(key)})")
    return tensors.step, trees.unflatten({key: tensors.read(key) for key in tensors.shapes})


def export_from_checkpoint(workdir: str, model: models.VisionTransformer, path: str,
                           format: str = "npz",  # pylint: disable=redefined-builtin
                           *, step: Optional[int] = None) -> str:
  """Exports the params of a workdir's latest (or `step`) Orbax checkpoint to `path`.

  Args:
    workdir: a training run's --workdir (checkpoints under `<workdir>/checkpoints/<step>`),
      written on any mesh; it is only read.
    model: the model the run trained (its shapes are checked against the checkpoint's).
    path: destination; an existing file is replaced only by a complete new one.
    format: "npz" (official layout) or "safetensors" (timm names).

  Returns:
    The absolute path written.
  """
  if format not in FORMATS:
    raise ValueError(f"export format {format!r} is unknown; use one of {FORMATS}.")
  _, params = read_checkpoint_params(workdir, model, step)
  return export({"params": params}, path, format)
