r"""Images/s of `common_jax.data.train_iterator` against a plain tf.data pipeline doing the same
work on the same cores, measured in one process in interleaved rounds.

TensorFlow is never a dependency of this project, so this benchmark runs in a venv of its own:

  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -e . tensorflow-cpu        # tensorflow-cpu 2.21.0 was measured
  .venv-bench/bin/python benchmarks/input_vs_tfdata.py                     # 500 JPEGs, 256x256
  .venv-bench/bin/python benchmarks/input_vs_tfdata.py --workers 0,1,2,4 --rounds 7
  .venv-bench/bin/python benchmarks/input_vs_tfdata.py --folder /data/my_images   # your own

The image folder is the one `benchmarks/image_folder_workers.py` writes (`--root`, 256x256 JPEGs
of quality 90 about the size of ImageNet photos resized to 256), prepared as
`image_folder:<root>`. The settings, each started afresh, warmed up, then timed over `--batches`
batches of `--batch` in every round (the machine may be shared: each round times every setting
once, in turn, and the table reports medians over rounds):
- tf.data, as a user writes it: `Dataset.from_tensor_slices((paths, labels))`, shuffle, repeat,
  `map(load, num_parallel_calls=AUTOTUNE)`, `batch`, `prefetch(AUTOTUNE)`, iterated as numpy.
  `load` reads the file, draws an Inception box with `sample_distorted_bounding_box` (area
  0.05..1, aspect ratio 3/4..4/3, 10 attempts, else the whole image), decodes either the whole
  image then crops (`decode_jpeg`), or only the box (`decode_and_crop_jpeg`, faster), resizes to
  224x224 (`tf.image.resize`, bilinear), flips at random, scales to [-1, 1]: float32 batches.
- ours, w workers: `train_iterator(preprocess="decode|inception_crop(224)|flip_lr|
  value_range(-1,1)", worker_count=w)`, 0 workers being threads of this process only.
The ratio is ours over the faster tf.data variant.

TensorFlow in the process must not change what our pipeline computes: before TensorFlow is
imported, our first batch is taken and `tensorflow` must not be in `sys.modules` afterwards (the
pipeline does not import it, even where it is installed); after the import, the first batch of
a fresh iterator must be bit-identical. Its hash is printed, to compare with
`.venv/bin/python benchmarks/input_vs_tfdata.py --hash_only` in the project's own venv, which has
no TensorFlow.

"CPU ms/img" is the CPU time of this process and its children (Grain's workers) per image
during the timed batches: what an image costs, whatever else runs on the machine; "cores used"
is img/s x CPU ms/img. On a shared machine the img/s of both pipelines move with the load, the
CPU ms/img much less.

Measured on the 2-core x86 VM, idle (load average 1.3-1.7; 2026-11-27 06:22 UTC), tensorflow-cpu
2.21.0, simplejpeg 1.9.0, opencv-python-headless 5.0.0.93, grain 0.2.18, 7 rounds of 20 batches:

  | pipeline | img/s | x best tf.data | CPU ms/img | cores used |
  |---|---:|---:|---:|---:|
  | tf.data AUTOTUNE, decode_jpeg | 2572 | 0.86 | 0.77 | 1.97 |
  | tf.data AUTOTUNE, decode_and_crop_jpeg | 3006 | 1.00 | 0.67 | 2.02 |
  | ours, 0 workers | 3083 | 1.03 | 0.59 | 1.83 |
  | ours, 1 worker | 2135 | 0.71 | 0.86 | 1.83 |
  | ours, 2 workers | 2232 | 0.74 | 0.86 | 1.92 |

Eight runs that half hour (5 or 7 rounds; some with `--workers 0` or `0,2`) gave ours with 0
workers 0.86, 0.98, 1.00, 1.00, 1.01, 1.02, 1.03 and 1.03x the best tf.data (median 1.005), at
0.59-0.70 CPU ms/img against 0.64-0.69 (medians 0.61 and 0.67).

An image costs us less CPU than it costs tf.data; what keeps the img/s ratio near 1.0 is the
cores: tf.data's C++ threads keep both busy (1.95-2.0), our threads 1.7-1.86 (each batch is one
thread's, and the per-example Python, about 0.1 ms of an image, holds the GIL; 3, 4 or 6 threads
did no better). Worker processes cost more per image (0.77-0.95 CPU ms/img, the main process's
share included: batches cross between processes, and the final scaling runs in the main one).

Where the time went, and what changed it (one op at a time on these images, CPU time):
- JPEG decode: PIL 0.28-0.41 ms, simplejpeg 0.22-0.24 (both libjpeg-turbo, the same pixels;
  PIL copies the rows through its own buffers). tf.data's decode_and_crop_jpeg decodes only the
  rows and blocks of the box, which neither library offers.
- crop and bilinear resize to 224x224: PIL 0.45-0.48 ms, OpenCV 0.07.
- stacking the batch: 0.15 ms an image on average while flipped images were mirrored numpy
  views (copied element by element); 0.01 with OpenCV's flip (itself 0.01) making them plain.
- malloc handing each freed image back to the kernel and faulting it in again: about 0.06 ms
  (`common_jax.data.batching.prepare_process`).
- tfds parsing an image folder's record: 45 us, against 16 us for the same parse done directly
  (`common_jax.data.sources.SplitSource`).
- inception_crop's resize: bilinear also where the crop is larger than 224, as tf.image.resize
  in the reference pipelines (area averaging there cost 0.14 ms against 0.07).
Before these (PIL ops, the same command, idle machine): ours 0.49-0.50x tf.data at 1.22-1.30
CPU ms/img.
"""

