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


LOSSES = ("softmax", "sigmoid")


@dataclasses.dataclass
class ClassificationTask(Task):
  """Supervised image classification with softmax cross-entropy (the paper's fine-tuning loss)
  or sigmoid cross-entropy (each class a binary decision, summed over the classes: AugReg and
  big_vision's choice for pre-training), optionally with mixup.

  `model_options` are the keyword arguments of `vit_jax.create_model` besides the variant.
  Mixup (`mixup` = p > 0): each training batch is mixed with itself rolled by one example,
  images and targets alike, with weight r = max(b, 1 - b), b ~ Beta(p, p) drawn per step (as
  big_vision does); the train accuracy then counts the argmax against the larger share's label.
  """
  variant: str
  num_classes: int
  image_size: int
  model_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
  label_smoothing: float = 0.0  # training targets only; evaluation uses the hard labels
  top5: bool = False  # evaluations also count top5_accuracy: the label among the 5 best logits
  loss: str = "softmax"  # or "sigmoid"
  mixup: float = 0.0  # p of Beta(p, p); 0 = no mixup
  headline_metric: str = "accuracy"

  def __post_init__(self):
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"config.label_smoothing={self.label_smoothing} must lie in [0, 1).")
    if self.loss not in LOSSES:
      raise ValueError(f"config.loss={self.loss!r} is unknown; use one of {LOSSES}.")
    if self.mixup < 0:
      raise ValueError(f"config.mixup={self.mixup} must be >= 0 (0: no mixup).")
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

  def _loss(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per example: softmax cross-entropy, or the sum over classes of sigmoid cross-entropy."""
    if self.loss == "sigmoid":
      return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)
    return optax.softmax_cross_entropy(logits, targets)

  def loss_and_metrics(self, params, batch, rng, train) -> Tuple[jax.Array, Dict]:
    images, labels, targets = batch["image"], batch["label"], self._targets(batch["label"])
    if train and self.mixup:
      rng, mix_rng = jax.random.split(rng)
      share = jax.random.beta(mix_rng, self.mixup, self.mixup)
      share = jnp.maximum(share, 1.0 - share)
      images = share * images + (1.0 - share) * jnp.roll(images, 1, axis=0)
      targets = share * targets + (1.0 - share) * jnp.roll(targets, 1, axis=0)
    logits = self.model.apply({"params": params}, images, train=train, rngs={"dropout": rng})
    loss = self._loss(logits, targets).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"accuracy": accuracy}

  def eval_sums(self, params, batch) -> Dict[str, jax.Array]:
    logits = self.model.apply({"params": params}, batch["image"], train=False)
    mask = batch["mask"]
    loss = self._loss(logits, jax.nn.one_hot(batch["label"], self.num_classes))
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    sums = {"accuracy": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask)}
    if self.top5:
      # The label's rank: how many logits exceed its own (ties count in the label's favour).
      label_logit = jnp.take_along_axis(logits, batch["label"][:, None], axis=-1)
      in_top5 = (jnp.sum(logits > label_logit, axis=-1) < 5).astype(jnp.float32)
      sums["top5_accuracy"] = jnp.sum(in_top5 * mask)
    return sums
