"""The input pipeline: builders, preprocessing ops, determinism, resume, sharding, eval coverage."""

import collections
import io
import os
import re
import sys
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from common_jax import data

AUGMENT = "decode|random_crop(8,pad=1)|flip_lr|value_range(-1,1)"
PLAIN = "decode|value_range(-1,1)"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data.get_builder("sklearn_digits", data_dir)
  return data_dir


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def row_keys(batches):
  """Multiset of the real rows (image bytes, label) of batches, for coverage comparisons."""
  keys = collections.Counter()
  for batch in batches:
    mask = batch.get("mask", np.ones(len(batch["label"])))
    for image, label, real in zip(batch["image"], batch["label"], mask):
      if real:
        keys[(image.tobytes(), int(label))] += 1
  return keys


def split_keys(data_dir, split, dataset="sklearn_digits"):
  return row_keys(data.eval_iterator(dataset=dataset, split=split, preprocess=PLAIN,
                                     global_batch_size=500, data_dir=data_dir))


def test_digits_builder_has_all_real_digits_in_a_fixed_stratified_split(digits_dir, tmp_path):
  from sklearn.datasets import load_digits
  info = data.dataset_info("sklearn_digits", digits_dir)
  assert info.num_classes == 10 and info.image_shape == (8, 8, 3)
  assert info.splits == {"train": 1442, "test": 355}
  train, test = split_keys(digits_dir, "train"), split_keys(digits_dir, "test")
  # Every scikit-learn digit is in exactly one split (up to digits that are pixel-identical).
  digits = load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.float32) * (2 / 255) - 1
  expected = collections.Counter(
      (np.repeat(image[:, :, None], 3, axis=2).astype(np.float32).tobytes(), int(label))
      for image, label in zip(images, digits.target))
  assert train + test == expected
  test_per_class = collections.Counter(label for _, label in test.elements())
  all_per_class = collections.Counter(digits.target.tolist())
  assert all(abs(test_per_class[c] - all_per_class[c] / 5) < 1 for c in range(10))
  # A second build elsewhere gives the same split, in the same order.
  other_dir = str(tmp_path / "other")
  first = data.get_builder("sklearn_digits", digits_dir).as_data_source("test")
  second = data.get_builder("sklearn_digits", other_dir).as_data_source("test")
  assert all(np.array_equal(first[i]["image"], second[i]["image"])
             and first[i]["label"] == second[i]["label"] for i in range(len(first)))