import argparse
import hashlib
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common_jax import data  # pylint: disable=g-import-not-at-top
from image_folder_workers import cpu_seconds, write_folder  # pylint: disable=g-import-not-at-top

PREPROCESS = "decode|inception_crop(224)|flip_lr|value_range(-1,1)"
SIZE = 224


def list_folder(root: str) -> tuple[list[str], list[int]]:
  """Paths and labels of root/train/<class>/*, classes sorted as the image folder builder does."""
  train = os.path.join(root, "train")
  classes = sorted(name for name in os.listdir(train) if not name.startswith("."))
  paths, labels = [], []
  for label, name in enumerate(classes):
    for file in sorted(os.listdir(os.path.join(train, name))):
      if file.lower().endswith((".png", ".jpg", ".jpeg")) and not file.startswith("."):
        paths.append(os.path.join(train, name, file))
        labels.append(label)
  return paths, labels


def tf_dataset(paths, labels, batch: int, seed: int, crop_in_decode: bool):
  """The plain tf.data pipeline (see the module docstring)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def load(path, label):
    blob = tf.io.read_file(path)
    shape = tf.image.extract_jpeg_shape(blob)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.05, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    top, left, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    if crop_in_decode:
      image = tf.image.decode_and_crop_jpeg(blob, tf.stack([top, left, height, width]),
                                            channels=3)
    else:
      image = tf.image.decode_jpeg(blob, channels=3)
      image = tf.image.crop_to_bounding_box(image, top, left, height, width)
    image = tf.image.resize(image, [SIZE, SIZE])  # bilinear, float32
    image = tf.image.random_flip_left_right(image)
    return image / 127.5 - 1.0, label

  dataset = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int32)))
  dataset = dataset.shuffle(len(paths), seed=seed).repeat()
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def ours(dataset: str, data_dir: str, batch: int, seed: int, workers: int):
  return data.train_iterator(dataset=dataset, split="train", preprocess=PREPROCESS,
                             global_batch_size=batch, seed=seed, data_dir=data_dir,
                             worker_count=workers)


def time_iterator(iterator, warmup: int, batches: int, batch: int) -> tuple[float, float]:
  """(images/s, CPU ms per image of this process and its children) over `batches` batches after
  `warmup` (start-up, and the buffers filled meanwhile)."""
  for _ in range(warmup):
    next(iterator)
  began, cpu = time.perf_counter(), sum(cpu_seconds())
  for _ in range(batches):
    images, _ = unpack(next(iterator))
  seconds, cpu = time.perf_counter() - began, sum(cpu_seconds()) - cpu
  assert images.shape == (batch, SIZE, SIZE, 3) and images.dtype == np.float32, images.shape
  return batches * batch / seconds, cpu / (batches * batch) * 1e3


def unpack(batch):
  return (batch["image"], batch["label"]) if isinstance(batch, dict) else batch


def first_batch_hash(dataset: str, data_dir: str) -> str:
  iterator = ours(dataset, data_dir, 8, 0, 0)
  batch = next(iterator)
  iterator.close()
  digest = hashlib.sha256(batch["image"].tobytes() + batch["label"].tobytes())
  return digest.hexdigest()[:16]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folder", help="an existing <root> of image_folder:<root> to time")
  parser.add_argument("--root", default="/tmp/image_folder_benchmark",
                      help="where the synthetic folder is written when --folder is not given")
  parser.add_argument("--data_dir", default="/tmp/image_folder_benchmark_tfds")
  parser.add_argument("--images", type=int, default=500)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=20, help="timed batches per setting/round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--hash_only", action="store_true",
                      help="print the hash of our first batch and stop (no TensorFlow needed)")
  args = parser.parse_args()

  root = os.path.abspath(args.folder) if args.folder else args.root
  if not args.folder:
    write_folder(root, args.images, args.size)
  dataset = f"image_folder:{root}"
  data.get_builder(dataset, args.data_dir)  # prepared once, outside the timings
  digest = first_batch_hash(dataset, args.data_dir)
  print(f"our first batch: sha256 {digest}; tensorflow imported by it: "
        f"{'tensorflow' in sys.modules}", flush=True)
  if args.hash_only:
    return
  assert "tensorflow" not in sys.modules, "our pipeline imported TensorFlow"
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  after = first_batch_hash(dataset, args.data_dir)
  assert after == digest, f"TensorFlow in the process changed our first batch ({after})"
  print(f"with tensorflow {tf.__version__} imported: the same first batch", flush=True)

  paths, labels = list_folder(root)
  settings = {"tf.data AUTOTUNE, decode_jpeg": "tf", "tf.data AUTOTUNE, decode_and_crop_jpeg":
              "tf_crop"}
  settings.update({f"ours, {w} worker{'s' if w != 1 else ''}": w
                   for w in (int(w) for w in args.workers.split(","))})
  rates = {name: [] for name in settings}
  cpu_ms = {name: [] for name in settings}
  for round_index in range(args.rounds):
    for name, setting in settings.items():
      if isinstance(setting, str):
        iterator = tf_dataset(paths, labels, args.batch, round_index,
                              setting == "tf_crop").as_numpy_iterator()
        rate, ms = time_iterator(iterator, 3, args.batches, args.batch)
        del iterator
      else:
        iterator = ours(dataset, args.data_dir, args.batch, round_index, setting)
        try:
          rate, ms = time_iterator(iterator, 3 + 2 * setting, args.batches, args.batch)
        finally:
          iterator.close()
      rates[name].append(rate)
      cpu_ms[name].append(ms)
    print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
        f"{name} {rates[name][-1]:.0f}" for name in settings) + " img/s", flush=True)

  median = {name: statistics.median(values) for name, values in rates.items()}
  best_tf = max(median[name] for name, setting in settings.items() if isinstance(setting, str))
  print(f"\n{len(paths)} images of {root}/train, {PREPROCESS!r}, batch {args.batch}; "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} "
        f"(1 min) at the end; medians of {args.rounds} interleaved rounds of {args.batches} "
        "batches\n")
  print("| pipeline | img/s | x best tf.data | CPU ms/img | cores used |")
  print("|---|---:|---:|---:|---:|")
  for name in settings:
    ms = statistics.median(cpu_ms[name])
    print(f"| {name} | {median[name]:.0f} | {median[name] / best_tf:.2f} | {ms:.2f} | "
          f"{median[name] * ms / 1e3:.2f} |")


if __name__ == "__main__":
  main()
