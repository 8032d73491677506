"""Few-shot linear evaluation of frozen ViT features, as in the ViT paper and big_vision.

The features are the pre-logit representation: what the model feeds its head (the class token
after `encoder_norm`, or the mean of the tokens with classifier="gap", then `pre_logits` when the
model has a representation_size), computed by the model itself with `num_classes=0`. For each
seed, `shots` training examples of every class are drawn from the train split (one permutation
per seed, so the 1-shot set lies inside the 5-shot set), a closed-form ridge regression
(`common_jax.ridge`, the iGPT linear probe's) maps their standardised features onto {-1, 1}
one-vs-all targets with penalty `l2` (2**10 by default, as big_vision), and the accuracy of its
argmax is measured on the eval split. The bias is exact and unpenalised (big_vision appends a
constant feature of 100, which leaves the bias nearly unpenalised).

`fewshot_accuracies` takes feature arrays; `make_evaluator` is the same from parameters and
data, for a train loop's evaluations. These functions take arrays, models and iterables of
batches, never configs.
"""

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np

from common_jax import ridge

DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3
DEFAULT_L2 = 2.0**10


def check_settings(shots: Sequence[int], seeds: int, l2: float) -> None:
  """Raises ValueError, naming the config field and the fix, for settings that cannot work."""
  shots = tuple(shots)
  if not shots or any(not isinstance(k, (int, np.integer)) or k < 1 for k in shots):
    raise ValueError(f"config.fewshot_shots={shots} must be one or more positive integers "
                     "(training examples per class), e.g. (1, 5, 10, 25).")
  if not isinstance(seeds, (int, np.integer)) or seeds < 1:
    raise ValueError(f"config.fewshot_seeds={seeds} must be a positive integer (the number of "
                     "random draws of the training examples), e.g. 3.")
  if not (isinstance(l2, (int, float, np.floating)) and np.isfinite(l2) and l2 > 0):
    raise ValueError(f"config.fewshot_l2={l2} must be a positive number (the ridge penalty), "
                     "e.g. 1024.0.")


def check_shots(labels: np.ndarray, shots: Sequence[int], num_classes: int,
                split: str = "the train split") -> None:
  """Raises ValueError when a class of `labels` has fewer examples than the largest shot count."""
  counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)[:num_classes]
  most = max(shots)
  if counts.min() < most:
    short = int(np.argmin(counts))
    raise ValueError(f"config.fewshot_shots asks for {most} training examples per class but "
                     f"class {short} has only {counts[short]} in {split}; lower "
                     f"config.fewshot_shots to at most {counts[short]} or use a larger "
                     "config.train_split.")


def features_function(model: nn.Module) -> Callable[[Any, Any], jax.Array]:
  """The jitted pre-logit features of the ViT classifier `model` (its head left out):
  (params without "head", images [batch, height, width, 3]) -> [batch, width or
  representation_size]."""
  represent = model.clone(num_classes=0)  # the model's own path to what its head sees
  return jax.jit(lambda params, images: represent.apply({"params": params}, images))