def test_train_batches_have_the_documented_shapes_dtypes_and_ranges(digits_dir):
  batch = next(data.train_iterator(dataset="sklearn_digits", split="train", preprocess=AUGMENT,
                                   global_batch_size=512, seed=0, data_dir=digits_dir))
  assert batch["image"].shape == (512, 8, 8, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (512,) and batch["label"].dtype == np.int32
  assert batch["image"].min() == -1 and batch["image"].max() == 1
  assert set(batch["label"].tolist()) == set(range(10))


@pytest.mark.parametrize("spec, fragment", [
    ("decode|nope(3)", "'nope(3)'"),
    ("decode|resize()", "'resize()'"),
    ("decode|resize(-3)", "'resize(-3)'"),
    ("decode|random_crop(8, padd=1)", "'random_crop(8, padd=1)'"),
    ("decode|value_range(low)", "'value_range(low)'"),
    ("decode|resize(224", "'resize(224'"),
    ("", "empty"),
])
def test_bad_preprocess_strings_raise_one_error_naming_the_op(spec, fragment):
  with pytest.raises(ValueError, match="preprocess") as error:
    data.parse_preprocess(spec)
  assert fragment in str(error.value)


def _bilinear(image, height, width):
  """A plain bilinear resize in float64: half-pixel centres, edge pixels repeated."""
  def axis(size_in, size_out):
    x = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
    low = np.floor(x).astype(int)
    return low, np.minimum(low + 1, size_in - 1), x - low
  (top, bottom, wy), (left, right, wx) = axis(image.shape[0], height), axis(image.shape[1], width)
  image = image.astype(np.float64)
  rows = image[top] * (1 - wy)[:, None, None] + image[bottom] * wy[:, None, None]
  return rows[:, left] * (1 - wx)[None, :, None] + rows[:, right] * wx[None, :, None]


def test_resizes_are_bilinear_or_area_means_as_the_reference_pipelines():
  """resize and inception_crop: bilinear, as tf.image.resize in big_vision and vision_transformer;
  resize_small (and method='area'): area means where both sides shrink, bilinear where one grows
  (big_vision's resize_small). For uint8 and float32 images."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 18, 3), np.uint8)
  apply = lambda spec, image: data.parse_preprocess(spec)({"image": image}, rng)["image"]
  for height, width in [(30, 40), (12, 27), (25, 18), (8, 27), (5, 7)]:
    expected = _bilinear(image, height, width)
    for method in ("", ",method='area'") if (height, width) != (5, 7) else ("",):
      out = apply(f"resize(({height},{width}){method})", image)
      assert out.dtype == np.uint8 and out.shape == (height, width, 3)
      np.testing.assert_allclose(out, expected, rtol=0, atol=1)  # uint8 rounding
      out = apply(f"resize(({height},{width}){method})", image.astype(np.float32))
      assert out.dtype == np.float32
      np.testing.assert_allclose(out, expected, rtol=0, atol=1e-3)
  # Both sides shrink by whole factors: each pixel the mean of its 2x3 block, rounded for uint8.
  blocks = image.reshape(6, 2, 6, 3, 3).astype(np.float64).mean(axis=(1, 3))
  np.testing.assert_allclose(apply("resize(6,method='area')", image), blocks, rtol=0, atol=0.5)
  np.testing.assert_allclose(apply("resize(6,method='area')", image.astype(np.float32)), blocks,
                             rtol=0, atol=1e-4)
  small = image.reshape(6, 2, 9, 2, 3).astype(np.float64).mean(axis=(1, 3))  # 6x9: 2x2 blocks
  np.testing.assert_allclose(apply("resize_small(6)", image), small, rtol=0, atol=0.5)
  np.testing.assert_allclose(apply("resize_small(6,method='bilinear')", image),
                             _bilinear(image, 6, 9), rtol=0, atol=1)
  assert np.abs(apply("resize_small(5)", image) - _bilinear(image, 5, 8)).max() > 5  # not 2x
  # inception_crop resizes bilinearly even where it shrinks (the whole 12x12 image to 5x5 here).
  square = image[:, :12]
  np.testing.assert_allclose(apply("inception_crop(5,area_min=100)", square),
                             _bilinear(square, 5, 5), rtol=0, atol=1)
  with pytest.raises(ValueError, match="method must be one of 'bilinear', 'area', got 'cubic'"):
    data.parse_preprocess("resize(5,method='cubic')")


def test_jpeg_decodes_to_the_pixels_pil_gives_ignoring_exif_rotation():
  """JPEGs give PIL's pixels (RGB and grey ones decoded by simplejpeg, CMYK ones by PIL), and an
  EXIF orientation is ignored, as PIL and tf.io.decode_jpeg ignore it."""
  rotated = io.BytesIO()
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees to display"
  PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 30, 3), np.uint8)).save(
      rotated, format="JPEG", exif=exif)
  cmyk = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), np.uint8)).convert(
      "CMYK").save(cmyk, format="JPEG")
  files = [f for f in encoded_images() if "JPEG" in f[0]] + [("EXIF-rotated", rotated.getvalue()),
                                                             ("CMYK", cmyk.getvalue())]
  assert len(files) == 5
  opened = []
  real_open = PIL.Image.open
  def counting_open(*args, **kwargs):
    opened.append(1)
    return real_open(*args, **kwargs)
  for name, encoded in files:
    with PIL.Image.open(io.BytesIO(encoded)) as pil:
      expected = np.asarray(pil.convert("RGB"))
    opened.clear()
    with mock.patch.object(PIL.Image, "open", counting_open):
      decoded = data.parse_preprocess("decode")({"image": encoded}, None)["image"]
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape, name
    np.testing.assert_array_equal(decoded, expected, err_msg=name)
    assert bool(opened) == (name == "CMYK"), f"{name}: by {'PIL' if opened else 'simplejpeg'}"


def test_ops_do_what_their_names_say():
  rng = np.random.default_rng(0)
  image = np.arange(8 * 16 * 3, dtype=np.uint8).reshape(8, 16, 3)
  apply = lambda spec, example: data.parse_preprocess(spec)(example, rng)["image"]
  png = io.BytesIO()
  PIL.Image.fromarray(image).save(png, format="PNG")
  np.testing.assert_array_equal(apply("decode", {"image": png.getvalue()}), image)
  grey = apply("decode", {"image": image[:, :, :1]})
  assert grey.shape == (8, 16, 3) and (grey == image[:, :, :1]).all()
  assert apply("resize(5)", {"image": image}).shape == (5, 5, 3)
  assert apply("resize((4, 6))", {"image": image}).shape == (4, 6, 3)
  assert apply("resize_small(4)", {"image": image}).shape == (4, 8, 3)
  np.testing.assert_array_equal(apply("central_crop(4)", {"image": image}), image[2:6, 6:10])
  inception = [apply("inception_crop(6)", {"image": image}) for _ in range(10)]
  assert all(crop.shape == (6, 6, 3) for crop in inception)
  assert len({crop.tobytes() for crop in inception}) == 10
  square = image[:, :8]
  np.testing.assert_array_equal(apply("inception_crop(8,area_min=100)", {"image": square}), square)
  # random_crop(8,pad=1) of an 8x8 image: each of the 9 windows of the zero-padded image.
  padded = np.pad(image[:, :8], ((1, 1), (1, 1), (0, 0)))
  windows = {padded[top:top + 8, left:left + 8].tobytes() for top in range(3) for left in range(3)}
  crops = {apply("random_crop(8,pad=1)", {"image": image[:, :8]}).tobytes() for _ in range(100)}
  assert crops == windows
  flips = [np.array_equal(apply("flip_lr", {"image": image}), image[:, ::-1]) for _ in range(100)]
  assert 20 < sum(flips) < 80
  floats = image.astype(np.float32) / 7
  flipped = [apply("flip_lr", {"image": floats}) for _ in range(20)]
  assert {f.tobytes() for f in flipped} == {floats.tobytes(), floats[:, ::-1].tobytes()}
  scaled = apply("value_range(-1,1)", {"image": np.array([[[0, 255, 51]]], np.uint8)})
  np.testing.assert_allclose(scaled, [[[-1, 1, -0.6]]], atol=1e-6)
  assert scaled.dtype == np.float32
  scaled = apply("value_range(0,1,in_min=10,in_max=20)", {"image": np.array([[[10, 15, 20]]])})
  np.testing.assert_allclose(scaled, [[[0, 0.5, 1]]], atol=1e-6)


@pytest.mark.parametrize("vmin, vmax, in_min, in_max",
                         [(-1, 1, 0, 255), (0, 1, 10, 20), (0, 255, 0, 255), (-0.5, 2.5, -3, 300)])
def test_value_range_gives_the_bits_of_the_plain_expression_without_touching_its_input(
    vmin, vmax, in_min, in_max):
  rng = np.random.default_rng(0)
  inputs = [np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2),
            rng.integers(0, 256, (7, 9, 3), np.uint8)[:, ::-1],  # a flipped view
            rng.uniform(-400, 400, (5, 6, 3)).astype(np.float32),
            rng.integers(-50, 300, (4, 4, 3))]  # int64
  op = data.parse_preprocess(f"value_range({vmin},{vmax},in_min={in_min},in_max={in_max})")
  for image in inputs:
    before = image.copy()
    scaled = op({"image": image}, rng)["image"]
    plain = (vmin + (np.asarray(image, np.float32) - in_min)
             * ((vmax - vmin) / (in_max - in_min))).astype(np.float32)
    assert scaled.dtype == np.float32 and scaled.tobytes() == plain.tobytes()
    np.testing.assert_array_equal(image, before)


def randaugment_images():
  """(name, uint8 [h, w, 3]) of odd sizes and few distinct values, where the ops' edge cases are."""
  rng = np.random.default_rng(2)
  grey = rng.integers(0, 256, (7, 5, 1), np.uint8).repeat(3, axis=2)
  return [("random 7x5", rng.integers(0, 256, (7, 5, 3), np.uint8)),
          ("grey 7x5", grey),
          ("near-grey 9x3", np.clip(grey[:3].transpose(1, 0, 2) + [0, 1, 2], 0, 255).astype(
              np.uint8).repeat(3, axis=0)[:9]),
          ("constant 3x7", np.full((3, 7, 3), 90, np.uint8)),
          ("two levels 5x5", np.where(np.eye(5, dtype=bool)[:, :, None], 200, 10).astype(
              np.uint8).repeat(3, axis=2)),
          ("1x1", np.array([[[0, 128, 255]]], np.uint8)),
          ("1x6", rng.integers(0, 256, (1, 6, 3), np.uint8))]


def test_randaugment_is_a_function_of_the_rng_keeping_dtype_shape_and_input():
  op = data.parse_preprocess("randaugment(2,15)")
  for name, image in randaugment_images():
    before = image.copy()
    outputs = [op({"image": image, "label": 3}, np.random.default_rng(seed)) for seed in range(30)]
    again = op({"image": image, "label": 3}, np.random.default_rng(7))
    assert again["image"].tobytes() == outputs[7]["image"].tobytes(), name
    assert all(o["image"].dtype == np.uint8 and o["image"].shape == image.shape
               and o["label"] == 3 for o in outputs), name
    np.testing.assert_array_equal(image, before)
    if name == "random 7x5":  # 16 x 16 x signs x cutout centres: distinct for most seeds
      assert len({o["image"].tobytes() for o in outputs}) >= 25
  # n = 0 changes nothing and draws nothing.
  rng = np.random.default_rng(0)
  image = randaugment_images()[0][1]
  for m in (0, 30):
    assert data.parse_preprocess(f"randaugment(0,{m})")({"image": image}, rng)["image"] is image
  assert rng.random() == np.random.default_rng(0).random()


def test_randaugment_draws_each_operation_uniformly_from_big_visions_16():
  """Per operation: the choice, then (inside the operation) its sign or Cutout centre."""
  from common_jax.data import randaugment
  names = list(randaugment.operations(10))
  assert names == ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                   "TranslateX", "TranslateY", "Cutout", "SolarizeAdd"]
  image = randaugment_images()[0][1]
  op = data.parse_preprocess("randaugment(1,10)")
  chosen = collections.Counter()
  for seed in range(320):
    expected_rng = np.random.default_rng(seed)
    name = names[int(expected_rng.integers(0, 16))]
    expected = randaugment.operations(10)[name](PIL.Image.fromarray(image), expected_rng)
    rng = np.random.default_rng(seed)
    assert op({"image": image}, rng)["image"].tobytes() == np.asarray(expected).tobytes(), name
    assert rng.random() == expected_rng.random(), f"{name}: other draws"
    chosen[name] += 1
  assert set(chosen) == set(names) and min(chosen.values()) >= 8, chosen


