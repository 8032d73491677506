"""The records of a split, read and preprocessed one example at a time, and the checks made on
them before the first batch: which split, whether its image files can be read, and whether the
preprocessing string works on them and gives them one size.

`pipeline` builds the train and eval iterators on these; everything here is per example and
knows nothing of batches, steps or processes.
"""

from typing import Any, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from common_jax.data import builders
from common_jax.data import preprocess as preprocess_lib

Batch = dict[str, np.ndarray]
_Example = tf_example_pb2.Example
BadImageError = preprocess_lib.BadImageError
TRIAL_EXAMPLES = 8  # examples a preprocessing string is tried on, without a folder report


def classification_builder(dataset: str, data_dir: Optional[str],
                           manual_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  builder = builders.get_builder(dataset, data_dir, manual_dir)
  features = builder.info.features
  if ("image" not in features or "label" not in features
      or not isinstance(features["label"], tfds.features.ClassLabel)):
    raise ValueError(
        f"config.dataset={dataset!r} has features {list(features)}, but the pipeline needs an "
        "'image' and a class 'label'; choose an image classification dataset.")
  return builder


def as_data_source(builder: tfds.core.DatasetBuilder, split: str):
  """`builder.as_data_source(split)`, with the files of an Image feature left encoded for the
  `decode` op, as an image folder's are: simplejpeg for JPEGs, PIL otherwise, and PIL's reason
  for a file that cannot be read. (tfds would decode them with OpenCV, which says only that it
  got nothing, and its CMYK conversion is not PIL's.)"""
  image = builder.info.features["image"] if "image" in builder.info.features else None
  decoders = ({"image": tfds.decode.SkipDecoding()}
              if isinstance(image, tfds.features.Image) else None)
  return builder.as_data_source(split=split, decoders=decoders)


class SplitSource:
  """The records of one prepared split, by index; pickles as (prepared directory, split).

  Grain pickles the whole dataset into each of its worker processes. A tfds source holds its
  builder, and tfds pickles a builder as the arguments of `DatasetBuilder.__init__`, which the
  worker then passes to the builder's own `__init__`: that fails for builders with arguments of
  their own (`ImageFolder(root=...)`), needs the builder's class importable in the worker, and
  would list and hash a whole image folder again in every worker. This source instead reopens
  the split in the worker from the directory the parent read, with `tfds.builder_from_directory`,
  which restores the features saved there: the same files, decoded the same way, for every
  builder kind (catalogue, ours, image folders), and nothing listed or built again.
  """

  def __init__(self, builder_dir: str, split: str, source=None):
    self._builder_dir, self._split = builder_dir, split
    if source is None:
      with builders.quiet_tfds():
        source = as_data_source(tfds.builder_from_directory(builder_dir), split)
    self._source = source
    self._folder_records = _folder_records(source)

  def __reduce__(self):
    return SplitSource, (self._builder_dir, self._split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._folder_records is not None:
      feature = _Example.FromString(self._folder_records[index]).features.feature
      return {"image": feature["image"].bytes_list.value[0],
              "label": feature["label"].int64_list.value[0],
              "path": feature["path"].bytes_list.value[0]}
    return self._source[index]


def _folder_records(source) -> Optional[Any]:
  """The serialized records of an image folder's split (`builders`' three features: the file's
  bytes, its class, its path), which `SplitSource` parses itself, as tfds would, in a third of
  tfds's time (16 against 45 us a record, a twentieth of an image's preprocessing); None for other
  datasets, which tfds parses and decodes."""
  info, records = getattr(source, "dataset_info", None), getattr(source, "data_source", None)
  if info is None or records is None or getattr(source, "decoders", None) is not None:
    return None
  features = info.features
  scalar_bytes = lambda name: (isinstance(features[name], tfds.features.Tensor)
                               and features[name].shape == () and features[name].np_dtype == object)
  if (set(features) == {"image", "label", "path"} and scalar_bytes("image")
      and scalar_bytes("path") and isinstance(features["label"], tfds.features.ClassLabel)):
    return records
  return None


class CachedSource:
  """A split read into memory once; a record that failed to read raises its error again."""

  def __init__(self, source):
    self._records = []
    for index in range(len(source)):
      try:
        self._records.append(source[index])
      except Exception as error:  # pylint: disable=broad-except  # raised again when read
        self._records.append(error)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._records[index]
    if isinstance(record, Exception):
      raise record
    return record




def split_names(split: str) -> list[str]:
  """'train[:90%]+test' -> ['train', 'test']."""
  return [part.split("[")[0].strip() for part in split.split("+")]


def open_split(dataset: str, split: str, data_dir: Optional[str], manual_dir: Optional[str],
               split_field: str = "split") -> tuple[tfds.core.DatasetBuilder, SplitSource]:
  """The builder and the random-access source of one split (a slice such as 'train[:90%]' too)."""
  builder = classification_builder(dataset, data_dir, manual_dir)
  what = f"{split_field}={split!r}" if split_field != "split" else f"split {split!r}"
  known = ", ".join(repr(name) for name in sorted(builder.info.splits))
  if not isinstance(split, str) or not split.strip():
    raise ValueError(f"{what} names no split of config.dataset={dataset!r}; use one of {known}, "
                     "or a slice such as 'train[:90%]'.")
  try:
    with builders.quiet_tfds():
      source = as_data_source(builder, split)
  except Exception as error:  # pylint: disable=broad-except  # tfds: ValueError, KeyError, ...
    unknown = [name for name in split_names(split) if name not in builder.info.splits]
    if unknown:
      named = "is not" if unknown[0] == split.strip() else f"names {unknown[0]!r}, which is not"
      raise ValueError(f"{what} {named} a split of config.dataset={dataset!r}; use one of "
                       f"{known}, or a slice such as 'train[:90%]'.") from None
    if "0 length" in str(error):
      raise ValueError(f"{what} selects no example of config.dataset={dataset!r}; widen the "
                       "slice.") from None
    raise ValueError(f"{what} is not a split of config.dataset={dataset!r} that tfds can read; "
                     f"use one of {known}, or a slice such as 'train[:90%]', 'train[100:200]' "
                     "or 'train+test' (percent bounds within -100..100).") from None
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"{what} of config.dataset={dataset!r} is empty; choose another.")
  return builder, SplitSource(str(builder.data_dir), split, source)


def data_source(dataset: str, split: str, data_dir: Optional[str],
                manual_dir: Optional[str]) -> SplitSource:
  """The random-access source of one split (a split spec such as 'train[:90%]' works too)."""
  return open_split(dataset, split, data_dir, manual_dir)[1]


def check_readable(builder: tfds.core.DatasetBuilder, dataset: str, split: str,
                   skip_bad_images: bool) -> None:
  """Refuses a split of an image folder with files no image reader recognises, now, unless they
  are to be skipped (the build read every header; slices are checked as their images come)."""
  report = builders.folder_report(builder, split)
  if skip_bad_images or not report or not report["num_unreadable"]:
    return
  index, path, reason = report["unreadable"][0]
  count = report["num_unreadable"]
  others = (f", nor can {count - 1} other file{'s' if count > 2 else ''} of the split"
            if count > 1 else "")
  raise BadImageError(
      f"image {path!r} (example {index} of split {split!r} of config.dataset={dataset!r}) cannot "
      f"be decoded ({reason}){others}; replace or delete that file, or set "
      "config.skip_bad_images=True to skip and count such images.")


class Reader:
  """Example `index` of a split: read, preprocessed and checked, any failure in one sentence.

  The preprocessing stops short of a final `value_range`, which `finish(image, out)` writes into
  a row of a float32 batch (`preprocess.parse_for_batches`): the image of a row is uint8 for
  the usual strings, float32 only where an op before the last made it so.

  An image that cannot be decoded (by the source, as catalogue datasets decode when read, or by
  the `decode` op) raises `BadImageError` with `where` (the file or example) and `reason`; any
  other ValueError of an op is the preprocessing string's, and names `field`.
  """

  def __init__(self, source, *, dataset: str, split: str, preprocess: str, field: str):
    self.source, self.dataset, self.split = source, dataset, split
    self.preprocess, self.field = preprocess, field
    self.ops, self.finish = preprocess_lib.parse_for_batches(preprocess, field)

  def where(self, index: int, record: Optional[dict[str, Any]], short: bool = False) -> str:
    """"image 'train/cat/1.png' (example 7 of split 'train' of config.dataset=...)", or without
    a path (catalogue datasets) "example 7 of split ..."; `short`: without split and dataset."""
    example = f"example {index}" + ("" if short else
                                    f" of split {self.split!r} of config.dataset={self.dataset!r}")
    path = record.get("path") if isinstance(record, dict) else None
    if isinstance(path, np.ndarray):
      path = path.item()
    if isinstance(path, bytes):
      path = path.decode("utf-8", "replace")
    if not path:
      return example
    return f"image {path!r}" if short else f"image {path!r} ({example})"

  def _bad_image(self, index: int, record, reason: str) -> BadImageError:
    where = self.where(index, record)
    fix = ("replace or delete that file" if where.startswith("image ")
           else "prepare the dataset again")
    error = BadImageError(f"{where} cannot be decoded ({reason}); {fix}, or set "
                          "config.skip_bad_images=True to skip and count such images.")
    error.where, error.reason = where, reason
    return error

  def __call__(self, index: int, rng: np.random.Generator) -> Batch:
    record = None
    try:
      record = self.source[index]
      example = self.ops(record, rng)
    except BadImageError as error:
      raise self._bad_image(index, record, str(error)) from None
    except Exception as error:  # pylint: disable=broad-except
      if record is None:  # the source failed to decode the image it stores
        raise self._bad_image(index, None, preprocess_lib.image_error_reason(error)) from None
      if not isinstance(error, ValueError):
        raise
      raise ValueError(f"{self.field}={self.preprocess!r} fails on {self.where(index, record)}: "
                       f"{str(error).rstrip('.')}.") from None
    image = example["image"]
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3):
      raise ValueError(
          f"{self.field}={self.preprocess!r} gives {self.where(index, record)} a "
          f"{getattr(image, 'shape', type(image).__name__)} image, not [height, width, 3]; start "
          "it with 'decode'.")
    return {"image": image, "label": np.int32(example["label"])}


