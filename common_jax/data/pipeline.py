"""Deterministic, resumable train and eval iterators: Grain MapDatasets over tfds data sources.

The train stream is a pure function of (seed, position), by construction:

    position p = 0, 1, 2, ...                        one stream shared by all processes
    example at p = shuffle(seed, epoch = p // N)[p % N]     Grain `shuffle` then `repeat`
    augmentation rng at p = np.random.default_rng([seed, p])
    global batch at step s = positions [s * B, (s + 1) * B)
    process k's local batch at step s = rows [k * B / P, (k + 1) * B / P) of it

Nothing depends on iterator state, thread scheduling or how many steps ran before, so
`start_step=N` yields exactly what an unbroken run yields from step N on, and the process count
only decides who computes which rows.
"""

import dataclasses
from typing import Any, Callable, Iterator, Optional

from absl import flags
import grain
import numpy as np
import tensorflow_datasets as tfds

from common_jax.data import builders
from common_jax.data import preprocess as preprocess_lib

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and the loop need to know about a dataset before reading it.

  Attributes:
    name: the `config.dataset` string.
    num_classes: labels are int32 in [0, num_classes).
    splits: {split name: number of examples}.
    image_shape: (height, width, 3) of decoded images when all share it (before preprocessing),
      else None (e.g. image folders, ImageNet).
  """
  name: str
  num_classes: int
  splits: dict[str, int]
  image_shape: Optional[tuple[int, int, int]]


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"config.batch_size={global_batch_size} must be a positive multiple of the "
                     f"number of processes ({process_count}); change config.batch_size.")
  return global_batch_size // process_count


def _classification_builder(dataset: str, data_dir: Optional[str],
                            manual_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  builder = builders.get_builder(dataset, data_dir, manual_dir)
  features = builder.info.features
  if ("image" not in features or "label" not in features
      or not isinstance(features["label"], tfds.features.ClassLabel)):
    raise ValueError(
        f"config.dataset={dataset!r} has features {list(features)}, but the pipeline needs an "
        "'image' and a class 'label'; choose an image classification dataset.")
  return builder


class _SplitSource:
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
        source = tfds.builder_from_directory(builder_dir).as_data_source(split=split)
    self._source = source

  def __reduce__(self):
    return _SplitSource, (self._builder_dir, self._split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[index]


def _data_source(dataset: str, split: str, data_dir: Optional[str],
                 manual_dir: Optional[str]) -> _SplitSource:
  """The random-access source of one split (a split spec such as 'train[:90%]' works too)."""
  builder = _classification_builder(dataset, data_dir, manual_dir)
  try:
    with builders.quiet_tfds():
      source = builder.as_data_source(split=split)
  except (ValueError, KeyError) as error:
    raise ValueError(
        f"split {split!r} cannot be read from config.dataset={dataset!r} ({error}); use one of "
        f"{sorted(builder.info.splits)}, or a slice such as 'train[:90%]'.") from None
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"split {split!r} of config.dataset={dataset!r} is empty; choose another.")
  return _SplitSource(str(builder.data_dir), split, source)


def _example_fn(preprocess: str) -> Callable[[dict[str, Any], np.random.Generator], Batch]:
  """Parses the op string; the returned function keeps only "image" float32 and "label" int32."""
  ops = preprocess_lib.parse(preprocess)

  def process(example, rng):
    example = ops(example, rng)
    image = example["image"]
    if not (isinstance(image, np.ndarray) and image.ndim == 3):
      raise ValueError(f"preprocess string {preprocess!r} does not produce an [height, width, 3] "
                       "image; start it with 'decode'.")
    return {"image": image.astype(np.float32, copy=False), "label": np.int32(example["label"])}
  return process


def _stack_fn(preprocess: str) -> Callable[[list[Batch]], Batch]:
  """Stacks rows into a batch, with a clear error when the op string leaves sizes varying."""
  def stack(rows):
    shapes = {row["image"].shape for row in rows}
    if len(shapes) > 1:
      raise ValueError(f"preprocess string {preprocess!r} gives images of shapes {sorted(shapes)} "
                       "in one batch; give them one size, e.g. with resize(224) or central_crop.")
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
  return stack


def _iterate(batches: grain.MapDataset, prefetch: int, worker_count: int) -> Iterator[Batch]:
  # One thread per batch in flight: decoding (PIL) and numpy release the GIL for the larger
  # images, and for tiny ones the threads still overlap input work with the device step.
  read_options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
  stream = batches.to_iter_dataset(read_options)
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's workers read Grain's absl flags; a program not started by absl.app.run has not
      # parsed them, and then their defaults are what it means.
      flags.FLAGS.mark_as_parsed()
    # Grain slices the batches over the processes and interleaves them back in order, so the
    # output does not depend on worker_count.
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(stream)


def train_iterator(*, dataset: str, split: str, preprocess: str, global_batch_size: int,
                   seed: int, start_step: int = 0, data_dir: Optional[str] = None,
                   manual_dir: Optional[str] = None, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0,
                   prefetch: int = 2, cache: bool = False) -> Iterator[Batch]:
  """Endless, shuffled, augmented local batches, step `start_step` first.

  Args:
    dataset: `config.dataset` (see `common_jax.data.builders`).
    split: e.g. "train" or "train[:90%]".
    preprocess: op string, e.g. "decode|random_crop(32,pad=4)|flip_lr|value_range(-1,1)".
    global_batch_size: rows per step over all processes.
    seed: in [0, 2**32); fixes the order of every epoch and every random augmentation.
    start_step: first step to yield; batches are those an unbroken iterator yields from there.
    data_dir, manual_dir: where datasets are prepared (see `builders.get_builder`).
    process_index, process_count: this process's rows of each global batch (jax.process_index(),
      jax.process_count()).
    worker_count: child processes computing batches (0: threads of this process only).
    prefetch: batches computed ahead, each by its own thread (0: computed on demand).
    cache: read the whole split into memory once (for small datasets such as the bundled
      digits, whose records then cost nothing to read again); the batches are the same.

  Yields:
    {"image": [local_batch, height, width, 3] float32 (in [-1, 1] after value_range(-1,1)),
     "label": [local_batch] int32}, local_batch = global_batch_size // process_count. The global
    batch at a step is the concatenation over process_index of the local batches.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  if not 0 <= seed < 2**32:
    raise ValueError(f"config.seed={seed} must be in [0, 2**32); change config.seed.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0 (the step restored, or 0).")
  process = _example_fn(preprocess)
  source = _data_source(dataset, split, data_dir, manual_dir)
  if cache:
    source = [source[i] for i in range(len(source))]
  # Grain seeds epoch e with shuffle_seed + e; mixing the seed first keeps seed 1's first epoch
  # from being seed 0's second one.
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  stream = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  stream = stream.map_with_index(
      lambda position, example: process(example, np.random.default_rng([seed, position])))
  # Local batch j holds positions [j * local, (j + 1) * local), so global step s is local batches
  # s * process_count ... s * process_count + process_count - 1.
  first_batch = start_step * process_count + process_index
  batches = stream.batch(local_batch_size, batch_fn=_stack_fn(preprocess))
  batches = batches[first_batch::process_count]
  return _iterate(batches, prefetch, worker_count)