def test_every_randaugment_operation_runs_on_odd_sizes_and_grey_images():
  from common_jax.data import randaugment
  for m in (0, 0.5, 5, 10, 15, 20, 30):
    for op_name, transform in randaugment.operations(m).items():
      for name, image in randaugment_images():
        rng = np.random.default_rng(0)
        out = np.asarray(transform(PIL.Image.fromarray(image), rng))
        assert out.dtype == np.uint8 and out.shape == image.shape, (op_name, m, name)
        if name == "constant 3x7" and op_name in ("AutoContrast", "Equalize"):
          np.testing.assert_array_equal(out, image)  # one level: nothing to stretch
        if name.startswith("grey") and op_name not in ("Cutout", "Rotate", "ShearX", "ShearY",
                                                          "TranslateX", "TranslateY"):
          assert (out == out[:, :, :1]).all(), (op_name, m, "grey stays grey")


def test_randaugment_magnitudes_map_to_big_visions_arguments():
  """level = m / 10, as in big_vision's autoaugment.py: m = 0 is no no-op (Posterize, Solarize,
  the enhancers act), m = 5 leaves the enhancers alone, m = 10 rotates by 30 degrees and
  translates 100 of 224 pixels, Solarize stops at m = 10, Posterize at m = 20."""
  from common_jax.data import randaugment
  rng = np.random.default_rng(3)
  image = rng.integers(1, 255, (224, 224, 3), np.uint8)
  image[0, 0], image[0, 1] = 0, 255  # every channel spans 0..255: AutoContrast leaves it
  pil = PIL.Image.fromarray(image)
  def run(m, op_name, seed=0):
    return np.asarray(randaugment.operations(m)[op_name](pil, np.random.default_rng(seed)))
  unchanged = lambda m: {op_name for op_name in randaugment.operations(m)
                         if np.array_equal(run(m, op_name), image)}
  geometric = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout"}
  enhancers = {"Color", "Contrast", "Brightness", "Sharpness"}
  assert unchanged(0) == geometric | {"AutoContrast", "SolarizeAdd"}  # adds int(0) = 0
  assert unchanged(5) == enhancers | {"AutoContrast"}
  assert unchanged(10) == {"AutoContrast", "Solarize"}
  assert unchanged(20) == {"AutoContrast", "Solarize", "Posterize"}
  assert not run(0, "Posterize").any()
  np.testing.assert_array_equal(run(0, "Solarize"), 255 - image)
  np.testing.assert_array_equal(run(0, "Invert"), 255 - image)
  np.testing.assert_array_equal(run(10, "Posterize"), image & 0b11110000)
  np.testing.assert_array_equal(run(0, "Brightness"), (image * 0.1).astype(np.uint8))
  np.testing.assert_array_equal(run(10, "SolarizeAdd"),
                                np.where(image < 128, np.minimum(image + 110, 255), image))
  grey = np.full_like(image, 128)
  shifts = set()
  for seed in range(8):  # ±100 pixels, the sign at random; grey comes in
    out = run(10, "TranslateX", seed)
    if np.array_equal(out, np.concatenate([image[:, 100:], grey[:, :100]], axis=1)):
      shifts.add(100)
    elif np.array_equal(out, np.concatenate([grey[:, :100], image[:, :124]], axis=1)):
      shifts.add(-100)
  assert shifts == {100, -100}
  rotations = {run(10, "Rotate", seed).tobytes() for seed in range(8)}
  assert rotations == {np.asarray(pil.rotate(angle, resample=PIL.Image.Resampling.NEAREST,
                                             fillcolor=(128, 128, 128))).tobytes()
                       for angle in (30, -30)}


def test_randaugment_after_value_range_is_refused_with_the_fix(digits_dir):
  with pytest.raises(ValueError) as error:
    data.check_preprocess("decode|value_range(-1,1)|randaugment(2,10)", "config.preprocess_train",
                          dataset="sklearn_digits", split="train", data_dir=digits_dir)
  message = assert_one_sentence(error)
  assert message.startswith("config.preprocess_train='decode|value_range(-1,1)|randaugment(2,10)'"
                            " fails on example 0"), message
  assert "randaugment needs uint8 [height, width, 3] images as decode gives them, got float32 " \
         "of shape (8, 8, 3); put it after decode and before value_range" in message, message


def encoded_images():
  """(name, encoded bytes) of files as image folders hold them: JPEG and PNG, RGB, grey, with
  alpha, with a palette, in sizes smaller and larger than the ops' outputs."""
  rng = np.random.default_rng(1)
  files = []
  for mode, size, fmt in [("RGB", (37, 53), "JPEG"), ("RGB", (300, 260), "JPEG"),
                          ("L", (41, 29), "JPEG"), ("RGB", (17, 23), "PNG"),
                          ("RGBA", (64, 48), "PNG"), ("P", (33, 35), "PNG"),
                          ("L", (9, 300), "PNG")]:
    array = rng.integers(0, 256, (size[0], size[1], 3), np.uint8)
    image = PIL.Image.fromarray(array)
    if mode == "RGBA":
      image.putalpha(128)
    elif mode != "RGB":
      image = image.convert(mode)
    encoded = io.BytesIO()
    image.save(encoded, format=fmt)
    files.append((f"{mode} {size} {fmt}", encoded.getvalue()))
  return files


@pytest.mark.parametrize("spec", [
    "decode|inception_crop(24)|flip_lr",
    "decode|inception_crop((20,28),area_min=50)|flip_lr|value_range(-1,1)",
    "decode|resize_small(16)|central_crop(12)|value_range(0,1,in_min=10,in_max=20)",
    "decode|resize((31,7))|random_crop(5,pad=2)|flip_lr|value_range(-1,1)",
    "decode|flip_lr|resize(64)|value_range(-0.5,2.5,in_min=-3,in_max=300)",
    "decode|inception_crop(24)|flip_lr|randaugment(2,15)|value_range(-1,1)",
    "decode|randaugment(4,30)|central_crop(5)",
    "decode|value_range(-1,1)",
    "decode",
])
def test_ops_on_decoded_files_give_the_bits_of_the_ops_one_at_a_time(spec):
  """`parse` gives the pixels and random draws of each op applied alone; `parse_for_batches`
  (the pipeline's split of the string, its final value_range written into a row of the batch)
  gives the bits of `parse`."""
  from common_jax.data import preprocess
  names_and_ops = preprocess.parse_ops(spec)
  parsed = preprocess.parse(spec)
  per_example, finish = preprocess.parse_for_batches(spec)
  for seed in range(4):
    for name, encoded in encoded_images():
      example = {"image": encoded, "label": 3}
      one_at_a_time, rng = example, np.random.default_rng(seed)
      for _, op in names_and_ops:  # each op alone: numpy in, numpy out
        one_at_a_time = op(one_at_a_time, rng)
      parsed_rng = np.random.default_rng(seed)
      image = parsed(example, parsed_rng)["image"]
      assert isinstance(image, np.ndarray), name
      assert image.dtype == one_at_a_time["image"].dtype, name
      assert image.tobytes() == np.ascontiguousarray(one_at_a_time["image"]).tobytes(), name
      assert parsed_rng.random() == rng.random(), f"{name}: other random draws"
      row = per_example(example, np.random.default_rng(seed))["image"]
      if spec.endswith(")") and "value_range" in spec.split("|")[-1]:
        assert row.dtype == np.uint8, "value_range is left for the batch"
      out = np.full(image.shape, np.nan, np.float32)
      finish(row, out)
      assert out.tobytes() == image.astype(np.float32).tobytes(), name



