"""What the attention looks at: the ViT paper's mean attention distance (its Figure 7) and
attention-rollout maps (Abnar & Zuidema, 2020; the paper's Figure 6), from attention weights.

Both take the weights of every layer, [layers][batch, heads, tokens, tokens] (rows: queries,
each summing to one), as `VisionTransformer.attention_weights` returns them; the first
`num_prefix` tokens (the class token) have no place in the image. Pure numpy, plus PIL for the
pictures (a scatter plot and heat-map overlays), so nothing beyond the project's dependencies.
"""

from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw


def _patch_centres(grid: Tuple[int, int], patch_size: int) -> np.ndarray:
  """[grid_h * grid_w, 2] pixel coordinates (row, column) of the patch centres, row-major."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  return (np.stack([rows.ravel(), cols.ravel()], axis=1) + 0.5) * patch_size


def mean_attention_distance(weights: Sequence[np.ndarray], grid: Tuple[int, int],
                            patch_size: int, num_prefix: int = 1) -> np.ndarray:
  """[layers, heads]: for each head, the pixel distance between a patch and the patches it
  attends to, weighted by the attention and averaged over query patches and images (the
  paper's "attention distance", akin to a receptive field size).

  Only patch-to-patch attention counts: the rows and columns of the prefix tokens are dropped
  and each row renormalised over the patches.
  """
  centres = _patch_centres(grid, patch_size)
  distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)  # [patches, patches]
  out = []
  for layer in weights:
    w = np.asarray(layer, np.float64)[:, :, num_prefix:, num_prefix:]
    if w.shape[-1] != len(centres):
      raise ValueError(f"attention over {w.shape[-1]} patches does not match a "
                       f"{grid[0]}x{grid[1]} grid.")
    w = w / w.sum(-1, keepdims=True)
    out.append(np.einsum("bhqk,qk->bhq", w, distance).mean(axis=(0, 2)))
  return np.stack(out)


def rollout(weights: Sequence[np.ndarray], num_prefix: int = 1) -> np.ndarray:
  """[batch, tokens, tokens]: how much each output token draws on each input token through all
  layers, with the residual connection counted as half of each layer (A' = (A + I) / 2, A the
  heads' mean, rows renormalised), multiplied from the first layer to the last."""
  del num_prefix  # every token takes part; the caller picks the rows it wants
  result = None
  for layer in weights:
    a = np.asarray(layer, np.float64).mean(axis=1)
    a = 0.5 * a + 0.5 * np.eye(a.shape[-1])[None]
    a = a / a.sum(-1, keepdims=True)
    result = a if result is None else np.einsum("bij,bjk->bik", a, result)
  return result


def rollout_maps(weights: Sequence[np.ndarray], grid: Tuple[int, int],
                 num_prefix: int = 1) -> np.ndarray:
  """[batch, grid_h, grid_w] in [0, 1]: what the representation draws on, per patch: the class
  token's row of the rollout (with a class token), else the mean over the patches' rows."""
  joint = rollout(weights)
  rows = joint[:, 0] if num_prefix else joint.mean(axis=1)
  maps = rows[:, num_prefix:].reshape(-1, *grid)
  low = maps.min(axis=(1, 2), keepdims=True)
  return (maps - low) / np.maximum(maps.max(axis=(1, 2), keepdims=True) - low, 1e-12)


def overlay(images: np.ndarray, maps: np.ndarray, scale: int = 1) -> Image.Image:
  """One row of image | map over image pairs, per image: images [batch, h, w, 3] in [-1, 1]
  or [0, 255], maps [batch, gh, gw] in [0, 1] (nearest-neighbour upsampled)."""
  images = np.asarray(images, np.float32)
  if images.min() < 0:
    images = (images + 1.0) * 127.5
  images = np.clip(images, 0, 255).astype(np.uint8)
  batch, height, width, _ = images.shape
  gap = 2
  sheet = Image.new("RGB", ((2 * width + 3 * gap) * scale, (batch * (height + gap) + gap) * scale),
                    "white")
  for i in range(batch):
    heat = np.kron(maps[i], np.ones((height // maps.shape[1], width // maps.shape[2])))
    red = np.zeros_like(images[i])
    red[..., 0] = 255
    mixed = (images[i] * (1 - 0.6 * heat[..., None]) + red * 0.6 * heat[..., None])
    y = (gap + i * (height + gap)) * scale
    for j, picture in enumerate((images[i], mixed.astype(np.uint8))):
      tile = Image.fromarray(picture).resize((width * scale, height * scale), Image.NEAREST)
      sheet.paste(tile, ((gap + j * (width + gap)) * scale, y))
  return sheet


def distance_plot(distances: np.ndarray, patch_size: int, image_size: int,
                  size: Tuple[int, int] = (480, 360)) -> Image.Image:
  """The paper's Figure 7: a dot per head at (layer, mean attention distance in pixels), the
  y axis from 0 to the image's diagonal, with tick labels."""
  width, height = size
  left, right, top, bottom = 50, 15, 15, 35
  plot = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(plot)
  layers_, heads = distances.shape
  top_value = float(np.hypot(image_size, image_size))
  x_of = lambda layer: left + (layer + 0.5) * (width - left - right) / layers_
  y_of = lambda value: height - bottom - value / top_value * (height - top - bottom)
  draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], "black")
  for tick in np.linspace(0, top_value, 5):
    draw.line([(left - 4, y_of(tick)), (left, y_of(tick))], "black")
    draw.text((4, y_of(tick) - 6), f"{tick:.0f}", fill="black")
  for layer in range(layers_):
    draw.text((x_of(layer) - 3, height - bottom + 4), str(layer), fill="black")
    for head in range(heads):
      x, y = x_of(layer), y_of(float(distances[layer, head]))
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
  draw.text((left + 4, top), f"mean attention distance (pixels, patch {patch_size}) per head",
            fill="black")
  draw.text((width // 2 - 40, height - 16), "network depth (layer)", fill="black")
  return plot


def attention_weights(model, params, images: np.ndarray, batch_size: int = 64) -> list:
  """[layers][batch, heads, tokens, tokens] numpy: the attention weights of every block of a
  (per-block layout) ViT on `images`, sown by its attention layers on request."""
  import jax  # pylint: disable=g-import-not-at-top  # numpy-only above

  if getattr(model, "scan_layers", False):
    raise ValueError("attention analysis reads the blocks one by one; set "
                     "config.model.scan_layers=False (the checkpoint loads into either layout).")

  @jax.jit
  def sown(images):
    _, state = model.apply({"params": params}, images, mutable=["intermediates"])
    blocks = state["intermediates"]["Transformer"]
    return [blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention_weights"][0]
            for i in range(model.depth)]

  parts = [jax.device_get(sown(images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
  return [np.concatenate([part[layer] for part in parts]) for layer in range(model.depth)]
