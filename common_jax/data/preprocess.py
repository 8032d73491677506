"""Preprocessing ops named in a config string, big_vision style.

    "decode|random_crop(8,pad=1)|flip_lr|value_range(-1,1)"             small images, train
    "decode|inception_crop(224)|flip_lr|value_range(-1,1)"               ImageNet-like, train
    "decode|resize_small(256)|central_crop(224)|value_range(-1,1)"       ImageNet-like, eval

`parse` turns such a string into one function `(example, rng) -> example`; `check` also makes
sure a whole config string starts with `decode` (`pipeline.check_preprocess` is the full check,
every error one sentence naming the config field). Each op name maps, in the `OPS` dict at the
bottom of this file (the whole registry), to a factory: called with the op's literal arguments
it checks them and returns `op(example, rng) -> example`. An example is a dict
of numpy values; "image" is encoded bytes or an array before `decode`, uint8 [height, width, 3]
after it, float32 [height, width, 3] after `value_range`. Random ops draw only from the
`np.random.Generator` they are handed, which the pipeline seeds from (seed, position of the example
in the stream): augmentation is then reproducible and independent of threads or resumption.
Adding an op is a factory plus one line in `OPS`; the loop never changes.
"""

import ast
import inspect
import io
import math
from typing import Any, Callable, Sequence, Union

import numpy as np
import PIL.Image

Example = dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]
Size = Union[int, Sequence[int]]


class BadImageError(ValueError):
  """An image that cannot be decoded. `decode` raises it with the reason only; the pipeline raises
  it again as one sentence naming the file or example, the split and the fix."""


def image_error_reason(error: BaseException) -> str:
  """Why an image reader failed, as a clause for a one-sentence message."""
  if isinstance(error, PIL.UnidentifiedImageError):
    return "PIL recognises no image format in it"
  text = " ".join(str(error).split()).rstrip(".").replace(". ", "; ")
  text = text or type(error).__name__
  return text if len(text) <= 200 else text[:200] + "..."


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _height_width(size: Size) -> tuple[int, int]:
  """An int (square) or [height, width] -> (height, width), both positive ints."""
  if _is_int(size):
    height, width = size, size
  elif isinstance(size, (list, tuple)) and len(size) == 2:
    height, width = size
  else:
    height = width = None
  if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
    raise ValueError(f"size must be a positive int or [height, width] of positive ints, "
                     f"got {size!r}")
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
                     "resize first (resize_small keeps the aspect ratio) or crop smaller.")
  return image[top:top + height, left:left + width]


def decode() -> Op:
  """Encoded bytes (PNG/JPEG/...) or a uint8 array -> "image" uint8 [height, width, 3] (RGB).

  Bytes no image reader can decode raise `BadImageError` with the reason; the pipeline names the
  file or example.
  """
  def op(example, rng):
    image = example["image"]
    if isinstance(image, np.ndarray) and image.dtype == object:
      image = image.item()
    if isinstance(image, bytes):
      try:
        with PIL.Image.open(io.BytesIO(image)) as pil_image:
          image = np.asarray(pil_image.convert("RGB"))
      except Exception as error:  # pylint: disable=broad-except  # OSError, SyntaxError, zlib...
        raise BadImageError(image_error_reason(error)) from None
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
  if not (_is_int(size) and size > 0):
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
  if not (_is_int(pad) and pad >= 0):
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
  if not (_is_number(area_min) and _is_number(area_max) and 0 < area_min <= area_max <= 100):
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
  values = dict(vmin=vmin, vmax=vmax, in_min=in_min, in_max=in_max)
  for name, value in values.items():
    if not _is_number(value):
      raise ValueError(f"{name} must be a finite number, got {value!r}")
  if vmin == vmax:
    raise ValueError(f"vmin and vmax must differ (both are {vmin}), or every pixel becomes {vmin}")
  if in_max == in_min:
    raise ValueError(f"in_min and in_max must differ (both are {in_min})")
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


def usage(name: str) -> str:
  """"random_crop(size, pad=0)": an op's arguments as a config string writes them."""
  parameters = inspect.signature(OPS[name]).parameters.values()
  arguments = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in parameters]
  return f"{name}({', '.join(arguments)})"


def _parse_op(text: str, spec: str, field: str) -> tuple[str, Op]:
  """One op string, `name` or `name(literal args)`, -> (name, the op the factory returns)."""
  where = f"{field}={spec!r} has the op {text!r}"
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError:
    node = None
  if isinstance(node, ast.Name):
    name, call = node.id, ast.Call(func=node, args=[], keywords=[])
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name, call = node.func.id, node
  else:
    raise ValueError(f"{where}, which is not of the form name or name(args) (ops are separated "
                     "by '|'); write for example 'decode|resize(224)|value_range(-1,1)'.")
  if name not in OPS:
    raise ValueError(f"{where}, which is unknown; known ops are {', '.join(OPS)}.")
  try:
    args = [ast.literal_eval(arg) for arg in call.args]
    kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
  except ValueError:
    raise ValueError(f"{where}, with an argument that is not a plain number or list; the op "
                     f"is {usage(name)}.") from None
  try:
    inspect.signature(OPS[name]).bind(*args, **kwargs)
  except TypeError as error:
    raise ValueError(f"{where}, whose arguments do not fit: {error}; the op is "
                     f"{usage(name)}.") from None
  try:
    return name, OPS[name](*args, **kwargs)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{where}, with a bad argument: {error}; the op is {usage(name)}.") from None


def parse_ops(spec: str, field: str = "preprocess") -> list[tuple[str, Op]]:
  """"op1|op2(args)|..." -> [(op name, op)], each op checked; errors name `field`."""
  if not isinstance(spec, str):
    raise ValueError(f"{field}={spec!r} is not a string; write ops separated by '|', such as "
                     "'decode|value_range(-1,1)'.")
  if not spec.strip():
    raise ValueError(f"{field} is empty; start it with 'decode', as in "
                     "'decode|value_range(-1,1)'.")
  return [_parse_op(text.strip(), spec, field) for text in spec.split("|")]


def parse(spec: str, field: str = "preprocess") -> Op:
  """"op1|op2(args)|..." -> one function (example, rng) -> example applying the ops in order.

  Only the ops themselves are checked (a single op such as "inception_crop(224)" parses);
  `check` adds what a whole pipeline string needs.

  Raises:
    ValueError naming `field` and the op string, for an unknown op, a syntax error or bad
    arguments.
  """
  ops = [op for _, op in parse_ops(spec, field)]

  def preprocess(example: Example, rng: np.random.Generator) -> Example:
    for op in ops:
      example = op(example, rng)
    return example
  return preprocess


def check(spec: str, field: str) -> list[str]:
  """Checks a pipeline string as `config.preprocess_*` holds it; returns the op names.

  Besides `parse`'s checks: it starts with `decode` (which turns what a dataset stores, encoded
  bytes or an array, into uint8 RGB), and `decode` appears only there.

  Raises:
    ValueError, one sentence naming `field`, the op and the fix.
  """
  names = [name for name, _ in parse_ops(spec, field)]
  if names[0] != "decode":
    raise ValueError(f"{field}={spec!r} starts with {spec.split('|')[0].strip()!r}; start it "
                     f"with 'decode', which turns the stored image into uint8 RGB, as in "
                     f"'decode|{spec.strip()}'.")
  if "decode" in names[1:]:
    raise ValueError(f"{field}={spec!r} decodes twice; keep only the first 'decode' (a later one "
                     "would cast processed pixels back to uint8).")
  return names