@pytest.mark.parametrize("chunk_bytes", [1, 2 * 8 * 8 * 3 * 4, 1 << 20])
@pytest.mark.parametrize("spec", ["decode|value_range(-1,1)", "decode|value_range(0,1,in_min=3)",
                                  "decode"])
def test_batch_finish_in_chunks_gives_the_bits_of_each_row_alone(spec, chunk_bytes, monkeypatch):
  """`finish_fn` writes several rows per call where images are small (one row per call, two, or
  the whole batch here): the same bits as `finish` of each row alone; padding rows zeros."""
  from common_jax.data import batching, preprocess
  monkeypatch.setattr(batching, "_FINISH_CHUNK_BYTES", chunk_bytes)
  _, finish = preprocess.parse_for_batches(spec)
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  mask = np.array([1, 1, 0, 1, 0], np.float32)
  batch = batching.finish_fn(finish)({"image": images, "label": np.arange(5), "mask": mask})
  for row, image, real in zip(batch["image"], images, mask):
    expected = np.zeros(image.shape, np.float32)
    if real:
      finish(image, expected)
    assert row.tobytes() == expected.tobytes()
  assert batch["label"].tolist() == list(range(5)) and batch["image"].dtype == np.float32

@pytest.mark.parametrize("environment, tuned", [
    ({}, True), ({"MALLOC_TRIM_THRESHOLD_": "0"}, False), ({"GLIBC_TUNABLES": "x"}, False),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, False), ({"LD_PRELOAD": "/lib/libfoo.so"}, True)])
def test_batch_processes_keep_freed_memory_unless_the_allocator_is_tuned(environment, tuned,
                                                                         monkeypatch):
  """`prepare_process` sets glibc's malloc to keep freed images (mallopt), once per process,
  unless the environment tunes or replaces the allocator; OpenCV then resizes in the calling
  thread."""
  import cv2
  from common_jax.data import batching
  calls = []
  class FakeLibc:
    def mallopt(self, parameter, value):
      calls.append((parameter, value))
  monkeypatch.setattr(batching.ctypes, "CDLL", lambda name: FakeLibc())
  monkeypatch.setattr(batching, "_prepared", False)
  for name in batching._ALLOCATOR_ENVIRONMENT + ("LD_PRELOAD",):
    monkeypatch.delenv(name, raising=False)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  threads = cv2.getNumThreads()
  try:
    batching.prepare_process()
    batching.prepare_process()
    assert cv2.getNumThreads() == 1
  finally:
    cv2.setNumThreads(threads)
  linux = sys.platform.startswith("linux")
  assert sorted(calls) == (sorted(batching._ALLOCATOR_SETTINGS.items()) if tuned and linux else [])


def test_epoch_order_is_a_pure_function_of_seed_and_position():
  """The train stream's shuffle: each epoch a permutation of the split, a new one each epoch,
  the same whatever order the positions are asked in (threads and workers ask out of order and
  keep only the last epochs), and the same in a fresh copy (a worker process)."""
  import pickle
  from common_jax.data import batching
  num_examples = 37
  positions = np.arange(6 * num_examples)
  in_order = batching.EpochOrder(3, num_examples)
  expected = [in_order(int(p), int(p) % num_examples) for p in positions]
  epochs = np.reshape(expected, (6, num_examples))
  assert all(sorted(epoch) == list(range(num_examples)) for epoch in epochs)
  assert len({tuple(epoch) for epoch in epochs}) == 6
  shuffled = np.random.default_rng(0).permutation(positions)
  copy = pickle.loads(pickle.dumps(batching.EpochOrder(3, num_examples)))
  assert [copy(int(p), int(p) % num_examples) for p in shuffled] == [expected[p] for p in shuffled]
  other_seed = batching.EpochOrder(4, num_examples)
  assert [other_seed(int(p), int(p) % num_examples) for p in positions] != expected


def test_same_seed_same_batches_other_seed_other_batches(digits_dir):
  make = lambda seed: data.train_iterator(dataset="sklearn_digits", split="train",
                                          preprocess=AUGMENT, global_batch_size=64, seed=seed,
                                          data_dir=digits_dir)
  first, second, other = take(make(7), 4), take(make(7), 4), take(make(8), 4)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])


RANDAUGMENT = "decode|random_crop(8,pad=1)|flip_lr|randaugment(2,15)|value_range(-1,1)"


@pytest.mark.parametrize("preprocess", [AUGMENT, RANDAUGMENT])
def test_resume_at_step_n_equals_the_unbroken_run_with_augmentation(preprocess, digits_dir):
  # 256 x 8 rows run past the 1,442-example epoch, so the resume crosses a reshuffle.
  kwargs = dict(dataset="sklearn_digits", split="train", preprocess=preprocess,
                global_batch_size=256, seed=1, data_dir=digits_dir)
  unbroken = take(data.train_iterator(**kwargs), 8)
  resumed = take(data.train_iterator(**kwargs, start_step=5), 3)
  for a, b in zip(unbroken[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  if preprocess == RANDAUGMENT:  # it did augment: the same crops and flips without it differ
    plain = next(data.train_iterator(**{**kwargs, "preprocess": AUGMENT}))
    np.testing.assert_array_equal(plain["label"], unbroken[0]["label"])
    assert not np.array_equal(plain["image"], unbroken[0]["image"])


def test_each_epoch_is_a_fresh_permutation_of_the_split(digits_dir):
  # 1,442 = 14 x 103, so each epoch is exactly 14 batches of 103.
  batches = take(data.train_iterator(dataset="sklearn_digits", split="train", preprocess=PLAIN,
                                     global_batch_size=103, seed=0, data_dir=digits_dir), 28)
  split = split_keys(digits_dir, "train")
  assert row_keys(batches[:14]) == split and row_keys(batches[14:]) == split
  first_epoch = np.concatenate([b["label"] for b in batches[:14]])
  second_epoch = np.concatenate([b["label"] for b in batches[14:]])
  assert not np.array_equal(first_epoch, second_epoch)


def test_processes_split_each_global_batch_into_their_rows(digits_dir):
  kwargs = dict(dataset="sklearn_digits", split="train", preprocess=AUGMENT,
                global_batch_size=128, seed=3, data_dir=digits_dir)
  whole = take(data.train_iterator(**kwargs), 3)
  parts = [take(data.train_iterator(**kwargs, process_index=k, process_count=2), 3)
           for k in range(2)]
  for step in range(3):
    assert parts[0][step]["image"].shape == (64, 8, 8, 3)
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])


def test_batch_size_not_divisible_by_processes_names_the_field(digits_dir):
  with pytest.raises(ValueError, match="config.batch_size"):
    data.train_iterator(dataset="sklearn_digits", split="train", preprocess=PLAIN,
                        global_batch_size=127, seed=0, data_dir=digits_dir, process_count=2)


def test_eval_counts_every_example_once_on_every_process(digits_dir):
  per_process = [list(data.eval_iterator(dataset="sklearn_digits", split="test", preprocess=PLAIN,
                                         global_batch_size=100, data_dir=digits_dir,
                                         process_index=k, process_count=2)) for k in range(2)]
  assert [len(batches) for batches in per_process] == [4, 4]  # ceil(355 / 100)
  for batch in per_process[0] + per_process[1]:
    assert batch["image"].shape == (50, 8, 8, 3) and batch["mask"].dtype == np.float32
    assert not batch["image"][batch["mask"] == 0].any()
  assert sum(batch["mask"].sum() for batches in per_process for batch in batches) == 355
  assert row_keys(per_process[0]) + row_keys(per_process[1]) == split_keys(digits_dir, "test")


