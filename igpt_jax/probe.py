"""Linear probes on frozen iGPT features (the paper's representation-quality measure).

Features of layer l are the mean over positions of the normalised input of block l (layer
`depth` is the final norm's output), as `ImageGPT.features` computes; all layers come from one
forward pass per batch.

The classifier is closed-form ridge regression on one-hot targets (features standardised with the
training set's mean and standard deviation, an unpenalised bias, prediction = argmax). It is
deterministic (one linear solve in float64, no iteration, no rng) and needs no learning-rate
search. The paper trained logistic regression instead, so absolute accuracies here can differ from
its numbers; comparisons between layers and against the raw-pixel baseline use the same probe.

These functions take arrays and iterables of arrays, never configs.
"""

from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import jax
import numpy as np

from igpt_jax import models
from igpt_jax import palette as palette_lib

ArrayLike = Union[np.ndarray, jax.Array]


def _id_batches(ids: Union[ArrayLike, Iterable[ArrayLike]], batch_size: int):
  """An [n, length] array (cut into padded batches) or an iterable of [b, length] arrays ->
  (batch [b', length] int32, number of real rows)."""
  if isinstance(ids, (np.ndarray, jax.Array)):
    ids = np.asarray(ids)
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      rows = len(chunk)
      if rows < batch_size:  # Pad the last batch: one compiled shape for the whole set.
        chunk = np.concatenate([chunk, np.zeros((batch_size - rows,) + chunk.shape[1:],
                                                chunk.dtype)])
      yield chunk.astype(np.int32), rows
  else:
    for chunk in ids:
      chunk = np.asarray(chunk, np.int32)
      yield chunk, len(chunk)


def extract_features(model: models.ImageGPT, variables: Any,
                     ids: Union[ArrayLike, Iterable[ArrayLike]], *,
                     layers: Optional[Sequence[int]] = None, batch_size: int = 64) -> np.ndarray:
  """Pooled features of several layers in one forward pass per batch.

  Args:
    model, variables: a (pre-trained) `ImageGPT` and its {"params": ...}.
    ids: cluster ids [n, image_size**2] int (cut into batches of batch_size), or an iterable of
      [batch, image_size**2] arrays (e.g. quantized batches of a dataset).
    layers: layer numbers in [0, depth]; None = all depth + 1.

  Returns:
    [len(layers), n, width] float32.
  """
  layers = tuple(range(model.depth + 1)) if layers is None else tuple(int(l) for l in layers)
  for layer in layers:
    model.check_layer(layer)
  features_fn = jax.jit(lambda v, x: model.apply(v, x, layers=layers,
                                                 method=models.ImageGPT.features))
  outputs = []
  for batch, rows in _id_batches(ids, batch_size):
    outputs.append(np.asarray(features_fn(variables, batch))[:, :rows])
  if not outputs:
    raise ValueError("extract_features got no images; pass a non-empty ids array or iterable.")
  return np.concatenate(outputs, axis=1)


def _standardise(train: np.ndarray, test: np.ndarray):
  mean = train.mean(axis=0)
  std = train.std(axis=0) + 1e-6
  return (train - mean) / std, (test - mean) / std


def linear_probe(train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike,
                 test_labels: ArrayLike, *, num_classes: Optional[int] = None,
                 l2: float = 1e-3) -> Dict[str, Any]:
  """Ridge-regression linear classifier on frozen features.

  Solves min_W,b mean ||x W + b - onehot(y)||^2 + l2 ||W||^2 on standardised features.

  Args:
    train_features: [n_train, dim]; train_labels: [n_train] int.
    test_features: [n_test, dim]; test_labels: [n_test] int.
    num_classes: defaults to 1 + the largest label.
    l2: ridge penalty (per example, on standardised features).

  Returns:
    {"train_accuracy": float, "test_accuracy": float, "weights": [dim, classes],
     "bias": [classes]} (weights act on standardised features).
  """
  x_train = np.asarray(train_features, np.float64).reshape(len(train_labels), -1)
  x_test = np.asarray(test_features, np.float64).reshape(len(test_labels), -1)
  y_train = np.asarray(train_labels).astype(np.int64)
  y_test = np.asarray(test_labels).astype(np.int64)
  if len(x_train) == 0 or len(x_test) == 0:
    raise ValueError("linear_probe needs at least one training and one test example.")
  num_classes = num_classes or int(max(y_train.max(), y_test.max())) + 1
  x_train, x_test = _standardise(x_train, x_test)
  targets = np.eye(num_classes)[y_train]
  target_mean = targets.mean(axis=0)
  targets = targets - target_mean  # With centred features this makes the bias exact.
  n, dim = x_train.shape
  penalty = l2 * n
  if dim <= n:
    weights = np.linalg.solve(x_train.T @ x_train + penalty * np.eye(dim), x_train.T @ targets)
  else:  # The dual form: an n x n system instead of dim x dim.
    weights = x_train.T @ np.linalg.solve(x_train @ x_train.T + penalty * np.eye(n), targets)

  def accuracy(x, y):
    return float(np.mean(np.argmax(x @ weights + target_mean, axis=1) == y))

  return {"train_accuracy": accuracy(x_train, y_train), "test_accuracy": accuracy(x_test, y_test),
          "weights": weights.astype(np.float32), "bias": target_mean.astype(np.float32)}


def probe_layers(train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike,
                 test_labels: ArrayLike, *, layers: Optional[Sequence[int]] = None,
                 num_classes: Optional[int] = None, l2: float = 1e-3) -> List[Dict[str, Any]]:
  """A linear probe per layer.

  Args:
    train_features: [num_layers, n_train, width] (from `extract_features`);
    test_features: [num_layers, n_test, width]; labels [n] int.
    layers: the layer numbers of the leading axis (for the report); default 0..num_layers-1.

  Returns:
    one {"layer", "train_accuracy", "test_accuracy"} per layer, in order.
  """
  train_features = np.asarray(train_features)
  test_features = np.asarray(test_features)
  if train_features.ndim != 3 or test_features.shape[0] != train_features.shape[0]:
    raise ValueError(f"probe_layers needs features [num_layers, n, width] for both splits, got "
                     f"{train_features.shape} and {test_features.shape}.")
  layers = list(range(len(train_features))) if layers is None else list(layers)
  report = []
  for layer, train, test in zip(layers, train_features, test_features):
    result = linear_probe(train, train_labels, test, test_labels, num_classes=num_classes, l2=l2)
    report.append({"layer": layer, "train_accuracy": result["train_accuracy"],
                   "test_accuracy": result["test_accuracy"]})
  return report


def pixel_probe(train_ids: ArrayLike, train_labels: ArrayLike, test_ids: ArrayLike,
                test_labels: ArrayLike, palette: ArrayLike, *,
                num_classes: Optional[int] = None, l2: float = 1e-3) -> Dict[str, Any]:
  """Baseline: the same linear probe on the raw quantised pixels.

  Features are the palette colours of the ids, flattened: [n, length * 3].

  Args:
    train_ids, test_ids: [n, length] int cluster ids; labels [n] int.
    palette: [num_clusters, 3].

  Returns:
    {"train_accuracy", "test_accuracy", "weights", "bias"} as `linear_probe`.
  """
  def pixels(ids):
    ids = np.asarray(ids)
    return np.asarray(palette_lib.dequantize(ids, palette)).reshape(len(ids), -1)

  return linear_probe(pixels(train_ids), train_labels, pixels(test_ids), test_labels,
                      num_classes=num_classes, l2=l2)
