"""RandAugment (Cubuk et al. 2020, arXiv:1909.13719) as the preprocessing op `randaugment(n, m)`,
after big_vision's `pp/autoaugment.py` (from the TPU EfficientNet code), which ran the AugReg
recipes ("How to train your ViT": randaug(2,0), (2,10), (2,15), (2,20)). Our own code, with PIL.

Each image gets `n` operations in a row, each drawn uniformly from the 16 below (big_vision's
list, which has Invert, Cutout and SolarizeAdd and no Identity), each at the one magnitude `m`.
The arguments are big_vision's, with level = m / 10 (its _MAX_LEVEL is 10; above m = 10 they
extrapolate as there); "±" is a random sign, drawn for each use:

    AutoContrast, Equalize, Invert   no argument: m changes nothing
    Rotate                           ±30·level degrees
    ShearX, ShearY                   ±0.3·level (x += shear·y, or y += shear·x)
    TranslateX, TranslateY           ±level·100/224 of the width or height (big_vision: 100
                                     pixels, after crops to 224; a fraction here, for any size)
    Posterize                        keep the top int(4·level) bits (0: black; 8 or more, from
                                     m = 20: unchanged; big_vision's shift is undefined above 20)
    Solarize                         invert the pixels >= int(256·level) (m = 0: all; m >= 10:
                                     none, so AugReg's m = 15 and 20 never solarize)
    SolarizeAdd                      add int(110·level) to the pixels < 128, up to 255
    Color, Contrast, Brightness,     PIL's ImageEnhance with factor 0.1 + 1.8·level (m = 5: none)
      Sharpness
    Cutout                           a grey box int(level·40/224·side) pixels each way from a
                                     random pixel (big_vision: 40 pixels at 224), cut at the edges

So m = 0 is not a no-op (big_vision's configs say of randaug(2,0): "Actually not nothing!"): the
geometric ops and Cutout do nothing there, but Posterize blackens, Solarize and Invert invert
and the four enhancers blend 90% towards their degenerate image. Geometric ops take the nearest
pixel and fill with grey 128, as big_vision's. Not copied: its Contrast blends towards a constant
(pixel count)/256, a bug; ours towards the mean grey level, as PIL's ImageEnhance.Contrast does.
"""

from typing import Callable

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps

from common_jax.data.ops import Op, _is_int, _is_number

MAX_MAGNITUDE = 30
GREY = (128, 128, 128)

Transform = Callable[[PIL.Image.Image, np.random.Generator], PIL.Image.Image]


def _sign(rng: np.random.Generator) -> int:
  return -1 if rng.random() < 0.5 else 1


def _lut(table: list[int]) -> Transform:
  """A per-pixel map of 0..255 applied to each channel of an RGB image."""
  return lambda image, rng: image.point(table * 3)


def _affine(image: PIL.Image.Image, coefficients: tuple[float, ...]) -> PIL.Image.Image:
  """Output pixel (x, y) takes the input's nearest to (a·x + b·y + c, d·x + e·y + f)."""
  return image.transform(image.size, PIL.Image.Transform.AFFINE, coefficients,
                         resample=PIL.Image.Resampling.NEAREST, fillcolor=GREY)


def _enhance(enhancer: type, factor: float) -> Transform:
  return lambda image, rng: enhancer(image).enhance(factor)


def _cutout(level: float) -> Transform:
  def cutout(image, rng):
    # The centre is drawn even for an empty box, so the draws do not depend on m.
    row, column = int(rng.integers(0, image.height)), int(rng.integers(0, image.width))
    pad_height = int(level * 40 * image.height / 224)
    pad_width = int(level * 40 * image.width / 224)
    if pad_height == 0 or pad_width == 0:
      return image
    image = image.copy()  # paste() writes in place; the caller's image stays as it was
    box = (max(0, column - pad_width), max(0, row - pad_height),
           min(image.width, column + pad_width), min(image.height, row + pad_height))
    image.paste(GREY, box)
    return image
  return cutout


def operations(m: float) -> dict[str, Transform]:
  """The 16 operations at magnitude `m`, by big_vision's names: each (RGB PIL image, rng) ->
  RGB PIL image of the same size; the signed ones draw their sign from the rng."""
  level = m / 10
  degrees, shear, translate = 30 * level, 0.3 * level, level * 100 / 224
  bits = min(8, int(4 * level))
  threshold, addition, factor = int(256 * level), int(110 * level), 0.1 + 1.8 * level
  return {
      "AutoContrast": lambda image, rng: PIL.ImageOps.autocontrast(image),
      "Equalize": lambda image, rng: PIL.ImageOps.equalize(image),
      "Invert": lambda image, rng: PIL.ImageOps.invert(image),
      "Rotate": lambda image, rng: image.rotate(
          _sign(rng) * degrees, resample=PIL.Image.Resampling.NEAREST, fillcolor=GREY),
      "Posterize": _lut([(i >> (8 - bits)) << (8 - bits) for i in range(256)]),
      "Solarize": _lut([i if i < threshold else 255 - i for i in range(256)]),
      "Color": _enhance(PIL.ImageEnhance.Color, factor),
      "Contrast": _enhance(PIL.ImageEnhance.Contrast, factor),
      "Brightness": _enhance(PIL.ImageEnhance.Brightness, factor),
      "Sharpness": _enhance(PIL.ImageEnhance.Sharpness, factor),
      "ShearX": lambda image, rng: _affine(image, (1, _sign(rng) * shear, 0, 0, 1, 0)),
      "ShearY": lambda image, rng: _affine(image, (1, 0, 0, _sign(rng) * shear, 1, 0)),
      "TranslateX": lambda image, rng: _affine(
          image, (1, 0, _sign(rng) * translate * image.width, 0, 1, 0)),
      "TranslateY": lambda image, rng: _affine(
          image, (1, 0, 0, 0, 1, _sign(rng) * translate * image.height)),
      "Cutout": _cutout(level),
      "SolarizeAdd": _lut([min(255, i + addition) if i < 128 else i for i in range(256)]),
  }


def randaugment(n: int, m: float) -> Op:
  """RandAugment: `n` operations, each drawn uniformly from `operations(m)`, at magnitude `m`
  (0 to 30; big_vision's scale, on which AugReg used 0, 10, 15 and 20).

  "image" is uint8 [height, width, 3] in and out, the same size: put it after `decode` and the
  crops and before `value_range`, as in "decode|inception_crop(224)|flip_lr|randaugment(2,15)|
  value_range(-1,1)". It draws only from the rng it is handed: per operation the choice, then the
  sign or the Cutout centre where the operation has one.
  """
  if not (_is_int(n) and n >= 0):
    raise ValueError(f"n (the number of operations per image) must be a non-negative int, "
                     f"got {n!r}")
  if not (_is_number(m) and 0 <= m <= MAX_MAGNITUDE):
    raise ValueError(f"m (the magnitude) must be a number from 0 to {MAX_MAGNITUDE}, got {m!r}")
  transforms = list(operations(m).values())

  def transform(image: PIL.Image.Image, rng: np.random.Generator) -> PIL.Image.Image:
    for _ in range(n):
      image = transforms[int(rng.integers(0, len(transforms)))](image, rng)
    return image

  def op(example, rng):
    image = example["image"]
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
      raise ValueError(f"randaugment needs uint8 [height, width, 3] images as decode gives them, "
                       f"got {getattr(image, 'dtype', type(image).__name__)} of shape "
                       f"{np.shape(image)}; put it after decode and before value_range.")
    if n == 0:
      return example
    return {**example, "image": np.asarray(transform(PIL.Image.fromarray(image), rng))}

  return op