def extract_features(model: nn.Module, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
                     *, features_fn: Optional[Callable[[Any, Any], jax.Array]] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Pre-logit features of every real row of `batches`.

  Args:
    model: a ViT classifier (`vit_jax.models.VisionTransformer`); its head is not used.
    params: its parameters (host or device arrays; a "head" entry is ignored).
    batches: {"image": [batch, height, width, 3] float32 in [-1, 1], "label": [batch] int,
      optionally "mask": [batch] float32 (0 = padding row, dropped)}.
    features_fn: `features_function(model)`, to reuse its compilation across calls.

  Returns:
    (features [n, dim] float32, labels [n] int64).
  """
  features_fn = features_fn or features_function(model)
  params = {key: value for key, value in params.items() if key != "head"}
  features, labels = [], []
  for batch in batches:
    real = np.asarray(batch["mask"]) > 0 if "mask" in batch else slice(None)
    output = np.asarray(features_fn(params, batch["image"]), np.float32)
    features.append(output[real])
    labels.append(np.asarray(batch["label"], np.int64)[real])
  if not features or not sum(len(rows) for rows in labels):
    raise ValueError("extract_features got no images; check the split.")
  return np.concatenate(features), np.concatenate(labels)


def fewshot_accuracies(train_features: np.ndarray, train_labels: np.ndarray,
                       test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                       shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = DEFAULT_SEEDS,
                       l2: float = DEFAULT_L2) -> Dict[int, List[float]]:
  """Test accuracy of the few-shot ridge classifier per shot count and seed.

  Args:
    train_features: [n_train, dim], the pool the training examples are drawn from;
      train_labels: [n_train] int in [0, num_classes).
    test_features: [n_test, dim]; test_labels: [n_test] int.
    shots: training examples per class; every class needs at least max(shots) in the pool.
    seeds: draws 0 .. seeds-1, one permutation of the pool each.
    l2: the ridge penalty on the summed squared error of standardised features.

  Returns:
    {shots: [accuracy of each seed]}.
  """
  check_settings(shots, seeds, l2)
  x_train = np.asarray(train_features, np.float64).reshape(len(train_labels), -1)
  x_test = np.asarray(test_features, np.float64).reshape(len(test_labels), -1)
  y_train = np.asarray(train_labels, np.int64)
  y_test = np.asarray(test_labels, np.int64)
  check_shots(y_train, shots, num_classes)
  accuracies: Dict[int, List[float]] = {int(k): [] for k in shots}
  for seed in range(seeds):
    order = np.random.default_rng(seed).permutation(len(y_train))
    by_class = [order[y_train[order] == c] for c in range(num_classes)]
    for k in shots:
      chosen = np.concatenate([indices[:k] for indices in by_class])
      fit = ridge.fit(x_train[chosen], ridge.one_vs_all_targets(y_train[chosen], num_classes),
                      [l2])
      accuracies[int(k)].append(float(np.mean(ridge.predict(x_test, fit) == y_test)))
  return accuracies


def summarize(accuracies: Mapping[int, Sequence[float]]) -> List[Dict[str, Any]]:
  """{shots: per-seed accuracies} -> one row per shot count: "shots", "mean", "std" (over the
  seeds, ddof=1; 0 for one seed), "min", "max" and the "accuracies" themselves."""
  rows = []
  for k, values in accuracies.items():
    values = np.asarray(values, np.float64)
    rows.append({"shots": int(k), "mean": float(values.mean()),
                 "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                 "min": float(values.min()), "max": float(values.max()),
                 "accuracies": [float(v) for v in values]})
  return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """The rows of `summarize` as a table: shots x accuracy (mean ± std over the seeds, min, max)."""
  seeds = len(rows[0]["accuracies"]) if rows else 0
  lines = [f"{'shots':>5}  {'mean ± std':^15}  {'min':>6}  {'max':>6}  (accuracy over {seeds} "
           "seeds)"]
  for row in rows:
    lines.append(f"{row['shots']:>5}  {row['mean']:.4f} ± {row['std']:.4f}  "
                 f"{row['min']:.4f}  {row['max']:.4f}")
  return "\n".join(lines)


def make_evaluator(model: nn.Module, train_data: Callable[[], Iterable[Mapping[str, Any]]],
                   eval_data: Callable[[], Iterable[Mapping[str, Any]]], *, num_classes: int,
                   shots: Sequence[int] = DEFAULT_SHOTS, seeds: int = DEFAULT_SEEDS,
                   l2: float = DEFAULT_L2) -> Callable[[Any], Dict[str, float]]:
  """An evaluation for a train loop: params -> {"fewshot/<k>shot_accuracy": mean over seeds}.

  train_data and eval_data return one pass over every example of their split (e.g.
  `Run.eval_data(split, whole=True)`: each process computes all features, so the numbers agree
  everywhere). Features are recomputed from the params at each call; the draws are the same.
  """
  check_settings(shots, seeds, l2)
  features_fn = features_function(model)  # compiled at the first call, reused after

  def evaluate(params: Any) -> Dict[str, float]:
    train_x, train_y = extract_features(model, params, train_data(), features_fn=features_fn)
    test_x, test_y = extract_features(model, params, eval_data(), features_fn=features_fn)
    rows = summarize(fewshot_accuracies(train_x, train_y, test_x, test_y,
                                        num_classes=num_classes, shots=shots, seeds=seeds,
                                        l2=l2))
    return {f"fewshot/{row['shots']}shot_accuracy": row["mean"] for row in rows}

  return evaluate
