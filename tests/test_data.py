"""The input pipeline: builders, preprocessing ops, determinism, resume, sharding, eval coverage."""

import collections
import io
import os
import sys

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


def test_same_seed_same_batches_other_seed_other_batches(digits_dir):
  make = lambda seed: data.train_iterator(dataset="sklearn_digits", split="train",
                                          preprocess=AUGMENT, global_batch_size=64, seed=seed,
                                          data_dir=digits_dir)
  first, second, other = take(make(7), 4), take(make(7), 4), take(make(8), 4)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_resume_at_step_n_equals_the_unbroken_run_with_augmentation(digits_dir):
  # 256 x 8 rows run past the 1,442-example epoch, so the resume crosses a reshuffle.
  kwargs = dict(dataset="sklearn_digits", split="train", preprocess=AUGMENT,
                global_batch_size=256, seed=1, data_dir=digits_dir)
  unbroken = take(data.train_iterator(**kwargs), 8)
  resumed = take(data.train_iterator(**kwargs, start_step=5), 3)
  for a, b in zip(unbroken[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


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
  with pytest.raises(ValueError, match="'decode' gives images of shapes .* give them one size"):
    list(data.eval_iterator(dataset=dataset, split="train", preprocess="decode",
                            global_batch_size=4, data_dir=data_dir))
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
  from common_jax.data import pipeline
  root = tmp_path / "folder"
  write_image_folder(root, np.random.default_rng(1))
  GreyCatalogueStandIn(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  sources = [pipeline._data_source("sklearn_digits", "train[10:20]", digits_dir, None),
             pipeline._data_source(f"image_folder:{root}", "train", str(tmp_path), None),
             pipeline._data_source("grey_catalogue_stand_in", "train", str(tmp_path), None)]
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
