r"""Images/s of the train pipeline on an image folder for 0, 1, 2, ... Grain worker processes,
against a plain one-thread PIL + numpy loop doing the same steps (PIL decodes and resizes, so its
pixels differ from the pipeline's OpenCV resize by rounding), measured in the same process.

  .venv/bin/python benchmarks/image_folder_workers.py                  # 500 JPEGs, 256x256
  .venv/bin/python benchmarks/image_folder_workers.py --workers 0,1,2,4 --rounds 7
  .venv/bin/python benchmarks/image_folder_workers.py --folder /data/my_images   # your own

Unless `--folder` names an existing image folder (its train split is read, nothing is written
there), writes (once) `--root`/train/<class>/*.jpg, 256x256 JPEGs (quality 90) of smooth random content
plus noise, about the size of ImageNet photos resized to 256, and prepares it as
`image_folder:<root>`. Then, in interleaved rounds (the machine may be shared: each round times
every setting once, and the table reports medians over rounds):
- baseline: one thread, PIL decode, inception crop to 224, flip, scale to [-1, 1] written as the
  plain numpy expression, np.stack into batches of `--batch`;
- pipeline, w workers: `common_jax.data.train_iterator` (preprocess
  "decode|inception_crop(224)|flip_lr|value_range(-1,1)", batch `--batch`, worker_count=w),
  started and warmed up, then timed over `--batches` batches;
- per op: each op of the string alone, one thread, ms per image.
"CPU ms/img" is the CPU time used during the timed batches, per image, by this process and by
its children (Grain's workers), read from Linux's /proc: what an image costs whoever computes it,
whatever else runs on the machine. One worker core then makes 1000 / (workers' CPU ms/img)
img/s, and a host that must feed N img/s needs about N x (workers' CPU ms/img) / 1000 worker
cores. Nothing here asserts a time.
"""

import argparse
import io
import math
import os
import statistics
import sys
import time

import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common_jax import data  # pylint: disable=g-import-not-at-top

PREPROCESS = "decode|inception_crop(224)|flip_lr|value_range(-1,1)"


def write_folder(root: str, count: int, size: int, classes: int = 10) -> list[str]:
  """`count` JPEGs under root/train/<class>/; kept if already there. Returns their paths."""
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    path = os.path.join(root, "train", f"class_{i % classes:02d}", f"{i:05d}.jpg")
    paths.append(path)
    if os.path.exists(path):
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    small = PIL.Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8))
    image = np.asarray(small.resize((size, size), PIL.Image.BICUBIC), np.float32)
    image += rng.normal(0, 6, image.shape)
    PIL.Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
  return paths


