"""ViT tasks of the shared loop."""

import dataclasses
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common_jax.task import Task
from vit_jax import models


@dataclasses.dataclass
class ClassificationTask(Task):
  """Supervised image classification with softmax cross-entropy (the paper's fine-tuning loss).

  `model_options` are the keyword arguments of `vit_jax.create_model` besides the variant.
  """
  variant: str
  num_classes: int
  image_size: int
  model_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
  label_smoothing: float = 0.0  # training targets only; evaluation uses the hard labels
  top5: bool = False  # evaluations also count top5_accuracy: the label among the 5 best logits
  headline_metric: str = "accuracy"

  def __post_init__(self):
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"config.label_smoothing={self.label_smoothing} must lie in [0, 1).")
    if self.top5 and self.num_classes <= 5:
      raise ValueError(f"config.eval_top5=True needs more than 5 classes, and config.num_classes="
                       f"{self.num_classes}; set config.eval_top5=False.")
    # Built once: variant, patch size, classifier and posemb errors surface here.
    self.model: nn.Module = models.create_model(
        self.variant, num_classes=self.num_classes, image_size=self.image_size,
        **self.model_options)

  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    return {"image": np.zeros((batch_size, self.image_size, self.image_size, 3), np.float32),
            "label": np.zeros((batch_size,), np.int32)}

  def _targets(self, labels: jax.Array) -> jax.Array:
    targets = jax.nn.one_hot(labels, self.num_classes)
    if self.label_smoothing:
      targets = optax.smooth_labels(targets, self.label_smoothing)
    return targets

  def loss_and_metrics(self, params, batch, rng, train) -> Tuple[jax.Array, Dict]:
    logits = self.model.apply({"params": params}, batch["image"], train=train,
                         rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy(logits, self._targets(batch["label"])).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": accuracy}

  def eval_sums(self, params, batch) -> Dict[str, jax.Array]:
    logits = self.model.apply({"params": params}, batch["image"], train=False)
    mask = batch["mask"]
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], self.num_classes))
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    sums = {"accuracy": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask)}
    if self.top5:
      # The label's rank: how many logits exceed its own (ties count in the label's favour).
      label_logit = jnp.take_along_axis(logits, batch["label"][:, None], axis=-1)
      in_top5 = (jnp.sum(logits > label_logit, axis=-1) < 5).astype(jnp.float32)
      sums["top5_accuracy"] = jnp.sum(in_top5 * mask)
    return sums