def test_split_slices_select_part_of_a_split(digits_dir):
  assert sum(split_keys(digits_dir, "train[:90%]").values()) == 1298
  with pytest.raises(ValueError, match="'validation'.*'test', 'train'"):
    data.check_dataset("sklearn_digits", "validation", digits_dir)


def write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(array).save(path)


def test_image_folder_builder_labels_classes_alphabetically(tmp_path):
  root, rng = tmp_path / "pets", np.random.default_rng(0)
  images = {}
  class_names = ("dog", "cat", "emu", "ant")  # written in no particular order
  for split, count in (("train", 2), ("test", 1)):
    for class_name in class_names:
      for i in range(count):
        images[(split, class_name, i)] = rng.integers(0, 256, (5 + i, 7, 3), np.uint8)
        write_png(str(root / split / class_name / f"{i}.png"), images[(split, class_name, i)])
  dataset, data_dir = f"image_folder:{root}", str(tmp_path / "tfds")
  info = data.dataset_info(dataset, data_dir)
  assert (info.num_classes, info.splits, info.image_shape) == (4, {"train": 8, "test": 4}, None)
  batches = data.eval_iterator(dataset=dataset, split="train", preprocess="decode|central_crop(4)",
                               global_batch_size=4, data_dir=data_dir)
  # Decoding is lossless for PNG: each file comes back as its own central crop, with the label
  # of its folder in alphabetical order (ant=0, cat=1, dog=2, emu=3).
  central = lambda image: image[(image.shape[0] - 4) // 2:][:4, 1:5]
  expected = collections.Counter(
      (central(image).astype(np.float32).tobytes(), sorted(class_names).index(class_name))
      for (split, class_name, _), image in images.items() if split == "train")
  assert row_keys(batches) == expected
  # A string that leaves the sizes mixed is refused before the first batch.
  with pytest.raises(ValueError, match="config.preprocess_eval='decode' leaves images of split "
                     "'train' .* at different sizes .*; give them one size"):
    data.eval_iterator(dataset=dataset, split="train", preprocess="decode", global_batch_size=4,
                       data_dir=data_dir)
  # The folder's records are parsed without tfds's parser, to what it gives, slices included.
  from common_jax.data import sources
  for split in ("train", "train[2:7]", "test[50%:]+train[:3]"):
    source = sources.data_source(dataset, split, data_dir, None)
    assert source._folder_records is not None, split
    for index in range(len(source)):
      ours, tfds_record = source[index], source._source[index]
      assert {key: (type(value), value) for key, value in ours.items()} == {
          key: (type(value), value) for key, value in tfds_record.items()}, (split, index)
  # Adding an image makes a fresh build rather than reading the stale one.
  write_png(str(root / "test" / "cat" / "new.png"), images[("test", "cat", 0)])
  assert data.dataset_info(dataset, data_dir).splits["test"] == 5


def test_unknown_or_unprepared_datasets_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="config.dataset='no_such_set' is neither ours nor"):
    data.check_dataset("no_such_set", "train", str(tmp_path))
  with pytest.raises(ValueError, match="tfds build cifar10 --file_format=array_record"):
    data.check_dataset("cifar10", "train", str(tmp_path))
  with pytest.raises(ValueError, match="image_folder:PATH"):
    data.check_dataset(f"image_folder:{tmp_path}/missing", "train", str(tmp_path))


