"""What a model family plugs into the one train loop.

A task says how to build the model, how to initialise it, the loss and metrics of a batch, and
what an evaluation batch contributes. The loop (`common_jax.train`) does everything else: mesh,
sharding, optimiser, data, checkpoints, logging. Task code imports only jax/flax/optax/numpy.

Batches are dicts of arrays with a leading batch axis. Training batches always carry "image"
[batch, height, width, 3] float32 in [-1, 1] and, for labelled data, "label" [batch] int32.
Evaluation batches also carry "mask" [batch] float32 (0 for padding rows of the last batch).
"""

import abc
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import numpy as np

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


class Task(abc.ABC):
  """Base class of the tasks of the shared loop.

  A task owns its model (`self.model`, built once at construction so that shape errors surface
  before any compute); the loop never hands it back.
  """

  #: Metric (from `evaluate`'s averages) that is reported as the headline number.
  headline_metric: str = "loss"
  model: nn.Module

  @abc.abstractmethod
  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    """A batch of the right shapes and dtypes (contents irrelevant), used to initialise."""

  def init_variables(self, rng: jax.Array, batch: Batch) -> Any:
    """Initial variables ({"params": ...}, parameters boxed with logical axis names)."""
    return self.model.init(rng, batch["image"], train=False)

  @abc.abstractmethod
  def loss_and_metrics(self, params: Any, batch: Batch, rng: jax.Array,
                       train: bool) -> Tuple[jax.Array, Metrics]:
    """Scalar mean loss over the batch and scalar metrics (means over the batch)."""

  @abc.abstractmethod
  def eval_sums(self, params: Any, batch: Batch) -> Metrics:
    """Sums over the batch, rows weighted by batch["mask"]; must include "count".

    The loop adds them up over the whole split and reports sum / count for each key.
    """
