"""What both ViT weight formats share: fitting stored parameters to a model, and exporting them.

Loading (`adapt`) fits stored parameters, under the official flat names, to the model the way
the official fine-tuning code does:
  - `head` is replaced (zeros, as the model initialises it) when its shape differs, e.g. a new
    number of classes, or when the file has no head;
  - `pre_logits` (the representation layer) is dropped when the model has none;
  - `Transformer/posembed_input/pos_embedding` is resized to the model's patch grid by
    `scipy.ndimage.zoom(order=1)` over the 2-D grid (as the official code does; corners aligned, so
    a linear ramp stays a linear ramp), the class-token slot copied as it is.
Everything else must match in name and shape; the first key that does not is named in a
one-sentence ValueError, before any array is read.
Files may hold the blocks per block (`Transformer/encoderblock_{i}/...`, the official layout) or
stacked (`Transformer/encoderblock/...` [depth, ...], a scan_layers=True run's checkpoint); they
are read in the layout of the model they are loaded into (`common_jax.weights.in_layout`), and
exports always write the official per-block layout.
"""

import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from common_jax import trees
from common_jax import weights
from vit_jax import models

Params = Any
Flat = Dict[str, np.ndarray]

POSEMB = "Transformer/posembed_input/pos_embedding"
# The blocks: `Transformer/encoderblock_{i}/...`, or stacked under `Transformer/encoderblock/...`.
BLOCKS = "Transformer/encoderblock"
# The forward pass: a hybrid's ResNet stem, embedding, cls, posemb, blocks 0..n, norm,
# pre_logits, head.
ORDER = trees.forward_order(
    r"^Transformer/encoderblock(?:_(\d+))?/",
    early=(r"^(conv_root|gn_root|block\d+)/", "^embedding/", "^cls",
           "^Transformer/posembed_input/"),
    late=("^Transformer/encoder_norm/", "^pre_logits/", "^head/"))


def model_fix(key: str) -> str:
  """The configuration change that would make a model have (or lack) `key`."""
  if key.startswith("pre_logits/"):
    return "set representation_size to the file's (pre_logits/kernel's last dimension)"
  if key == "cls":
    return "set classifier to the file's ('token' has `cls`, 'gap' has none)"
  if key == POSEMB:
    return "set posemb='learn' (the file has a learned position embedding)"
  if key.startswith(BLOCKS):
    return "set depth to the file's number of encoderblock_<i> entries"
  if re.match(r"(conv_root|gn_root|block\d+)/", key):
    return "build the hybrid variant the file was written for (e.g. 'R50+B/16')"
  return "build the model variant the file was written for"


def _shape_fix(key: str) -> str:
  """The configuration change that would give `key` the file's shape."""
  if key.startswith("pre_logits/"):
    return model_fix(key)
  if key.startswith(BLOCKS + "/"):  # stacked: the first axis is the number of blocks
    return ("build the model with the depth and variant the file was written for (the first "
            "axis of a scan_layers=True model's block parameters is the block)")
  if key == "embedding/kernel":  # [P, P, channels in, width]: not 3 channels in = a hybrid's
    return ("build the model with the variant the file was written for (its width and "
            "patch_size; a kernel that reads other than 3 channels is a hybrid variant's, e.g. "
            "'R50+B/16')")
  return ("build the model with the variant the file was written for (its width, mlp_dim, "
          "num_heads and patch_size)")


def export_flat(variables: Any) -> Flat:
  """Params (either block layout) -> flat official names in the per-block layout, float32 numpy
  (bfloat16/float16 widen exactly)."""
  flat = trees.host_float32(trees.params_of(variables), "the variables",
                            "pass the variables of a ViT model ({'params': ...})")
  return {key: np.ascontiguousarray(value)
          for key, value in trees.unstack_layers(flat, BLOCKS).items()}


def in_model_layout(tensors: weights.Tensors, model: models.VisionTransformer
                    ) -> weights.Tensors:
  """Stored tensors under the block layout of `model` (per block, or stacked for scan_layers)."""
  return weights.in_layout(tensors, BLOCKS, model.scan_layers)