class GreyCatalogueStandIn(tfds.core.GeneratorBasedBuilder):
  """A catalogue-style builder with a `tfds.features.Image` (1 channel, like mnist)."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # No checksums to look up (see builders._LocalBuilder).

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(6, 6, 1)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(9):
      png = io.BytesIO()
      PIL.Image.fromarray(np.full((6, 6), 20 * i, np.uint8)).save(png, format="PNG")
      yield i, {"image": png.getvalue(), "label": i % 3}


def test_catalogue_image_features_decode_without_tensorflow(tmp_path):
  data_dir = str(tmp_path)
  GreyCatalogueStandIn(data_dir=data_dir, file_format="array_record").download_and_prepare()
  assert data.dataset_info("grey_catalogue_stand_in", data_dir).image_shape == (6, 6, 3)
  batch = next(data.train_iterator(dataset="grey_catalogue_stand_in", split="train",
                                   preprocess="decode|value_range(0,255)", global_batch_size=9,
                                   seed=0, data_dir=data_dir))
  # Grey became RGB, and each image still carries the value its label was generated with.
  assert batch["image"].shape == (9, 6, 6, 3)
  assert sorted(batch["image"][:, 0, 0, 0].tolist()) == [20 * i for i in range(9)]
  assert ((batch["image"][:, 0, 0, 0] // 20) % 3 == batch["label"]).all()
  assert "tensorflow" not in sys.modules
  # An Image feature goes through tfds's parser and decoder, not the image folders' parse.
  from common_jax.data import sources
  assert sources.data_source("grey_catalogue_stand_in", "train", data_dir,
                             None)._folder_records is None


def test_worker_processes_do_not_change_the_batches(digits_dir):
  kwargs = dict(dataset="sklearn_digits", split="train", preprocess=AUGMENT,
                global_batch_size=32, seed=5, start_step=3, data_dir=digits_dir)
  in_process = take(data.train_iterator(**kwargs), 4)
  iterator = data.train_iterator(**kwargs, worker_count=2)
  with_workers = take(iterator, 4)
  iterator.close()
  for a, b in zip(in_process, with_workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])



def write_image_folder(root, rng, splits=(("train", 4),), classes=("ant", "cat", "dog")):
  """<root>/<split>/<class>/<i>.png|jpg of varying sizes: even i PNG, odd i JPEG."""
  for split, per_class in splits:
    for class_index, class_name in enumerate(classes):
      for i in range(per_class):
        image = rng.integers(0, 256, (10 + i, 12 + class_index, 3), np.uint8)
        write_png(str(root / split / class_name / f"{i}.{'jpg' if i % 2 else 'png'}"), image)


def test_worker_processes_read_image_folders_with_the_same_batches(tmp_path):
  root = tmp_path / "folder"
  write_image_folder(root, np.random.default_rng(0))
  assert {path.suffix for path in root.glob("train/*/*")} == {".png", ".jpg"}
  kwargs = dict(dataset=f"image_folder:{root}", split="train", global_batch_size=6, seed=2,
                preprocess="decode|inception_crop(8)|flip_lr|value_range(-1,1)",
                start_step=2, data_dir=str(tmp_path / "tfds"))
  in_process = take(data.train_iterator(**kwargs), 4)  # epochs 1 and 2 of the 12 images
  iterator = data.train_iterator(**kwargs, worker_count=2)
  with_workers = take(iterator, 4)
  iterator.close()
  for a, b in zip(in_process, with_workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert collections.Counter(np.concatenate([b["label"] for b in in_process]).tolist()) == {
      0: 8, 1: 8, 2: 8}


def test_sources_reopen_in_a_fresh_process_for_every_builder_kind(tmp_path, digits_dir):
  """What Grain pickles into its workers: no builder class or test module needed there."""
  import pickle
  import subprocess
  from common_jax.data import sources as sources_lib
  root = tmp_path / "folder"
  write_image_folder(root, np.random.default_rng(1))
  GreyCatalogueStandIn(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  sources = [sources_lib.data_source("sklearn_digits", "train[10:20]", digits_dir, None),
             sources_lib.data_source(f"image_folder:{root}", "train", str(tmp_path), None),
             sources_lib.data_source("grey_catalogue_stand_in", "train", str(tmp_path), None)]
  builder = data.get_builder(f"image_folder:{root}", str(tmp_path))
  child = ("import pickle, sys; sources, builder = pickle.load(sys.stdin.buffer); "
           "pickle.dump(([[s[i] for i in range(len(s))] for s in sources], "
           "str(builder.data_dir), 'test_data' in sys.modules), sys.stdout.buffer)")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", child], input=pickle.dumps((sources, builder)),
                          capture_output=True, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": repo})
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  records, builder_dir, imported_tests = pickle.loads(result.stdout)
  assert builder_dir == str(builder.data_dir) and not imported_tests
  assert [len(r) for r in records] == [10, 12, 9]
  for source, reopened in zip(sources, records):
    for i, record in enumerate(reopened):
      assert record.keys() == source[i].keys()
      for key in record:
        assert type(record[key]) is type(source[i][key])
        np.testing.assert_array_equal(record[key], source[i][key])


def test_vit_trains_on_an_image_folder_with_worker_processes(tmp_path):
  """config.data_workers=2 on an image folder, through the loop as run.py drives it."""
  from common_jax import optim, sharding, train
  from vit_jax.tasks import ClassificationTask
  root = tmp_path / "folder"
  write_image_folder(root, np.random.default_rng(2), splits=(("train", 4), ("test", 2)))
  data_args = dict(dataset=f"image_folder:{root}", data_dir=str(tmp_path / "tfds"))
  workdir = tmp_path / "workdir"
  workdir.mkdir()  # run.py creates it before the loop runs
  iterators = []

  def train_data(start_step):
    iterators.append(data.train_iterator(
        split="train", preprocess="decode|inception_crop(8)|flip_lr|value_range(-1,1)",
        global_batch_size=8, seed=0, start_step=start_step, worker_count=2, **data_args))
    return iterators[-1]

  def eval_data():
    return data.eval_iterator(split="test", preprocess="decode|resize(8)|value_range(-1,1)",
                              global_batch_size=8, **data_args)

  task = ClassificationTask("custom", num_classes=3, image_size=8, model_options=dict(
      width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4))
  try:
    result = train.train_and_evaluate(
        task, loop=train.LoopConfig(total_steps=3, batch_size=8, log_every=1, eval_every=0,
                                    checkpoint_every=0, async_checkpoints=False),
        optimizer=optim.OptimizerConfig(name="sgd", learning_rate=0.01, decay="constant"),
        mesh_config=sharding.MeshConfig(data=-1), workdir=str(workdir),
        train_data=train_data, eval_data=eval_data, tensorboard=False)
  finally:
    for iterator in iterators:
      iterator.close()
  assert result["step"] == 3 and len(iterators) == 1
  assert np.isfinite(result["eval"]["loss"]) and 0 <= result["eval"]["accuracy"] <= 1


# Bad input: every mistake is one sentence (a ValueError) naming the field or file and the fix,
# before any compute where it can be known, and leaves the user's files as they were.

def assert_one_sentence(error):
  message = str(error.value if hasattr(error, "value") else error)
  assert isinstance(error.value if hasattr(error, "value") else error, ValueError)
  assert "\n" not in message and message.endswith(".") and ". " not in message, message
  return message


def folder_state(root):
  return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
          for path in sorted(root.rglob("*"))}


def png_bytes(shape, seed=0):
  png = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, np.uint8)).save(
      png, format="PNG")
  return png.getvalue()


def jpeg_bytes(shape, seed=0):
  jpeg = io.BytesIO()
  PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, np.uint8)).save(
      jpeg, format="JPEG")
  return jpeg.getvalue()


BAD_FILES = {  # what a user finds in an image folder, and whether its header gives it away
    "text named .png": (b"not an image, just text\n", True),
    "empty file": (b"", True),
    "cut-short png": (png_bytes((16, 16, 3))[:200], False),  # the header reads, the pixels don't
    "cut-short jpeg": (jpeg_bytes((64, 64, 3))[:1500], False),  # simplejpeg fails, PIL says why
}


def bad_folder(tmp_path, bad_kind, name="bad.png"):
  """train/{ant,cat}/{0,1}.png of 4x4 pixels, plus train/cat/<name> holding `bad_kind`."""
  root = tmp_path / "folder"
  for class_name in ("ant", "cat"):
    for i in range(2):
      (root / "train" / class_name).mkdir(parents=True, exist_ok=True)
      (root / "train" / class_name / f"{i}.png").write_bytes(png_bytes((4, 4, 3), seed=i))
  (root / "train" / "cat" / name).write_bytes(BAD_FILES[bad_kind][0])
  return root, dict(dataset=f"image_folder:{root}", split="train", data_dir=str(tmp_path / "tfds"),
                    preprocess="decode|value_range(-1,1)", global_batch_size=5)


@pytest.mark.parametrize("bad_kind", sorted(BAD_FILES))
def test_an_undecodable_image_is_one_sentence_naming_its_file_and_example(bad_kind, tmp_path):
  root, kwargs = bad_folder(tmp_path, bad_kind)
  before = folder_state(root)
  # Listing order: ant/0, ant/1, cat/0, cat/1, cat/bad -> example 4.
  fragment = "image 'train/cat/bad.png' (example 4 of split 'train' of config.dataset="
  fix = "replace or delete", "or set config.skip_bad_images=True to skip and count such images."
  caught_by_header = BAD_FILES[bad_kind][1]
  if caught_by_header:  # refused before any compute, by the check and by each iterator
    for call in (lambda: data.check_dataset(kwargs["dataset"], "train", kwargs["data_dir"]),
                 lambda: data.train_iterator(seed=0, **kwargs),
                 lambda: data.eval_iterator(**kwargs)):
      with pytest.raises(data.BadImageError) as error:
        call()
      assert fragment in assert_one_sentence(error) and all(f in str(error.value) for f in fix)
  else:  # the header reads: the image fails where it is decoded, with the same sentence
    data.check_dataset(kwargs["dataset"], "train", kwargs["data_dir"])
    with pytest.raises(data.BadImageError) as error:
      list(data.eval_iterator(**kwargs))
    message = assert_one_sentence(error)
    assert fragment in message and "truncated" in message
    with pytest.raises(data.BadImageError, match=re.escape(fragment)):
      next(data.train_iterator(seed=0, **kwargs))
  assert folder_state(root) == before


def test_an_undecodable_image_in_a_worker_process_reaches_the_caller_as_the_same_sentence(
    tmp_path):
  _, kwargs = bad_folder(tmp_path, "cut-short png")
  with pytest.raises(data.BadImageError) as in_process:
    next(data.train_iterator(seed=0, **kwargs))
  iterator = data.train_iterator(seed=0, worker_count=1, **kwargs)
  with pytest.raises(data.BadImageError) as in_worker:
    next(iterator)
  iterator.close()
  assert str(in_worker.value) == str(in_process.value)
  assert_one_sentence(in_worker)


class CorruptCatalogueStandIn(tfds.core.GeneratorBasedBuilder):
  """A catalogue-style builder whose `tfds.features.Image` decodes when read; example 2 is cut."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({
                                     "image": tfds.features.Image(shape=(4, 4, 3)),
                                     "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(4):
      image = png_bytes((4, 4, 3), seed=i)
      yield i, {"image": image[:40] if i == 2 else image, "label": i % 2}


