"""The preprocessing ops themselves (`common_jax.data.preprocess` names them in config strings
and parses the strings): each a factory that checks its literal arguments and returns
`op(example, rng) -> example`, on numpy images.

JPEG files are decoded by simplejpeg (libjpeg-turbo straight into RGB: the pixels PIL gives,
with fewer copies); CMYK JPEGs, other formats and unreadable files by PIL, whose message says
what is wrong. Resizes and flips are OpenCV's. Resizes follow the reference pipelines (big_vision,
vision_transformer, both tf.image.resize): bilinear with half-pixel centres for `resize` and
`inception_crop`, area averaging where `resize_small` shrinks; `method=` chooses the other.
Crops are numpy views. An op that sets the image size carries it as `op.output_size`
((height, width), or None where it depends on the image), so a string's size is known unread.
"""

import io
import math
from typing import Any, Callable, Sequence, Union

import cv2
import numpy as np
import PIL.Image
import simplejpeg

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


# The image dtypes the OpenCV resizes and flips here take as they are.
_OPENCV_DTYPES = (np.uint8, np.float32)


def _resize(image: np.ndarray, height: int, width: int, area: bool) -> np.ndarray:
  """[h, w, c] -> [height, width, c], the same dtype: bilinear (half-pixel centres, edge pixels
  repeated), or with `area` area averaging where neither side grows."""
  if image.shape[:2] == (height, width):
    return image
  shrinks = area and height <= image.shape[0] and width <= image.shape[1]
  dtype = image.dtype
  if dtype not in _OPENCV_DTYPES:  # others go through float32
    image = image.astype(np.float32)
  resized = cv2.resize(image, (width, height),
                       interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR)
  # OpenCV drops a single channel's axis.
  return resized.reshape(height, width, image.shape[2]).astype(dtype, copy=False)


def _check_fits(shape: tuple[int, ...], height: int, width: int, name: str) -> None:
  if height > shape[0] or width > shape[1]:
    raise ValueError(f"{name} of {height}x{width} does not fit an image of shape {shape}; "
                     "resize first (resize_small keeps the aspect ratio) or crop smaller.")


def _crop(image: np.ndarray, top: int, left: int, height: int, width: int, name: str) -> np.ndarray:
  _check_fits(image.shape, height, width, name)
  return image[top:top + height, left:left + width]


_JPEG_START = b"\xff\xd8\xff"


