"""Closed-form ridge regression on frozen features: the one linear classifier of both families'
representation evaluations (the iGPT linear probe, the ViT few-shot evaluation).

Features are standardised with the training examples' mean and standard deviation, the targets
are centred (which makes the bias exact and unpenalised), and the weights come from one linear
solve in float64 per penalty: the primal (dim x dim) system when dim <= n, else the dual
(n x n) one. The prediction is the argmax of the scores. Numpy only: no iteration, no learning
rate, deterministic.
"""

from typing import List, NamedTuple, Optional, Sequence

import numpy as np


class Ridge(NamedTuple):
  """Fitted ridge regressions, one per penalty: the scores of features x' with penalty i are
  (x' - x_mean) / x_scale @ weights[i] + target_mean."""
  x_mean: np.ndarray  # [dim]
  x_scale: np.ndarray  # [dim]
  target_mean: np.ndarray  # [targets]
  weights: List[np.ndarray]  # [dim, targets], one per penalty


def fit(x: np.ndarray, targets: np.ndarray, penalties: Sequence[float],
        gram: Optional[np.ndarray] = None) -> Ridge:
  """Ridge regression of targets on standardised x, per penalty.

  For each penalty p, minimises ||x_s W + b - targets||^2 + p ||W||^2 (a sum over examples, not
  a mean: a penalty per example is p / n), with x_s = (x - mean) / std and b unpenalised.

  Args:
    x: [n, dim] float64 features.
    targets: [n, targets] float (one-hot, or {-1, 1} one-vs-all; their argmax is the same).
    penalties: the penalties p (absolute, on the summed objective above).
    gram: x.T @ x may be passed in when dim <= n, so that cross-validation folds reuse one
      product (x should then be centred on a superset, or the centring below loses precision).

  Returns:
    the fits, one weight matrix per penalty.
  """
  n, dim = x.shape
  x_mean, target_mean = x.mean(axis=0), targets.mean(axis=0)
  centred_targets = targets - target_mean
  if dim <= n:
    if gram is None:
      centred = x - x_mean
      gram = centred.T @ centred
    else:  # Accurate when x is nearly centred already (cross-validation centres it).
      gram = gram - n * np.outer(x_mean, x_mean)
    x_scale = np.sqrt(np.maximum(np.diag(gram) / n, 0.0)) + 1e-6
    gram = gram / np.outer(x_scale, x_scale)
    rhs = (x.T @ centred_targets) / x_scale[:, None]  # x's mean drops out: the targets sum to 0
    weights = [np.linalg.solve(gram + penalty * np.eye(dim), rhs) for penalty in penalties]
  else:  # The dual form: an n x n system instead of dim x dim.
    x_scale = x.std(axis=0) + 1e-6
    standardised = (x - x_mean) / x_scale
    gram = standardised @ standardised.T
    weights = [standardised.T @ np.linalg.solve(gram + penalty * np.eye(n), centred_targets)
               for penalty in penalties]
  return Ridge(x_mean, x_scale, target_mean, weights)


def scores(x: np.ndarray, ridge: Ridge, index: int = 0) -> np.ndarray:
  """[n, dim] features -> [n, targets] scores of the fit with penalties[index]."""
  return (x - ridge.x_mean) / ridge.x_scale @ ridge.weights[index] + ridge.target_mean


def predict(x: np.ndarray, ridge: Ridge, index: int = 0) -> np.ndarray:
  """[n, dim] features -> [n] int, the class of the highest score (penalties[index])."""
  return np.argmax(scores(x, ridge, index), axis=1)


def one_vs_all_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """[n] int labels -> [n, num_classes] float64 targets, 1 for the class and -1 elsewhere (the
  few-shot regression targets of the ViT paper and big_vision)."""
  return 2.0 * np.eye(num_classes)[np.asarray(labels, np.int64)] - 1.0