def eval_iterator(*, dataset: str, split: str, preprocess: str, global_batch_size: int,
                  data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                  process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """One ordered pass over a split, zero-padded to whole global batches.

  Every process yields ceil(num_examples / global_batch_size) batches; summing `mask`-weighted
  metrics over all of them counts each example exactly once. Random ops, if any, get a fixed
  per-position rng, so evaluation is repeatable.

  Yields:
    {"image": [local_batch, height, width, 3] float32, "label": [local_batch] int32,
     "mask": [local_batch] float32, 1 for a real example and 0 for a padding row (all zeros)}.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  process = _example_fn(preprocess)
  source = _data_source(dataset, split, data_dir, manual_dir)
  num_examples = len(source)
  num_batches = -(-num_examples // global_batch_size)
  # Padding rows copy the shape of a real one so that padded batches stack; eval preprocessing
  # must therefore give every image the same shape (e.g. resize_small + central_crop).
  first = process(source[0], np.random.default_rng([0, 0]))
  padding = {**{key: np.zeros_like(value) for key, value in first.items()}, "mask": np.float32(0)}

  def example_at(position: int) -> Batch:
    if position >= num_examples:
      return padding
    example = process(source[position], np.random.default_rng([0, position]))
    return {**example, "mask": np.float32(1)}

  positions = grain.MapDataset.range(num_batches * global_batch_size)
  batches = positions.map(example_at).batch(local_batch_size, batch_fn=_stack_fn(preprocess))
  batches = batches[process_index::process_count]
  return _iterate(batches, prefetch=2, worker_count=0)


def dataset_info(dataset: str, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None) -> DatasetInfo:
  """Number of classes, split sizes and (if fixed) image shape; builds our own sets if needed."""
  builder = _classification_builder(dataset, data_dir, manual_dir)
  features = builder.info.features
  shape = tuple(features["image"].shape)
  fixed = len(shape) == 3 and all(isinstance(dim, int) for dim in shape)
  return DatasetInfo(
      name=dataset,
      num_classes=int(features["label"].num_classes),
      splits={name: int(split.num_examples) for name, split in builder.info.splits.items()},
      image_shape=(shape[0], shape[1], 3) if fixed else None)


def check_dataset(dataset: str, split: str, data_dir: Optional[str] = None,
                  manual_dir: Optional[str] = None) -> None:
  """Raises the clear errors of a bad `config.dataset` or split now, before any compute."""
  _data_source(dataset, split, data_dir, manual_dir)