def _open(encoded: bytes) -> np.ndarray:
  """Encoded bytes -> uint8 [height, width, 3] RGB; `BadImageError` with the reason."""
  if encoded[:3] == _JPEG_START:
    try:
      # libjpeg-turbo straight into RGB, warnings being errors; it ignores EXIF rotation, as PIL.
      # CMYK and YCCK files are left to PIL, whose conversion to RGB differs by a level or so.
      if simplejpeg.decode_jpeg_header(encoded)[2] in ("YCbCr", "Gray", "RGB"):
        return simplejpeg.decode_jpeg(encoded, colorspace="RGB")
    except ValueError:
      pass  # truncated or corrupt: PIL says why
  try:
    with PIL.Image.open(io.BytesIO(encoded)) as pil_image:
      pil_image.load()
      return np.asarray(pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB"))
  except Exception as error:  # pylint: disable=broad-except  # OSError, SyntaxError, zlib...
    raise BadImageError(image_error_reason(error)) from None


def _array_to_rgb(image: Any) -> np.ndarray:
  image = np.asarray(image, np.uint8)
  if image.ndim == 2:
    image = image[:, :, None]
  # Grey becomes RGB so that every dataset yields 3 channels; an alpha channel is dropped.
  return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[:, :, :3]


def _stored(example: Example) -> Any:
  image = example["image"]
  if isinstance(image, np.ndarray) and image.dtype == object:
    image = image.item()
  return image


def decode() -> Op:
  """Encoded bytes (PNG/JPEG/...) or a uint8 array -> "image" uint8 [height, width, 3] (RGB).

  Bytes no image reader can decode raise `BadImageError` with the reason; the pipeline names the
  file or example.
  """
  def op(example, rng):
    image = _stored(example)
    if isinstance(image, bytes):
      return {**example, "image": _open(image)}
    return {**example, "image": _array_to_rgb(image)}
  return op


_METHODS = ("bilinear", "area")


def _check_method(method: Any) -> bool:
  """Whether `method` asks for area averaging; a ValueError for a method that is not known."""
  if method not in _METHODS:
    raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
  return method == "area"


def resize(size: Size, method: str = "bilinear") -> Op:
  """Resizes to `size` (int: square, or [height, width]) ignoring the aspect ratio: bilinear, as
  big_vision's and vision_transformer's tf.image.resize; method='area' averages areas where both
  sides shrink (as box-downsampled ImageNet 32x32 and 64x64 are made; bilinear where a side
  grows)."""
  height, width = _height_width(size)
  area = _check_method(method)
  def op(example, rng):
    return {**example, "image": _resize(example["image"], height, width, area)}
  op.output_size = (height, width)
  return op


def resize_small(size: int, method: str = "area") -> Op:
  """Resizes, keeping the aspect ratio, so that the shorter side is `size`: area averaging where
  it shrinks, bilinear where it grows (big_vision's resize_small default), or method='bilinear'."""
  if not (_is_int(size) and size > 0):
    raise ValueError(f"size must be a positive int, got {size!r}")
  area = _check_method(method)
  def new_size(image_height, image_width):
    scale = size / min(image_height, image_width)
    return max(1, round(image_height * scale)), max(1, round(image_width * scale))
  def op(example, rng):
    image = example["image"]
    return {**example, "image": _resize(image, *new_size(*image.shape[:2]), area)}
  op.output_size = None  # the longer side follows each image's aspect ratio
  return op


def central_crop(size: Size) -> Op:
  """Crops the central `size` (int: square, or [height, width])."""
  height, width = _height_width(size)
  def op(example, rng):
    image = example["image"]
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return {**example, "image": _crop(image, top, left, height, width, "central_crop")}
  op.output_size = (height, width)
  return op


def random_crop(size: Size, pad: int = 0) -> Op:
  """Zero-pads each border by `pad` pixels, then crops `size` at a uniformly random offset."""
  height, width = _height_width(size)
  if not (_is_int(pad) and pad >= 0):
    raise ValueError(f"pad must be a non-negative int, got {pad!r}")
  def op(example, rng):
    image = example["image"]
    if pad:  # np.pad's own work costs 19 us on an 8x8 image, this 1 us
      padded = np.zeros((image.shape[0] + 2 * pad, image.shape[1] + 2 * pad) + image.shape[2:],
                        image.dtype)
      padded[pad:pad + image.shape[0], pad:pad + image.shape[1]] = image
      image = padded
    top = int(rng.integers(0, max(image.shape[0] - height, 0) + 1))
    left = int(rng.integers(0, max(image.shape[1] - width, 0) + 1))
    return {**example, "image": _crop(image, top, left, height, width, "random_crop")}
  op.output_size = (height, width)
  return op


def inception_crop(size: Size, area_min: float = 5, area_max: float = 100) -> Op:
  """Inception-style crop: a random box of `area_min`..`area_max` percent of the image area and
  aspect ratio in [3/4, 4/3] (log-uniform), resized to `size` (bilinear, growing or shrinking,
  as the reference pipelines' tf.image.resize); the whole image after 10 misses."""
  height, width = _height_width(size)
  if not (_is_number(area_min) and _is_number(area_max) and 0 < area_min <= area_max <= 100):
    raise ValueError(f"need 0 < area_min <= area_max <= 100 (percent), got {area_min}, {area_max}")
  def box(rng, image_height, image_width):
    """(top, left, height, width) of the crop."""
    for _ in range(10):
      area = image_height * image_width * rng.uniform(area_min, area_max) / 100
      aspect_ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))  # width / height
      crop_width = round(math.sqrt(area * aspect_ratio))
      crop_height = round(math.sqrt(area / aspect_ratio))
      if 0 < crop_height <= image_height and 0 < crop_width <= image_width:
        top = int(rng.integers(0, image_height - crop_height + 1))
        left = int(rng.integers(0, image_width - crop_width + 1))
        return top, left, crop_height, crop_width
    return 0, 0, image_height, image_width
  def op(example, rng):
    image = example["image"]
    image = _crop(image, *box(rng, *image.shape[:2]), "inception_crop")
    return {**example, "image": _resize(image, height, width, area=False)}
  op.output_size = (height, width)
  return op


def flip_lr() -> Op:
  """Mirrors the image left-right with probability 1/2."""
  def op(example, rng):
    if rng.random() < 0.5:
      image = example["image"]
      # OpenCV's flip writes a contiguous copy (the batch then copies it at memory speed; a
      # mirrored numpy view copies pixel by pixel, slower than the resize).
      flipped = (cv2.flip(image, 1).reshape(image.shape) if image.dtype in _OPENCV_DTYPES
                 else image[:, ::-1])
      return {**example, "image": flipped}
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
  def into(image, out):
    # vmin + (image - in_min) * scale in float32, written into `out`: each ufunc casts its input
    # to float32 as it reads it, so no temporaries (written as an expression, four float32 arrays
    # of 600 kB at 224x224). The same operations in the same order, so the same bits
    # (tests/test_data.py checks); subtracting 0 changes no float, so it is left out.
    if in_min != 0:
      np.subtract(image, in_min, out=out, dtype=np.float32)
      np.multiply(out, scale, out=out)
    else:
      np.multiply(image, scale, out=out, dtype=np.float32)
    np.add(out, vmin, out=out)
  def op(example, rng):
    image = example["image"]
    out = np.empty(np.shape(image), np.float32)  # the input is never written
    into(image, out)
    return {**example, "image": out}
  op.into = into  # the pipeline writes a final value_range straight into the batch
  return op
