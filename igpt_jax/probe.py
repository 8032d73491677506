"""Linear probes on frozen iGPT features (the paper's representation-quality measure).

Features of layer l are the mean over positions of the normalised input of block l (layer
`depth` is the final norm's output), as `ImageGPT.features` computes; all layers come from one
forward pass per batch.

The classifier is closed-form ridge regression on one-hot targets (`common_jax.ridge`, which the
ViT few-shot evaluation shares: features standardised with the training set's mean and standard
deviation, an unpenalised bias, prediction = argmax). It is deterministic (linear solves in
float64, no iteration; the cross-validation folds come from a fixed seed) and needs no
learning-rate search. The ridge penalty is chosen from a grid by k-fold
cross-validation on the training split, separately for each layer and for the pixels, so the test
split only measures; `run.py --mode probe` also picks the best layer by cross-validated accuracy.
The paper trained logistic regression instead, so absolute accuracies here can differ from its
numbers; comparisons between layers and against the raw-pixel baseline use the same probe.

These functions take arrays and iterables of arrays, never configs.
"""

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from common_jax import ridge
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


DEFAULT_L2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_FOLDS = 5
REPORT_KEYS = ("train_accuracy", "test_accuracy", "l2", "cv_accuracy")


def _fit(x: np.ndarray, targets: np.ndarray, l2s: Sequence[float],
         gram: Optional[np.ndarray] = None) -> ridge.Ridge:
  """The shared ridge (`common_jax.ridge.fit`) of one-hot targets, with the probe's penalties
  per example (the objective is a mean over the n examples, so each is scaled by n)."""
  return ridge.fit(x, targets, [l2 * len(x) for l2 in l2s], gram)


def _penalties(l2: Union[float, Sequence[float]]) -> Tuple[float, ...]:
  return (l2,) if np.isscalar(l2) else tuple(l2)


def check_probe_settings(l2: Union[float, Sequence[float]], folds: int,
                         n: Optional[int] = None) -> None:
  """Raises ValueError for penalties that are not positive, or folds that cannot be used with n
  training examples (n=None: checks what can be checked without the data)."""
  l2s = _penalties(l2)
  if not l2s or any(not l2 > 0 for l2 in l2s):
    raise ValueError(f"the probe's ridge penalties {tuple(l2s)} must be one or more positive "
                     "numbers (config.probe_l2), e.g. (1e-3,) or (1e-4, 1e-3, 1e-2, 1e-1, 1.0).")
  if folds == 1 or folds < 0 or (n is not None and folds > n):
    limit = "" if n is None else f" up to the {n} training examples"
    raise ValueError(f"probe folds={folds} is invalid; use 0 (no cross-validation) or 2 or "
                     f"more{limit} (config.probe_folds).")
  if len(l2s) > 1 and not folds:
    raise ValueError(f"choosing among the ridge penalties {tuple(l2s)} needs cross-validation; "
                     "set config.probe_folds >= 2 or give a single penalty in config.probe_l2.")


def cross_validate(features: ArrayLike, labels: ArrayLike, *,
                   l2: Union[float, Sequence[float]] = DEFAULT_L2, folds: int = DEFAULT_FOLDS,
                   num_classes: Optional[int] = None, seed: int = 0) -> np.ndarray:
  """Held-out accuracy of the ridge probe per penalty, by k-fold cross-validation.

  The examples are cut into `folds` random folds (fixed by `seed`); each fold is predicted by the
  probe `linear_probe` fits on the other folds (standardised with their statistics).

  Returns:
    [len(l2)] the fraction of examples predicted correctly while held out.
  """
  l2s = _penalties(l2)
  x = np.asarray(features, np.float64).reshape(len(labels), -1)
  y = np.asarray(labels).astype(np.int64)
  check_probe_settings(l2s, folds, len(x))
  if folds < 2:
    raise ValueError(f"cross_validate needs folds >= 2, got {folds}.")
  num_classes = num_classes or int(y.max()) + 1
  targets = np.eye(num_classes)[y]
  x = x - x.mean(axis=0)  # The folds re-standardise; centring first keeps the Gram accurate.
  n, dim = x.shape
  gram = x.T @ x if dim <= n else None
  correct = np.zeros(len(l2s))
  for held in np.array_split(np.random.default_rng(seed).permutation(n), folds):
    keep = np.ones(n, bool)
    keep[held] = False
    fold_gram = gram - x[held].T @ x[held] if gram is not None and dim <= keep.sum() else None
    fit = _fit(x[keep], targets[keep], l2s, fold_gram)
    for i in range(len(l2s)):
      correct[i] += np.sum(ridge.predict(x[held], fit, i) == y[held])
  return correct / n