def check_one_size(reader: Reader, builder: tfds.core.DatasetBuilder
                   ) -> Optional[Tuple[int, int]]:
  """Runs the preprocessing on an image of each size an image folder's split holds (else on its
  first few examples), so that a string that fails, or leaves sizes varying, which cannot be
  stacked into batches, is one sentence now rather than a failure mid-run. Returns the one
  (height, width) it leaves, or None where no image tried could be decoded."""
  shapes = {}
  with builders.quiet_tfds():
    for name in split_names(reader.split):
      if name not in builder.info.splits:
        continue
      report = builders.folder_report(builder, name)
      if report is not None:
        indices = [index for _, _, index in report["sizes"]]
      else:
        indices = range(min(TRIAL_EXAMPLES, builder.info.splits[name].num_examples))
      source = reader.source if name == reader.split else SplitSource(
          str(builder.data_dir), name, as_data_source(builder, name))
      trial = Reader(source, dataset=reader.dataset, split=name, preprocess=reader.preprocess,
                      field=reader.field)
      for index in indices:
        try:
          row = trial(index, np.random.default_rng([0, index]))
        except BadImageError:
          continue  # the business of the iterators (and of skip_bad_images), not of this check
        shapes.setdefault(row["image"].shape[:2], trial.where(index, source[index], short=True))
  if len(shapes) > 1:
    (size, first), (other, second) = list(shapes.items())[:2]
    raise ValueError(
        f"{reader.field}={reader.preprocess!r} leaves images of split {reader.split!r} of "
        f"config.dataset={reader.dataset!r} at different sizes ({size[0]}x{size[1]} for "
        f"{first}, {other[0]}x{other[1]} for {second}), which cannot be stacked into batches; "
        "give them one size with resize(S), central_crop(S) after resize_small(S), or "
        "inception_crop(S).")
  return next(iter(shapes), None)
