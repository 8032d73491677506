"""Deterministic, resumable train and eval iterators: Grain MapDatasets over tfds data sources.

The train stream is a pure function of (seed, position), by construction:

    position p = 0, 1, 2, ...                        one stream shared by all processes
    example at p = permutation(seed, epoch = p // N)[p % N]     N examples in the split
    augmentation rng at p = np.random.default_rng([seed, p])
    global batch at step s = positions [s * B, (s + 1) * B)
    process k's local batch at step s = rows [k * B / P, (k + 1) * B / P) of it

Nothing depends on iterator state, thread scheduling or how many steps ran before, so
`start_step=N` yields exactly what an unbroken run yields from step N on, and the process count
only decides who computes which rows.

Bad input is one sentence (a ValueError), before the first batch where it can be known: the
dataset and split (`check_dataset`), the preprocessing string, and whether it gives the images of
a split one size (`check_preprocess`, which runs it on an image of each size an image folder
holds, or on the first few examples of other datasets). An image that cannot be decoded stops
the stream with one sentence naming its file (image folders) or example, the split and the fix;
the build of an image folder reads every file's header, so a file no reader recognises (text,
empty, cut short) is refused before the first batch too. With `skip_bad_images=True` such
images are skipped instead, deterministically (see `train_iterator`), each reported once by a
`warning:` line on stderr and counted in the iterator's `bad_images`.
"""

import dataclasses
from typing import Optional, Tuple

import grain
import numpy as np
import tensorflow_datasets as tfds

from common_jax.data import batching
from common_jax.data import builders
from common_jax.data import preprocess as preprocess_lib
from common_jax.data import sources

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and the loop need to know about a dataset before reading it.

  Attributes:
    name: the `config.dataset` string.
    num_classes: labels are int32 in [0, num_classes).
    splits: {split name: number of examples}.
    image_shape: (height, width, 3) of decoded images when all share it (before preprocessing),
      else None (image folders of mixed sizes, ImageNet).
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


TRAIN_FIELD, EVAL_FIELD = "config.preprocess_train", "config.preprocess_eval"
BadImageError = preprocess_lib.BadImageError
Batches = batching.Batches
_MAX_DRAWS = 100  # substitutes tried for one position before a split counts as unreadable
def _open_for_reading(dataset: str, split: str, preprocess: str, field: str,
                      data_dir: Optional[str], manual_dir: Optional[str],
                      skip_bad_images: bool
                      ) -> tuple[tfds.core.DatasetBuilder, sources.SplitSource]:
  """The checks every iterator makes before its first batch; the builder and source."""
  preprocess_lib.check(preprocess, field)
  builder, source = sources.open_split(dataset, split, data_dir, manual_dir)
  sources.check_readable(builder, dataset, split, skip_bad_images)
  return builder, source