def linear_probe(train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike,
                 test_labels: ArrayLike, *, num_classes: Optional[int] = None,
                 l2: Union[float, Sequence[float]] = DEFAULT_L2, folds: int = DEFAULT_FOLDS,
                 seed: int = 0) -> Dict[str, Any]:
  """Ridge-regression linear classifier on frozen features.

  Solves min_W,b mean ||x W + b - onehot(y)||^2 + l2 ||W||^2 on standardised features. With
  several penalties, the one with the best `folds`-fold cross-validated accuracy on the training
  examples is used (ties: the first listed); the test examples only measure the result.

  Args:
    train_features: [n_train, dim]; train_labels: [n_train] int.
    test_features: [n_test, dim]; test_labels: [n_test] int.
    num_classes: defaults to 1 + the largest label.
    l2: a ridge penalty (per example, on standardised features) or a sequence to choose from.
    folds: cross-validation folds (0 = none; then `l2` must be a single penalty).
    seed: fixes the folds.

  Returns:
    {"train_accuracy": float, "test_accuracy": float, "l2": the penalty used,
     "cv_accuracy": its cross-validated accuracy (None with folds=0),
     "weights": [dim, classes], "bias": [classes], "feature_mean": [dim], "feature_scale": [dim]}:
    the prediction for features x is argmax((x - feature_mean) / feature_scale @ weights + bias).
  """
  l2s = _penalties(l2)
  x_train = np.asarray(train_features, np.float64).reshape(len(train_labels), -1)
  x_test = np.asarray(test_features, np.float64).reshape(len(test_labels), -1)
  y_train = np.asarray(train_labels).astype(np.int64)
  y_test = np.asarray(test_labels).astype(np.int64)
  if len(x_train) == 0 or len(x_test) == 0:
    raise ValueError("linear_probe needs at least one training and one test example.")
  check_probe_settings(l2s, folds, len(x_train))
  num_classes = num_classes or int(max(y_train.max(), y_test.max())) + 1
  cv_accuracy = None
  if folds:
    accuracies = cross_validate(x_train, y_train, l2=l2s, folds=folds, num_classes=num_classes,
                                seed=seed)
    best = int(np.argmax(accuracies))
    l2s, cv_accuracy = (l2s[best],), float(accuracies[best])
  fit = _fit(x_train, np.eye(num_classes)[y_train], l2s)

  def accuracy(x, y):
    return float(np.mean(ridge.predict(x, fit, 0) == y))

  return {"train_accuracy": accuracy(x_train, y_train), "test_accuracy": accuracy(x_test, y_test),
          "l2": float(l2s[0]), "cv_accuracy": cv_accuracy,
          "weights": fit.weights[0].astype(np.float32),
          "bias": fit.target_mean.astype(np.float32),
          "feature_mean": fit.x_mean.astype(np.float32),
          "feature_scale": fit.x_scale.astype(np.float32)}


def probe_layers(train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike,
                 test_labels: ArrayLike, *, layers: Optional[Sequence[int]] = None,
                 num_classes: Optional[int] = None,
                 l2: Union[float, Sequence[float]] = DEFAULT_L2, folds: int = DEFAULT_FOLDS,
                 seed: int = 0) -> List[Dict[str, Any]]:
  """A linear probe per layer (`linear_probe`, with its penalty chosen per layer).

  Args:
    train_features: [num_layers, n_train, width] (from `extract_features`);
    test_features: [num_layers, n_test, width]; labels [n] int.
    layers: the layer numbers of the leading axis (for the report); default 0..num_layers-1.
    num_classes, l2, folds, seed: as `linear_probe`.

  Returns:
    one {"layer", "train_accuracy", "test_accuracy", "l2", "cv_accuracy"} per layer, in order.
  """
  train_features = np.asarray(train_features)
  test_features = np.asarray(test_features)
  if train_features.ndim != 3 or test_features.shape[0] != train_features.shape[0]:
    raise ValueError(f"probe_layers needs features [num_layers, n, width] for both splits, got "
                     f"{train_features.shape} and {test_features.shape}.")
  layers = list(range(len(train_features))) if layers is None else list(layers)
  report = []
  for layer, train, test in zip(layers, train_features, test_features):
    result = linear_probe(train, train_labels, test, test_labels, num_classes=num_classes, l2=l2,
                          folds=folds, seed=seed)
    report.append({"layer": layer, **{key: result[key] for key in REPORT_KEYS}})
  return report


def pixel_probe(train_ids: ArrayLike, train_labels: ArrayLike, test_ids: ArrayLike,
                test_labels: ArrayLike, palette: ArrayLike, *,
                num_classes: Optional[int] = None,
                l2: Union[float, Sequence[float]] = DEFAULT_L2, folds: int = DEFAULT_FOLDS,
                seed: int = 0) -> Dict[str, Any]:
  """Baseline: the same linear probe (same penalties and folds) on the raw quantised pixels.

  Features are the palette colours of the ids, flattened: [n, length * 3].

  Args:
    train_ids, test_ids: [n, length] int cluster ids; labels [n] int.
    palette: [num_clusters, 3].
    num_classes, l2, folds, seed: as `linear_probe`.

  Returns:
    the dictionary of `linear_probe`.
  """
  def pixels(ids):
    ids = np.asarray(ids)
    return np.asarray(palette_lib.dequantize(ids, palette)).reshape(len(ids), -1)

  return linear_probe(pixels(train_ids), train_labels, pixels(test_ids), test_labels,
                      num_classes=num_classes, l2=l2, folds=folds, seed=seed)