def resize_posemb(posemb: np.ndarray, new_grid: Tuple[int, int], *, num_tokens: int = 1,
                  old_grid: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """Resizes a learned position embedding to another patch grid, as the official code does.

  Args:
    posemb: [1, num_tokens + old_h * old_w, width]; the first `num_tokens` rows (the class
      token's slot) are copied unchanged.
    new_grid: (new_h, new_w), square or not.
    num_tokens: leading rows that are not part of the grid (1 for classifier="token", else 0).
    old_grid: (old_h, old_w); default: the square grid the row count implies.

  Returns:
    [1, num_tokens + new_h * new_w, width] in the dtype of `posemb`, the grid interpolated by
    `scipy.ndimage.zoom(order=1)` (bilinear with aligned corners: the corner embeddings are kept
    and a linear ramp stays a linear ramp).
  """
  import scipy.ndimage  # pylint: disable=g-import-not-at-top  # only needed when resizing
  posemb = np.asarray(posemb)
  tokens, grid = posemb[:, :num_tokens], posemb[0, num_tokens:]
  if old_grid is None:
    side = int(round(np.sqrt(grid.shape[0])))
    if side * side != grid.shape[0]:
      raise ValueError(f"position embedding of {grid.shape[0]} grid rows (after {num_tokens} "
                       "token rows) is not a square grid; pass old_grid=(height, width).")
    old_grid = (side, side)
  old_h, old_w = old_grid
  new_h, new_w = new_grid
  if old_h * old_w != grid.shape[0]:
    raise ValueError(f"old_grid {tuple(old_grid)} has {old_h * old_w} cells but the position "
                     f"embedding has {grid.shape[0]} grid rows; pass the grid it was trained on.")
  grid = grid.reshape(old_h, old_w, -1)
  zoom = (new_h / old_h, new_w / old_w, 1)
  # grid_mode=False (the default) maps corner to corner, as the official ViT code does.
  grid = scipy.ndimage.zoom(grid, zoom, order=1)
  assert grid.shape[:2] == (new_h, new_w), (grid.shape, new_grid)
  grid = grid.reshape(1, new_h * new_w, -1).astype(posemb.dtype)
  return np.concatenate([tokens, grid], axis=1)


def _target(model: models.VisionTransformer, variables: Any, rng: Optional[jax.Array]
            ) -> Tuple[Dict[str, Any], Callable[[str], np.ndarray]]:
  """(flat target leaves with .shape/.dtype, key -> fresh value for a key the file cannot give)."""
  if variables is not None:
    flat = trees.flatten(trees.params_of(variables))
    return flat, lambda key: trees.to_host(flat[key])
  if rng is not None:
    images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    flat = trees.flatten(jax.jit(model.init)(rng, images)["params"])
    return flat, lambda key: trees.to_host(flat[key])
  flat = trees.flatten(models.abstract_variables(model)["params"])
  # The model initialises `head` to zeros, so no initialisation needs to run for it.
  return flat, lambda key: np.zeros(flat[key].shape, flat[key].dtype)


def plan(tensors: weights.Tensors, model: models.VisionTransformer,
         target: Dict[str, Tuple[int, ...]]) -> Dict[str, str]:
  """Decides, from shapes alone, how each target key is filled: "copy", "resize" or "fresh".

  Raises ValueError naming the first key that does not fit.
  """
  tensors = in_model_layout(tensors, model)
  origin, stored = tensors.origin, dict(tensors.shapes)
  if ("cls" in stored) != ("cls" in target):
    has, lacks = ("the file", "the model") if "cls" in stored else ("the model", "the file")
    raise ValueError(f"{has} has a class token (`cls`) but {lacks} does not ({origin}); "
                     f"{model_fix('cls')}.")
  actions = {}
  heads = [k for k in target if k.startswith("head/")]
  # A new number of classes (or a head fed by a dropped pre_logits) gets a fresh head; head
  # kernel and bias are replaced together so they never come from two different models.
  if not heads or not all(stored.get(k) == target[k] for k in heads):
    actions.update({k: "fresh" for k in heads})
    stored = {k: v for k, v in stored.items() if not k.startswith("head/")}
  if "pre_logits/kernel" not in target:  # dropped when the model has no representation layer
    stored = {k: v for k, v in stored.items() if not k.startswith("pre_logits/")}
  # Masked patch pre-training's own parameters stay behind when fine-tuning (vit_jax.mpp).
  stored = {k: v for k, v in stored.items()
            if k in target or not (k == "mask_token" or k.startswith("mpp_head/"))}
  have, want = stored.get(POSEMB), target.get(POSEMB)
  resize = (have is not None and want is not None and have != want and len(have) == 3
            and have[0] == 1 and have[2] == want[2])
  if resize:
    stored[POSEMB] = want  # checked below as a grid
  trees.check_names_and_shapes(stored, target, origin, fix=model_fix, shape_fix=_shape_fix,
                               order=ORDER, may_be_missing=lambda key: key in actions)
  if resize:
    num_tokens = 1 if "cls" in target else 0
    side = int(round(np.sqrt(have[1] - num_tokens)))
    if side * side != have[1] - num_tokens:
      raise ValueError(f"`{POSEMB}` in {origin} has {have[1]} rows, which is not {num_tokens} "
                       "token row(s) plus a square grid; pass a file from a ViT with a square "
                       "patch grid.")
    grid = model.image_size // model.effective_patch_size
    if grid * grid + num_tokens != want[1]:
      raise ValueError(f"`{POSEMB}` of the model has {want[1]} rows, not {num_tokens} + "
                       f"{grid}x{grid}; pass the model the variables belong to.")
    actions[POSEMB] = "resize"
  return {key: actions.get(key, "copy") for key in target}


def adapt(tensors: weights.Tensors, model: models.VisionTransformer, variables: Any,
          rng: Optional[jax.Array]) -> Dict[str, Params]:
  """Reads and adapts the stored arrays onto the model's tree -> {"params": numpy tree}."""
  tensors = in_model_layout(tensors, model)
  target, fresh = _target(model, variables, rng)
  actions = plan(tensors, model, trees.flat_shapes(target))
  grid = model.image_size // model.effective_patch_size
  out = {}
  for key, action in actions.items():
    dtype = target[key].dtype
    if action == "fresh":
      out[key] = np.asarray(fresh(key), dtype)
      continue
    array = tensors.read(key)
    if action == "resize":
      array = resize_posemb(array, (grid, grid), num_tokens=1 if "cls" in target else 0)
    # Same-dtype astype copies the bits; other dtypes are what the model's param_dtype asks for.
    out[key] = np.asarray(array).astype(dtype)
  return {"params": trees.unflatten(out)}