def train_iterator(*, dataset: str, split: str, preprocess: str, global_batch_size: int,
                   seed: int, start_step: int = 0, data_dir: Optional[str] = None,
                   manual_dir: Optional[str] = None, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0,
                   prefetch: int = 2, cache: bool = False,
                   skip_bad_images: bool = False) -> Batches:
  """Endless, shuffled, augmented local batches, step `start_step` first.

  Args:
    dataset: `config.dataset` (see `common_jax.data.builders`).
    split: e.g. "train" or "train[:90%]".
    preprocess: op string (`config.preprocess_train`), e.g.
      "decode|random_crop(32,pad=4)|flip_lr|value_range(-1,1)".
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
    skip_bad_images: False: an image that cannot be decoded stops the stream with one sentence
      naming it (a ValueError, `BadImageError`); an image folder with files no reader recognises
      is refused before the first batch. True: at a position whose example cannot be decoded, a
      substitute is drawn from the split with `np.random.default_rng([seed, position, 1])`
      until one decodes, and augmented with the position's own rng. The stream stays a pure
      function of (seed, position), so resuming at step N still gives the unbroken run's
      batches; an epoch then holds the substitutes in place of the bad images. Each bad image is
      reported once per process by a `warning:` line on stderr with the running count, and
      counted in the returned iterator's `bad_images`.

  Returns:
    An iterator (`Batches`; `close()` ends its worker processes) of
    {"image": [local_batch, height, width, 3] float32 (in [-1, 1] after value_range(-1,1)),
     "label": [local_batch] int32}, local_batch = global_batch_size // process_count. The global
    batch at a step is the concatenation over process_index of the local batches.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  if not 0 <= seed < 2**32:
    raise ValueError(f"config.seed={seed} must be in [0, 2**32); change config.seed.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0 (the step restored, or 0).")
  builder, source = _open_for_reading(dataset, split, preprocess, TRAIN_FIELD, data_dir,
                                      manual_dir, skip_bad_images)
  reader = sources.Reader(source, dataset=dataset, split=split, preprocess=preprocess,
                          field=TRAIN_FIELD)
  sources.check_one_size(reader, builder)
  if cache:
    reader.source = sources.CachedSource(source)
  num_examples = len(source)

  def example_at(position: int, index: int) -> Batch:
    if not skip_bad_images:
      return reader(index, np.random.default_rng([seed, position]))
    bad, draws = [], None
    for _ in range(_MAX_DRAWS):
      try:
        return {**reader(index, np.random.default_rng([seed, position])), batching.BAD: bad}
      except BadImageError as error:
        bad.append((error.where, error.reason))
        if draws is None:
          draws = np.random.default_rng([seed, position, 1])
        index = int(draws.integers(num_examples))
    raise ValueError(
        f"{_MAX_DRAWS} examples drawn in a row from split {split!r} of "
        f"config.dataset={dataset!r} "
        f"cannot be decoded, {bad[0][0]} among them ({bad[0][1]}); most of the split is "
        "unreadable, so repair the data rather than skip it.")

  # Shuffling the indices permutes exactly as shuffling the records would, and lets a failure
  # name its example. range(N).repeat() gives position p its offset p % N in its epoch.
  order = batching.EpochOrder(seed, num_examples)
  stream = grain.MapDataset.range(num_examples).repeat().map_with_index(
      lambda position, offset: example_at(position, order(position, offset)))
  # Local batch j holds positions [j * local, (j + 1) * local), so global step s is local batches
  # s * process_count ... s * process_count + process_count - 1.
  first_batch = start_step * process_count + process_index
  batches = stream.batch(local_batch_size, batch_fn=batching.stack_fn(TRAIN_FIELD, preprocess))
  batches = batches[first_batch::process_count]
  return Batches(batching.iterate(batches, batching.finish_fn(reader.finish), prefetch,
                                 worker_count),
                 skipping="another example of the split takes its place each time it comes up")


def eval_iterator(*, dataset: str, split: str, preprocess: str, global_batch_size: int,
                  data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                  process_index: int = 0, process_count: int = 1,
                  skip_bad_images: bool = False) -> Batches:
  """One ordered pass over a split, zero-padded to whole global batches.

  Every process yields ceil(num_examples / global_batch_size) batches; summing `mask`-weighted
  metrics over all of them counts each example exactly once. Random ops, if any, get a fixed
  per-position rng, so evaluation is repeatable. `preprocess` (`config.preprocess_eval`) must
  give every image one size; a string that does not is refused before the first batch.

  skip_bad_images: False: an image that cannot be decoded stops the pass with one sentence
  naming it. True: its row becomes a padding row (mask 0), so the set evaluated is the split
  less its undecodable images, and metrics average over fewer examples than the split holds;
  each is reported once per process by a `warning:` line, and after the pass one `warning:`
  line gives how many rows were left out.

  Returns:
    An iterator (`Batches`) of {"image": [local_batch, height, width, 3] float32,
    "label": [local_batch] int32, "mask": [local_batch] float32, 1 for a real example and 0 for
    a padding row (all zeros)}.
  """
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  builder, source = _open_for_reading(dataset, split, preprocess, EVAL_FIELD, data_dir,
                                      manual_dir, skip_bad_images)
  reader = sources.Reader(source, dataset=dataset, split=split, preprocess=preprocess,
                          field=EVAL_FIELD)
  sources.check_one_size(reader, builder)
  num_examples = len(source)
  num_batches = -(-num_examples // global_batch_size)
  # Padding rows copy the shape of a real one so that padded batches stack (the check above made
  # sure the preprocessing gives one shape).
  first = None
  for index in range(num_examples):
    try:
      first = reader(index, np.random.default_rng([0, index]))
      break
    except BadImageError:
      if not skip_bad_images:
        raise
  if first is None:
    raise ValueError(f"no image of split {split!r} of config.dataset={dataset!r} can be "
                     "decoded; repair the data.")
  padding = {**{key: np.zeros_like(value) for key, value in first.items()}, "mask": np.float32(0)}
  if skip_bad_images:
    padding[batching.BAD] = []

  def example_at(position: int) -> Batch:
    if position >= num_examples:
      return padding
    try:
      example = reader(position, np.random.default_rng([0, position]))
    except BadImageError as error:
      if not skip_bad_images:
        raise
      return {**padding, batching.BAD: [(error.where, error.reason)]}
    return {**example, "mask": np.float32(1), **({batching.BAD: []} if skip_bad_images else {})}

  positions = grain.MapDataset.range(num_batches * global_batch_size)
  batches = positions.map(example_at).batch(local_batch_size,
                                            batch_fn=batching.stack_fn(EVAL_FIELD, preprocess))
  batches = batches[process_index::process_count]
  return Batches(
      batching.iterate(batches, batching.finish_fn(reader.finish), prefetch=2, worker_count=0),
      skipping="it is left out of the evaluation",
      summary=lambda count: (
          f"{count} undecodable image{'s were' if count > 1 else ' was'} left out of this "
          f"evaluation of split {split!r}, which covers the rest (config.skip_bad_images=True)."))


def dataset_info(dataset: str, data_dir: Optional[str] = None,
                 manual_dir: Optional[str] = None) -> DatasetInfo:
  """Number of classes, split sizes and (if fixed) image shape; builds our own sets if needed."""
  builder = sources.classification_builder(dataset, data_dir, manual_dir)
  features = builder.info.features
  shape = tuple(features["image"].shape)
  fixed = len(shape) == 3 and all(isinstance(dim, int) for dim in shape)
  reports = [builders.folder_report(builder, name) for name in builder.info.splits]
  if all(reports):  # an image folder: the sizes its build found
    sizes = {tuple(size[:2]) for report in reports for size in report["sizes"]}
    if all(report["num_sizes"] == 1 for report in reports) and len(sizes) == 1:
      shape, fixed = (*sizes.pop(), 3), True
  return DatasetInfo(
      name=dataset,
      num_classes=int(features["label"].num_classes),
      splits={name: int(split.num_examples) for name, split in builder.info.splits.items()},
      image_shape=(shape[0], shape[1], 3) if fixed else None)


def check_dataset(dataset: str, split: str, data_dir: Optional[str] = None,
                  manual_dir: Optional[str] = None, *, split_field: str = "split",
                  skip_bad_images: bool = False) -> None:
  """Raises the clear errors of a bad `config.dataset` or split now, before any compute.

  Builds our own datasets if needed. `split_field` ("config.train_split", "config.eval_split")
  is the config field the split came from, named in the errors. Unless `skip_bad_images`, an
  image folder whose split holds files no image reader recognises is refused (one sentence
  naming the first, `BadImageError`).
  """
  builder, _ = sources.open_split(dataset, split, data_dir, manual_dir, split_field)
  sources.check_readable(builder, dataset, split, skip_bad_images)


def check_preprocess(spec: str, field: str, *, dataset: Optional[str] = None,
                     split: Optional[str] = None, data_dir: Optional[str] = None,
                     manual_dir: Optional[str] = None) -> Optional[Tuple[int, int]]:
  """Raises one sentence naming `field` for a preprocessing string that cannot work.

  Without a dataset, the string alone: the syntax, known ops (`OPS`) and their arguments, and
  `decode` first and once. With `dataset` and `split` as well (the split the string is for),
  it is run on an image of each size an image folder's split holds, or on the first 8 examples
  of another dataset: an op that fails there (a crop larger than the images), or images of
  different sizes, which cannot be stacked into batches, are refused too. Images that cannot be
  decoded are left to `check_dataset` and the iterators.

  Args:
    spec: the string, e.g. config.preprocess_train.
    field: the config field it came from, "config.preprocess_train" or "config.preprocess_eval".
    dataset, split, data_dir, manual_dir: as for `check_dataset` (call that first).

  Returns:
    The (height, width) of the images the string leaves: with a dataset, that of the images
    tried (None where none could be decoded); without one, what the string alone says
    (`preprocess.output_size`: None where that depends on the images).
  """
  preprocess_lib.check(spec, field)
  if dataset is None or split is None:
    return preprocess_lib.output_size(spec, field)
  builder, source = sources.open_split(dataset, split, data_dir, manual_dir)
  reader = sources.Reader(source, dataset=dataset, split=split, preprocess=spec, field=field)
  return sources.check_one_size(reader, builder)