def test_an_undecodable_catalogue_image_names_its_example(tmp_path):
  CorruptCatalogueStandIn(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  kwargs = dict(dataset="corrupt_catalogue_stand_in", split="train", data_dir=str(tmp_path),
                preprocess="decode|value_range(-1,1)", global_batch_size=4)
  with pytest.raises(data.BadImageError) as error:
    list(data.eval_iterator(**kwargs))
  message = assert_one_sentence(error)
  # The `decode` op reads the file (tfds leaves it encoded), so PIL says what is wrong with it.
  assert message.startswith(
      "example 2 of split 'train' of config.dataset='corrupt_catalogue_stand_in' cannot be "
      "decoded (PIL recognises no image format in it); ") and "NoneType" not in message, message
  batches = list(data.eval_iterator(**kwargs, skip_bad_images=True))
  assert batches[0]["mask"].tolist() == [1, 1, 0, 1]


def take_and_report(iterator, count):
  batches = take(iterator, count)
  return batches, dict(iterator.bad_images)


@pytest.mark.parametrize("cache", [False, True])
def test_skip_bad_images_substitutes_deterministically_and_resumes_exactly(cache, tmp_path,
                                                                           capsys):
  root, kwargs = bad_folder(tmp_path, "cut-short png", name=f"bad_{cache}.png")
  kwargs.update(preprocess="decode|random_crop(4,pad=1)|flip_lr|value_range(-1,1)", seed=3,
                cache=cache, skip_bad_images=True)
  before = folder_state(root)
  unbroken, bad = take_and_report(data.train_iterator(**kwargs), 6)  # 6 epochs of 5
  where = f"image 'train/cat/bad_{cache}.png' (example 4 of split 'train' of config.dataset="
  assert len(bad) == 1 and next(iter(bad)).startswith(where) and sum(bad.values()) >= 6
  warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 1 and where in warnings[0], warnings  # once, with the running count
  assert "1 undecodable image so far" in warnings[0]
  again, _ = take_and_report(data.train_iterator(**kwargs), 6)
  resumed, _ = take_and_report(data.train_iterator(**kwargs, start_step=4), 2)
  for a, b in zip(unbroken, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(unbroken[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Every row is a real image of the four good ones (no zeros, no half-decoded rows).
  assert all(b["image"].shape == (5, 4, 4, 3) and set(b.keys()) == {"image", "label"}
             for b in unbroken)
  assert folder_state(root) == before


def test_skip_bad_images_in_eval_leaves_the_image_out_and_says_so(tmp_path, capsys):
  _, kwargs = bad_folder(tmp_path, "text named .png")
  batches = list(data.eval_iterator(**kwargs, skip_bad_images=True))
  assert [b["mask"].tolist() for b in batches] == [[1, 1, 1, 1, 0]]
  assert not batches[0]["image"][4].any() and set(batches[0]) == {"image", "label", "mask"}
  warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
  assert len(warnings) == 2 and "left out of the evaluation" in warnings[0]
  assert warnings[1].startswith("warning: 1 undecodable image was left out of this evaluation")


PREPROCESS_MISTAKES = [  # (config string, what the sentence must name)
    ("decode|nope(3)", "'nope(3)', which is unknown; known ops are decode, resize, "),
    ("decode|random_crop(abc)", "'random_crop(abc)', with an argument that is not a plain "
     "number or list; the op is random_crop(size, pad=0)"),
    ("decode|inception_crop(0)", "'inception_crop(0)', with a bad argument: size must be a "
     "positive int"),
    ("decode|value_range(1,1)", "'value_range(1,1)', with a bad argument: vmin and vmax must "
     "differ"),
    ("decode|value_range(0,1,in_min=3,in_max=3)", "in_min and in_max must differ"),
    ("decode|value_range('a')", "vmin must be a finite number, got 'a'"),
    ("decode|resize(True)", "size must be a positive int or [height, width] of positive ints, "
     "got True; the op is resize(size, method='bilinear')"),
    ("decode|resize(4.5)", "got 4.5"),
    ("decode|resize((4, 4, 4))", "got (4, 4, 4)"),
    ("decode|random_crop(4, pad=1.5)", "pad must be a non-negative int, got 1.5"),
    ("decode|random_crop()", "whose arguments do not fit: missing a required argument: 'size'; "
     "the op is random_crop(size, pad=0)"),
    ("decode|flip_lr(3)", "whose arguments do not fit: too many positional arguments; the op is "
     "flip_lr()"),
    ("decode|resize(x=4)", "the op is resize(size, method='bilinear')"),
    ("decode|inception_crop(4, area_min=-1)", "need 0 < area_min <= area_max <= 100"),
    ("decode|randaugment(-1,10)", "'randaugment(-1,10)', with a bad argument: n (the number of "
     "operations per image) must be a non-negative int, got -1; the op is randaugment(n, m)."),
    ("decode|randaugment(2.0,10)", "must be a non-negative int, got 2.0"),
    ("decode|randaugment(2,31)", "'randaugment(2,31)', with a bad argument: m (the magnitude) "
     "must be a number from 0 to 30, got 31; the op is randaugment(n, m)."),
    ("decode|randaugment(2,-0.5)", "from 0 to 30, got -0.5"),
    ("decode|randaugment(2,'9')", "from 0 to 30, got '9'"),
    ("decode|randaugment(2)", "missing a required argument: 'm'; the op is randaugment(n, m)."),
    ("decode||flip_lr", "the op '', which is not of the form name or name(args)"),
    ("decode|resize(224", "'resize(224', which is not of the form"),
    ("resize(4)|value_range(-1,1)", "starts with 'resize(4)'; start it with 'decode'"),
    ("decode|resize(4)|decode", "decodes twice"),
    ("", "is empty; start it with 'decode'"),
    (3, "is not a string"),
]


@pytest.mark.parametrize("spec, fragment", PREPROCESS_MISTAKES)
def test_check_preprocess_names_the_field_the_op_and_the_fix(spec, fragment):
  with pytest.raises(ValueError) as error:
    data.check_preprocess(spec, "config.preprocess_train")
  message = assert_one_sentence(error)
  assert message.startswith("config.preprocess_train") and fragment in message, message


@pytest.mark.parametrize("spec, size", [
    ("decode|resize(8)|value_range(-1,1)", (8, 8)),
    ("decode|random_crop([4,6],pad=1)|flip_lr|value_range(-1,1)", (4, 6)),
    ("decode|resize_small(256)|central_crop(224)|value_range(-1,1)", (224, 224)),
    ("decode|inception_crop(224)|flip_lr|randaugment(2,10)", (224, 224)),
    ("decode|resize(8)|resize_small(4)", None),  # the longer side follows the image
    ("decode|value_range(-1,1)", None),  # the images' own size
])
def test_the_string_alone_says_the_size_it_sets(spec, size):
  assert data.check_preprocess(spec, "config.preprocess_eval") == size


def test_every_recipe_preprocessing_passes_the_check():
  import glob
  import importlib
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for path in glob.glob(os.path.join(repo, "configs", "*.py")):
    name = os.path.basename(path)[:-3]
    config = importlib.import_module(f"configs.{name}")
    if not hasattr(config, "get_config"):
      continue
    config = config.get_config()
    for field in ("preprocess_train", "preprocess_eval"):
      if field in config:
        size = data.check_preprocess(config[field], f"config.{field}")
        assert size in (None, (config.image_size,) * 2), (name, field, size)


def test_preprocessing_that_leaves_sizes_mixed_is_refused_before_the_first_batch(tmp_path,
                                                                                digits_dir):
  mixed, same = tmp_path / "mixed", tmp_path / "same"
  write_image_folder(mixed, np.random.default_rng(0), splits=(("train", 2),))  # 6 sizes
  for i in range(2):
    write_png(str(same / "test" / f"c{i}" / "0.png"), np.full((5, 6, 3), i, np.uint8))
  data_dir = str(tmp_path / "tfds")
  source = dict(dataset=f"image_folder:{mixed}", split="train", data_dir=data_dir)
  with pytest.raises(ValueError) as error:
    data.check_preprocess("decode|value_range(-1,1)", "config.preprocess_eval", **source)
  message = assert_one_sentence(error)
  assert message.startswith("config.preprocess_eval='decode|value_range(-1,1)' leaves images "
                            "of split 'train' of config.dataset=")
  assert re.search(r"at different sizes \(10x12 for image 'train/ant/0.png', 11x12 for "
                   r"image 'train/ant/1.jpg'\), which cannot be stacked into batches; give "
                   r"them one size with resize\(S\)", message), message
  with pytest.raises(ValueError, match="leaves images of split 'train'"):
    data.eval_iterator(preprocess="decode|value_range(-1,1)", global_batch_size=2, **source)
  for spec, size in (("decode|resize(8)|value_range(-1,1)", (8, 8)),
                     ("decode|resize_small(8)|central_crop(8)", (8, 8)),
                     ("decode|inception_crop(6)|flip_lr", (6, 6))):
    assert data.check_preprocess(spec, "config.preprocess_eval", **source) == size
  # One size throughout: no resize needed, and the dataset says which size.
  assert data.check_preprocess("decode|value_range(-1,1)", "config.preprocess_eval",
                               dataset=f"image_folder:{same}", split="test",
                               data_dir=data_dir) == (5, 6)
  assert data.dataset_info(f"image_folder:{same}", data_dir).image_shape == (5, 6, 3)
  # An op that cannot work on the images is named with the example it failed on.
  with pytest.raises(ValueError) as error:
    data.check_preprocess("decode|central_crop(10)", "config.preprocess_eval",
                          dataset="sklearn_digits", split="test", data_dir=digits_dir)
  assert assert_one_sentence(error).startswith(
      "config.preprocess_eval='decode|central_crop(10)' fails on example 0 of split 'test' of "
      "config.dataset='sklearn_digits': central_crop of 10x10 does not fit an image of shape "
      "(8, 8, 3); resize first")


def make_layout(tmp_path, case):
  """An image folder laid out wrongly in one way; returns the config.dataset string."""
  root = tmp_path / "folder"
  image = png_bytes((4, 4, 3))
  for path in ("train/ant/0.png", "train/cat/0.png", "test/ant/0.png"):
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_bytes(image)
  if case == "class folder without images":
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "notes.txt").write_text("no images here")
  elif case == "image directly in a split folder":
    (root / "train" / "stray.png").write_bytes(image)
  elif case == "root is a file":
    return f"image_folder:{root}/train/ant/0.png"
  elif case == "root does not exist":
    return f"image_folder:{root}/nope"
  elif case == "empty root":
    return "image_folder:"
  elif case == "no images at all":
    (tmp_path / "empty" / "train").mkdir(parents=True)  # a split folder, no class folders
    return f"image_folder:{tmp_path}/empty"
  return f"image_folder:{root}"


DATASET_MISTAKES = {  # case: (split, fragment of the one sentence)
    "class folder without images": ("train", "but the class folder {root}/train/dog holds no "
                                    ".png, .jpg or .jpeg file; add its images or remove"),
    "image directly in a split folder": ("train", "but the image {root}/train/stray.png sits "
                                         "directly in the split folder train; move each image"),
    "root is a file": ("train", "but {root}/train/ant/0.png is a file; fix the path."),
    "root does not exist": ("train", "but {root}/nope does not exist; fix the path."),
    "empty root": ("train", "config.dataset='image_folder:' names no folder; write "
                   "config.dataset='image_folder:/path/to/root'"),
    "no images at all": ("train", "but no such images were found under"),
    "missing split folder": ("validation", "config.eval_split='validation' is not a split of "
                             "config.dataset='image_folder:{root}'; use one of 'test', 'train'"),
    "slice of a missing split": ("train[:5]+val", "config.eval_split='train[:5]+val' names 'val', "
                                 "which is not a split of"),
    "slice out of range": ("train[:200%]", "that tfds can read; use one of 'test', 'train', or "
                           "a slice such as 'train[:90%]'"),
    "empty slice": ("train[1:1]", "config.eval_split='train[1:1]' selects no example of"),
    "empty split string": ("", "config.eval_split='' names no split of"),
}


@pytest.mark.parametrize("case", sorted(DATASET_MISTAKES))
def test_image_folder_and_split_mistakes_are_one_sentence(case, tmp_path):
  dataset = make_layout(tmp_path, case)
  root = tmp_path / "folder"
  before = folder_state(tmp_path)
  split, fragment = DATASET_MISTAKES[case]
  with pytest.raises(ValueError) as error:
    data.check_dataset(dataset, split, str(tmp_path / "tfds"), split_field="config.eval_split")
  assert fragment.format(root=root) in assert_one_sentence(error)
  after = folder_state(tmp_path)
  assert {k: v for k, v in after.items() if not k.startswith("tfds")} == before


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
  root = tmp_path / "folder"
  make_layout(tmp_path, "fine")
  (root / "train" / ".ipynb_checkpoints").mkdir()
  (root / "train" / "ant" / ".DS_Store").write_bytes(b"\0")
  (root / "train" / "ant" / "._0.png").write_bytes(b"resource fork")
  info = data.dataset_info(f"image_folder:{root}", str(tmp_path / "tfds"))
  assert info.num_classes == 2 and info.splits == {"test": 1, "train": 2}


@pytest.mark.parametrize("dataset, fragment", [
    ("cifar_10", "config.dataset='cifar_10' is neither ours nor a tfds dataset in the catalogue "
     "or prepared in config.data_dir ({data_dir}); the closest name is 'cifar10'."),
    ("sklearn_digit", "the closest name is 'sklearn_digits'."),
    ("image-folder:/data/pets", "for a folder of images write 'image_folder:/path/to/root' exactly."),
    ("Image_folder:/data/pets", "for a folder of images write 'image_folder:/path/to/root'"),
    ("cifar10:9.9.9", "config.dataset='cifar10:9.9.9' cannot be loaded by tfds (Dataset cifar10 "
     "cannot be loaded at version 9.9.9, only: 3.0.2); fix the version or config"),
    ("", "config.dataset='' names no dataset; use 'sklearn_digits'"),
])
def test_dataset_name_mistakes_are_one_sentence(dataset, fragment, tmp_path):
  with pytest.raises(ValueError) as error:
    data.check_dataset(dataset, "train", str(tmp_path))
  assert fragment.format(data_dir=tmp_path) in assert_one_sentence(error)


def test_a_data_dir_where_nothing_can_be_built_is_one_sentence(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError) as error:
    data.check_dataset("sklearn_digits", "train", str(blocker / "tfds"))
  assert assert_one_sentence(error).startswith(
      f"config.dataset='sklearn_digits' cannot be built into config.data_dir={blocker}/tfds: ")
  assert blocker.read_text() == "not a directory"
