"""How the iterators' examples become batches: stacked (uint8 images, as the per-example ops
leave them), finished into float32 rows (the final value_range), read by threads or worker
processes, in a per-epoch order that is a pure function of (seed, epoch); and the `Batches`
iterator that reports undecodable images skipped.
"""

import collections
import ctypes
import os
import sys
import threading
from typing import Callable, Iterator, Optional

from absl import flags
import cv2
import grain
import numpy as np

Batch = dict[str, np.ndarray]
BAD = "_bad_images"  # a row's undecodable images: [(where, reason)], taken off before yielding
_WARNED: set[str] = set()  # undecodable images already reported by this process


# glibc's mallopt parameters, and what `prepare_process` sets them to.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_ALLOCATOR_SETTINGS = {_M_TRIM_THRESHOLD: 64 << 20, _M_TOP_PAD: 16 << 20,
                       _M_MMAP_THRESHOLD: 32 << 20}
# Where a user has tuned glibc's allocator or preloaded another, it is left as it is.
_ALLOCATOR_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_",
                          "GLIBC_TUNABLES")
_prepared = False


def prepare_process() -> None:
  """Once per process that computes batches (the main one, and each Grain worker):

  - glibc's malloc keeps freed memory for the next image instead of handing it back to the
    kernel. By default, freeing a decoded image or a batch (0.2 to 20 MB) returns its pages and
    the next allocation of that size faults them back in, zeroed: about 0.06 ms of CPU per
    224x224 image, a tenth of what the pipeline spends on one (benchmarks/input_vs_tfdata.py).
    Up to 64 MB freed per allocator arena is kept, and blocks under 32 MB (a float32 batch of 32
    images of 224x224 is 19 MB) come from the heap, glibc's largest automatic threshold. Not where
    the environment tunes glibc's allocator (`_ALLOCATOR_ENVIRONMENT`) or preloads another
    (jemalloc, tcmalloc, mimalloc), nor elsewhere than Linux with glibc.
  - OpenCV computes each resize in the calling thread: the pipeline's threads and workers are
    its parallelism, and OpenCV's own pool (a thread per core, for outputs over 65k pixels) would
    oversubscribe the cores.
  """
  global _prepared
  if _prepared:
    return
  _prepared = True
  cv2.setNumThreads(1)
  if (not sys.platform.startswith("linux") or any(map(os.environ.get, _ALLOCATOR_ENVIRONMENT))
      or "malloc" in os.environ.get("LD_PRELOAD", "")):
    return
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
    return
  for parameter, value in _ALLOCATOR_SETTINGS.items():
    mallopt(parameter, value)


def stack_fn(field: str, preprocess: str) -> Callable[[list[Batch]], Batch]:
  """Stacks rows into a batch (the lists of undecodable images are joined, not stacked), with
  one sentence if sizes vary after all (a catalogue dataset past the examples checked). Images
  stay as the per-example ops leave them (uint8 before a final value_range): `finish_fn`."""
  def stack(rows):
    prepare_process()  # here, so that worker processes do it too
    shapes = {row["image"].shape for row in rows}
    if len(shapes) > 1:
      raise ValueError(f"{field}={preprocess!r} gives images of shapes {sorted(shapes)} in one "
                       "batch; give them one size with resize(S), or central_crop(S) after "
                       "resize_small(S).")
    return {key: ([bad for row in rows for bad in row[key]] if key == BAD
                  else np.stack([row[key] for row in rows])) for key in rows[0]}
  return stack


# Output bytes `finish_fn` writes per call at most: one 224x224 float32 image (602 kB) a call,
# or 1,365 of the 8x8 digits.
_FINISH_CHUNK_BYTES = 1 << 20


