"""Preprocessing ops named in a config string, big_vision style.

    "decode|random_crop(8,pad=1)|flip_lr|value_range(-1,1)"             small images, train
    "decode|inception_crop(224)|flip_lr|value_range(-1,1)"               ImageNet-like, train
    "decode|resize_small(256)|central_crop(224)|value_range(-1,1)"       ImageNet-like, eval

`parse` turns such a string into one function `(example, rng) -> example`. Each op name maps, in
the `OPS` dict at the bottom of this file (the whole registry), to a factory: called with the op's
literal arguments it checks them and returns `op(example, rng) -> example`. An example is a dict
of numpy values; "image" is encoded bytes or an array before `decode`, uint8 [height, width, 3]
after it, float32 [height, width, 3] after `value_range`. Random ops draw only from the
`np.random.Generator` they are handed, which the pipeline seeds from (seed, position of the example
in the stream): augmentation is then reproducible and independent of threads or resumption.
Adding an op is a factory plus one line in `OPS`; the loop never changes.
"""

import ast
import io
import math
from typing import Any, Callable, Sequence, Union

import numpy as np
import PIL.Image

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]
Size = Union[int, Sequence[int]]


def _height_width(size: Size) -> tuple[int, int]:
  """An int (square) or [height, width] -> (height, width), both positive ints."""
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
    raise ValueError(f"size must be a positive int or [height, width], got {size!r}")
  return height, width


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of [h, w, c] to [height, width, c], same dtype."""
  if image.dtype == np.uint8:
    return np.asarray(PIL.Image.fromarray(image).resize((width, height), PIL.Image.BILINEAR))
  # PIL resizes float images one channel at a time (mode "F").
  channels = [PIL.Image.fromarray(image[:, :, c].astype(np.float32)).resize(
      (width, height), PIL.Image.BILINEAR) for c in range(image.shape[2])]
  return np.stack([np.asarray(c) for c in channels], axis=2).astype(image.dtype)


def _crop(image: np.ndarray, top: int, left: int, height: int, width: int, name: str) -> np.ndarray:
  if height > image.shape[0] or width > image.shape[1]:
    raise ValueError(f"{name} of {height}x{width} does not fit an image of shape {image.shape}; "
                     "resize first (e.g. resize_small) or crop smaller.")
  return image[top:top + height, left:left + width]


def decode() -> Op:
  """Encoded bytes (PNG/JPEG/...) or a uint8 array -> "image" uint8 [height, width, 3] (RGB)."""
  def op(example, rng):
    image = example["image"]
    if isinstance(image, np.ndarray) and image.dtype == object:
      image = image.item()
    if isinstance(image, bytes):
      with PIL.Image.open(io.BytesIO(image)) as pil_image:
        image = np.asarray(pil_image.convert("RGB"))
    else:
      image = np.asarray(image, np.uint8)
      if image.ndim == 2:
        image = image[:, :, None]
      # Grey becomes RGB so that every dataset yields 3 channels; an alpha channel is dropped.
      image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]
    return {**example, "image": image}
  return op


def resize(size: Size) -> Op:
  """Resizes to `size` (int: square, or [height, width]) ignoring the aspect ratio."""
  height, width = _height_width(size)
  return lambda example, rng: {**example, "image": _resize(example["image"], height, width)}


def resize_small(size: int) -> Op:
  """Resizes, keeping the aspect ratio, so that the shorter side is `size`."""
  if not (isinstance(size, int) and size > 0):
    raise ValueError(f"size must be a positive int, got {size!r}")
  def op(example, rng):
    image = example["image"]
    scale = size / min(image.shape[0], image.shape[1])
    height, width = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    return {**example, "image": _resize(image, height, width)}
  return op


def central_crop(size: Size) -> Op:
  """Crops the central `size` (int: square, or [height, width])."""
  height, width = _height_width(size)
  def op(example, rng):
    image = example["image"]
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return {**example, "image": _crop(image, top, left, height, width, "central_crop")}
  return op


def random_crop(size: Size, pad: int = 0) -> Op:
  """Zero-pads each border by `pad` pixels, then crops `size` at a uniformly random offset."""
  height, width = _height_width(size)
  if not (isinstance(pad, int) and pad >= 0):
    raise ValueError(f"pad must be a non-negative int, got {pad!r}")
  def op(example, rng):
    image = np.pad(example["image"], ((pad, pad), (pad, pad), (0, 0)))
    top = int(rng.integers(0, max(image.shape[0] - height, 0) + 1))
    left = int(rng.integers(0, max(image.shape[1] - width, 0) + 1))
    return {**example, "image": _crop(image, top, left, height, width, "random_crop")}
  return op


def inception_crop(size: Size, area_min: float = 5, area_max: float = 100) -> Op:
  """Inception-style crop: a random box of `area_min`..`area_max` percent of the image area and
  aspect ratio in [3/4, 4/3] (log-uniform), resized to `size`; the whole image after 10 misses."""
  height, width = _height_width(size)
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"need 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}")
  def op(example, rng):
    image = example["image"]
    image_height, image_width = image.shape[:2]
    box = (0, 0, image_height, image_width)
    for _ in range(10):
      area = image_height * image_width * rng.uniform(area_min, area_max) / 100
      aspect_ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))  # width / height
      crop_width = round(math.sqrt(area * aspect_ratio))
      crop_height = round(math.sqrt(area / aspect_ratio))
      if 0 < crop_height <= image_height and 0 < crop_width <= image_width:
        top = int(rng.integers(0, image_height - crop_height + 1))
        left = int(rng.integers(0, image_width - crop_width + 1))
        box = (top, left, crop_height, crop_width)
        break
    image = _crop(image, *box, "inception_crop")
    return {**example, "image": _resize(image, height, width)}
  return op


def flip_lr() -> Op:
  """Mirrors the image left-right with probability 1/2."""
  def op(example, rng):
    if rng.random() < 0.5:
      return {**example, "image": example["image"][:, ::-1]}
    return example
  return op


def value_range(vmin: float = -1, vmax: float = 1, in_min: float = 0, in_max: float = 255) -> Op:
  """Maps pixel values linearly from [in_min, in_max] to [vmin, vmax]; "image" becomes float32."""
  if in_max == in_min:
    raise ValueError("in_min and in_max must differ")
  scale = (vmax - vmin) / (in_max - in_min)
  def op(example, rng):
    # vmin + (image - in_min) * scale in float32, computed inside one fresh array: written as an
    # expression it allocates four float32 temporaries per image (600 kB each at 224x224).
    # Same operations in the same order, so the same bits (tests/test_data.py checks).
    image = np.array(example["image"], np.float32)  # a copy: the input is never written
    np.subtract(image, in_min, out=image)
    np.multiply(image, scale, out=image)
    np.add(image, vmin, out=image)
    return {**example, "image": image}
  return op


OPS: dict[str, Callable[..., Op]] = {
    "decode": decode,
    "resize": resize,
    "resize_small": resize_small,
    "central_crop": central_crop,
    "random_crop": random_crop,
    "inception_crop": inception_crop,
    "flip_lr": flip_lr,
    "value_range": value_range,
}


def _parse_op(text: str, spec: str) -> Op:
  """One op string, `name` or `name(literal args)`, -> the op the factory returns."""
  where = f"preprocess op {text!r} in {spec!r}"
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError:
    node = None
  if isinstance(node, ast.Name):
    name, call = node.id, ast.Call(func=node, args=[], keywords=[])
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, call = node.func.id, node
  else:
    raise ValueError(f"{where} is not of the form name or name(args); write e.g. 'resize(224)'.")
  if name not in OPS:
    raise ValueError(f"{where} names an unknown op; known ops are {', '.join(OPS)}.")
  try:
    args = [ast.literal_eval(arg) for arg in call.args]
    kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
  except ValueError:
    raise ValueError(f"{where} has an argument that is not a literal number, string or list; "
                     "write the value itself.") from None
  try:
    return OPS[name](*args, **kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{where} has bad arguments: {error}.") from None


def parse(spec: str) -> Op:
  """"op1|op2(args)|..." -> one function (example, rng) -> example applying the ops in order.

  Raises:
    ValueError naming the op string, for an unknown op, a syntax error or bad arguments.
  """
  if not spec.strip():
    raise ValueError("the preprocess string is empty; start it with 'decode', e.g. "
                     "'decode|value_range(-1,1)'.")
  ops = [_parse_op(text.strip(), spec) for text in spec.split("|")]

  def preprocess(example: Example, rng: np.random.Generator) -> Example:
    for op in ops:
      example = op(example, rng)
    return example
  return preprocess