def cpu_seconds() -> tuple[float, float]:
  """User + system CPU seconds of (this process, its live descendants), from Linux's /proc."""
  tick = os.sysconf("SC_CLK_TCK")
  parents, times = {}, {}
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    parents[int(pid)] = int(fields[1])
    times[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
  family, total = {os.getpid()}, 0.0
  grew = True
  while grew:
    grew = False
    for pid, parent in parents.items():
      if parent in family and pid not in family:
        family.add(pid)
        grew = True
  own = times.get(os.getpid(), 0.0)
  return own, sum(times.get(pid, 0.0) for pid in family) - own


def cpu_since(before: tuple[float, float]) -> tuple[float, float]:
  now = cpu_seconds()
  return now[0] - before[0], now[1] - before[1]


def inception_box(rng, height, width, area_min=5, area_max=100):
  """The same box distribution as preprocess.inception_crop."""
  for _ in range(10):
    area = height * width * rng.uniform(area_min, area_max) / 100
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < crop_h <= height and 0 < crop_w <= width:
      top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  return 0, 0, height, width


def baseline_batch(encoded, rng, batch):
  """One thread, plain PIL + numpy: the steps the pipeline takes for one batch."""
  rows = []
  for _ in range(batch):
    blob = encoded[int(rng.integers(len(encoded)))]
    with PIL.Image.open(io.BytesIO(blob)) as pil:
      image = np.asarray(pil.convert("RGB"))
    top, left, h, w = inception_box(rng, *image.shape[:2])
    image = np.asarray(PIL.Image.fromarray(image[top:top + h, left:left + w]).resize(
        (224, 224), PIL.Image.BILINEAR))
    if rng.random() < 0.5:
      image = image[:, ::-1]
    rows.append((-1 + (image.astype(np.float32) - 0) * (2 / 255)).astype(np.float32))
  return np.stack(rows)


def time_baseline(encoded, batch, batches, seed):
  rng = np.random.default_rng(seed)
  baseline_batch(encoded, rng, batch)
  began, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    baseline_batch(encoded, rng, batch)
  return batches * batch / (time.perf_counter() - began), cpu_since(cpu)


def time_pipeline(dataset, data_dir, workers, batch, batches, seed):
  iterator = data.train_iterator(dataset=dataset, split="train", preprocess=PREPROCESS,
                                 global_batch_size=batch, seed=seed, data_dir=data_dir,
                                 worker_count=workers)
  try:
    # Start-up (spawning workers, opening the source) and the buffers filled meanwhile.
    for _ in range(3 + 2 * workers):
      next(iterator)
    began, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
      next(iterator)
    return batches * batch / (time.perf_counter() - began), cpu_since(cpu)
  finally:
    iterator.close()


def time_ops(encoded, repeats, seed):
  """ms per image of each op alone (one thread), on decoded/cropped inputs as the pipeline has."""
  rng = np.random.default_rng(seed)
  ops = {name: data.parse_preprocess(name) for name in
         ("decode", "inception_crop(224)", "flip_lr", "value_range(-1,1)")}
  inputs = [{"image": encoded[int(rng.integers(len(encoded)))]} for _ in range(repeats)]
  results = {}
  for name, op in ops.items():
    outputs = []
    began = time.perf_counter()
    for example in inputs:
      outputs.append(op(example, rng))
    results[name] = (time.perf_counter() - began) / repeats * 1e3
    if name != "flip_lr":
      inputs = outputs
  # The same scaling written as one numpy expression (what value_range did before: four float32
  # temporaries), on the same 224x224 images.
  outputs = []
  began = time.perf_counter()
  for example in inputs:
    outputs.append((-1 + (np.asarray(example["image"], np.float32) - 0) * (2 / 255)).astype(
        np.float32))
  results["  (value_range as a plain expression)"] = (time.perf_counter() - began) / repeats * 1e3
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--folder", help="an existing <root> of image_folder:<root> to time")
  parser.add_argument("--root", default="/tmp/image_folder_benchmark",
                      help="where the synthetic folder is written when --folder is not given")
  parser.add_argument("--data_dir", default="/tmp/image_folder_benchmark_tfds")
  parser.add_argument("--images", type=int, default=500)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=10, help="timed batches per setting/round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--feed", type=float, default=3000, help="img/s a host must feed")
  args = parser.parse_args()
  worker_counts = [int(w) for w in args.workers.split(",")]

  if args.folder:
    root = os.path.abspath(args.folder)
    paths = sorted(os.path.join(directory, name)
                   for directory, _, names in os.walk(os.path.join(root, "train"))
                   for name in names if name.lower().endswith((".png", ".jpg", ".jpeg")))
    source = f"{len(paths)} images of {root}/train"
  else:
    root = args.root
    paths = write_folder(root, args.images, args.size)
    source = f"{len(paths)} JPEGs {args.size}x{args.size}"
  encoded = []
  for path in paths:
    with open(path, "rb") as f:
      encoded.append(f.read())
  dataset, data_dir = f"image_folder:{root}", args.data_dir
  data.get_builder(dataset, data_dir)  # prepared once, outside the timings

  settings = ["baseline"] + [f"workers={w}" for w in worker_counts]
  rates = {name: [] for name in settings}
  own_ms = {name: [] for name in settings}  # CPU ms per image in this process
  child_ms = {name: [] for name in settings}  # ... and in its children (Grain's workers)
  op_ms = {}
  images = args.batches * args.batch
  for round_index in range(args.rounds):
    for name in settings:
      if name == "baseline":
        rate, (own, child) = time_baseline(encoded, args.batch, args.batches, round_index)
      else:
        rate, (own, child) = time_pipeline(dataset, data_dir, int(name.split("=")[1]),
                                           args.batch, args.batches, round_index)
      rates[name].append(rate)
      own_ms[name].append(own / images * 1e3)
      child_ms[name].append(child / images * 1e3)
    for op, ms in time_ops(encoded, 64, round_index).items():
      op_ms.setdefault(op, []).append(ms)
    print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
        f"{name} {rates[name][-1]:.0f}" for name in settings) + " img/s", flush=True)

  median = statistics.median
  base = median(rates["baseline"])
  mean_kb = np.mean([len(blob) for blob in encoded]) / 1e3
  print(f"\n{source} (mean {mean_kb:.0f} kB), {PREPROCESS!r}, "
        f"batch {args.batch}; {os.cpu_count()} CPU cores, load average now "
        f"{os.getloadavg()[0]:.1f}; medians of {args.rounds} interleaved rounds\n")
  print("| setting | img/s | x baseline | CPU ms/img, main process | CPU ms/img, workers |")
  print("|---|---:|---:|---:|---:|")
  for name in settings:
    print(f"| {name} | {median(rates[name]):.0f} | {median(rates[name]) / base:.2f} | "
          f"{median(own_ms[name]):.2f} | {median(child_ms[name]):.2f} |")
  print("\n| op (one thread) | ms/img |")
  print("|---|---:|")
  for op, values in op_ms.items():
    print(f"| {op} | {median(values):.3f} |")
  with_workers = [name for name in settings if name not in ("baseline", "workers=0")]
  if not with_workers:
    return
  worker_cost = median([median(child_ms[name]) for name in with_workers])
  main_cost = median([median(own_ms[name]) for name in with_workers])
  per_core = 1e3 / worker_cost
  print(f"\nwith workers ({', '.join(with_workers)}): {worker_cost:.2f} CPU ms/img in the workers "
        f"(one core: {per_core:.0f} img/s), {main_cost:.2f} in the main process. A host feeding "
        f"{args.feed:.0f} img/s needs about {math.ceil(args.feed / per_core)} worker cores "
        f"(data_workers) plus {args.feed * main_cost / 1e3:.1f} of a core in the main process.")

if __name__ == "__main__":
  main()
