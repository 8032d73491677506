"""`--mode predict`: classify every image of a folder with a trained ViT and write a CSV of the
five most probable labels and their probabilities per image.

The images go through `config.preprocess_eval`, as in evaluation; files are found recursively
by extension and sorted, so the CSV's order is the same on every run.
"""

import csv
import io
import os
from typing import Any, List, Optional, Sequence

import jax
import numpy as np

from common_jax.data import preprocess as preprocess_lib

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TOP = 5


def list_images(folder: str) -> List[str]:
  """The image files under `folder` (by extension), sorted by path."""
  found = []
  for root, _, names in os.walk(folder):
    found += [os.path.join(root, name) for name in names if name.lower().endswith(EXTENSIONS)]
  return sorted(found)


def _batches(paths: Sequence[str], preprocess: str, batch_size: int):
  op = preprocess_lib.parse(preprocess, "config.preprocess_eval")
  rng = np.random.default_rng(0)  # only random ops would use it; eval strings have none
  for start in range(0, len(paths), batch_size):
    images = []
    for path in paths[start:start + batch_size]:
      with open(path, "rb") as f:
        try:
          images.append(op({"image": f.read(), "label": 0}, rng)["image"])
        except ValueError as error:
          raise ValueError(f"config.predict_input: {path} cannot be classified "
                           f"({str(error).rstrip('.')}); remove it from the folder.") from None
    yield np.stack(images).astype(np.float32)


def predict(model, params: Any, paths: Sequence[str], preprocess: str,
            batch_size: int = 64) -> tuple:
  """(top labels [n, k] int, their probabilities [n, k]) for the images at `paths`,
  k = min(5, classes), most probable first."""
  k = min(TOP, model.num_classes)

  @jax.jit
  def top(images):
    probabilities = jax.nn.softmax(model.apply({"params": params}, images), axis=-1)
    return jax.lax.top_k(probabilities, k)

  labels, scores = [], []
  for images in _batches(paths, preprocess, batch_size):
    score, label = jax.device_get(top(images))
    labels.append(label)
    scores.append(score)
  return np.concatenate(labels), np.concatenate(scores)


def to_csv(paths: Sequence[str], labels: np.ndarray, scores: np.ndarray,
           names: Optional[Sequence[str]] = None) -> str:
  """path, label_1, probability_1, ..., label_k, probability_k; labels by name when `names`."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  k = labels.shape[1]
  writer.writerow(["path"] + [f"{what}_{i + 1}" for i in range(k)
                              for what in ("label", "probability")])
  for path, row_labels, row_scores in zip(paths, labels, scores):
    cells = [path]
    for label, score in zip(row_labels, row_scores):
      cells += [names[label] if names else int(label), f"{score:.6f}"]
    writer.writerow(cells)
  return out.getvalue()