def finish_fn(finish: Callable[[np.ndarray, np.ndarray], None]) -> Callable[[Batch], Batch]:
  """A stacked batch -> its float32 images: `finish` (the final value_range, see
  `preprocess.parse_for_batches`) of the rows written into the rows of the output, a chunk of
  rows at a time (up to `_FINISH_CHUNK_BYTES` of output: large images one row at a time, which
  stays in the processor's cache where the whole batch at once would not; small ones many rows
  per call, where the calls would cost more than the work), padding rows (mask 0) zeros."""
  def finish_batch(batch):
    images = np.empty(batch["image"].shape, np.float32)
    rows = max(1, _FINISH_CHUNK_BYTES // max(images[:1].nbytes, 1))
    for start in range(0, len(images), rows):
      finish(batch["image"][start:start + rows], images[start:start + rows])
    if "mask" in batch:
      images[np.asarray(batch["mask"]) == 0] = 0
    return {**batch, "image": images}
  return finish_batch


class Batches:
  """The iterator `train_iterator` and `eval_iterator` return: Grain's batches, with the
  undecodable images skipped so far (`skip_bad_images=True`) reported and counted.

  Attributes:
    bad_images: {where (file or example, split, dataset): times skipped} in the batches yielded.
  """

  def __init__(self, iterator: Iterator[Batch], *, skipping: str,
               summary: Optional[Callable[[int], str]] = None):
    self._iterator, self._skipping, self._summary = iterator, skipping, summary
    self.bad_images: collections.Counter = collections.Counter()

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> Batch:
    try:
      batch = next(self._iterator)
    except StopIteration:
      if self.bad_images and self._summary:
        warn(self._summary(sum(self.bad_images.values())))
      raise
    except BaseException:
      self.close()  # worker processes and threads end with the error, not at exit
      raise
    for where, reason in batch.pop(BAD, ()):
      self.bad_images[where] += 1
      if where not in _WARNED:
        _WARNED.add(where)
        warn(f"skipped {where}, which cannot be decoded ({reason}); {self._skipping} "
              f"(config.skip_bad_images=True), {len(self.bad_images)} undecodable image"
              f"{'s' if len(self.bad_images) > 1 else ''} so far.")
    return batch

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def warn(line: str) -> None:
  print(f"warning: {line}", file=sys.stderr, flush=True)


def iterate(batches: grain.MapDataset, finish: Callable[[Batch], Batch], prefetch: int,
             worker_count: int) -> Iterator[Batch]:
  """The batches of `batches` (images as the per-example ops leave them) through `finish`."""
  prepare_process()
  if worker_count == 0:
    # One thread per batch in flight: decoding and resizing (simplejpeg, OpenCV) and numpy
    # release the GIL, so the threads of one process compute batches side by side.
    read_options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    return iter(batches.map(finish).to_iter_dataset(read_options))
  # A worker computes one batch at a time, the workers side by side: two threads in a worker
  # contend for its GIL (benchmarks/image_folder_workers.py, 2 workers on 2 cores, five runs
  # against three: 0.44-0.59 against 0.66-0.75 CPU ms per image in the workers, 2,487-3,373
  # against 1,778-2,342 img/s).
  read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(prefetch, 1))
  if not flags.FLAGS.is_parsed():
    # Grain's workers read Grain's absl flags; a program not started by absl.app.run has not
    # parsed them, and then their defaults are what it means.
    flags.FLAGS.mark_as_parsed()
  # Grain slices the batches over the processes and interleaves them back in order, so the
  # output does not depend on worker_count. An error in a worker (a ValueError sentence) is
  # raised again in this process, unchanged.
  stream = batches.to_iter_dataset(read_options).mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count))
  # The workers hand over uint8 images, a quarter of the bytes of float32 ones to copy through
  # shared memory; the final value_range runs here, in a thread of its own.
  stream = stream.map(finish)
  if prefetch:
    stream = grain.experimental.ThreadPrefetchIterDataset(stream, prefetch_buffer_size=prefetch)
  return iter(stream)


class EpochOrder:
  """The index of the example at each position of the train stream: epoch e (positions
  [e * N, (e + 1) * N)) is the permutation of the split's N indices drawn from
  `np.random.default_rng([seed, e, 2])`, a pure function of (seed, e).

  Each thread or worker process draws the permutation of an epoch once and keeps the last two
  (a batch can straddle two epochs): one lookup then costs nothing, where Grain's `shuffle`
  computes each index anew (about 60 us a lookup for a split of 500, 260 us for 100). It costs
  4 bytes per example and epoch kept, 10 MB for ImageNet.
  """

  def __init__(self, seed: int, num_examples: int):
    self._seed, self._num_examples = seed, num_examples
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __reduce__(self):  # pickled into each worker without its lock and epochs
    return EpochOrder, (self._seed, self._num_examples)

  def __call__(self, position: int, offset: int) -> int:
    epoch = position // self._num_examples
    order = self._orders.get(epoch)
    if order is None:
      order = np.random.default_rng([self._seed, epoch, 2]).permutation(
          self._num_examples).astype(np.int32 if self._num_examples < 2**31 else np.int64)
      with self._lock:
        self._orders[epoch] = order
        for old in sorted(self._orders)[:-2]:
          del self._orders[old]
    return int(order[offset])
