"""Masked patch prediction, the ViT paper's self-supervised pre-training (Sec. 4.6, Appendix
B.1.2): corrupt half of the patch embeddings and predict each corrupted patch's 3-bit mean colour.

Per image, each patch is selected with probability `mask_prob` (0.5); a selected patch's
embedding is replaced by a learned `mask_token` with probability 0.8, by the embedding of another
patch of the same image (drawn uniformly) with probability 0.1, and kept with probability 0.1.
The model's output token of every selected patch is classified (`mpp_head`) into 512 classes: the
patch's mean colour with each channel in 8 levels (r * 64 + g * 8 + b). The loss is the
cross-entropy over the selected patches. Fine-tune from such a workdir with
`config.init_from=<workdir>` and the classification task: the encoder is copied, `mask_token`
and `mpp_head` are left behind, the classifier head starts at zero.
"""

import dataclasses
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common_jax.task import Task
from vit_jax import models

LEVELS = 8  # per channel: 3 bits
SPLIT = (0.8, 0.1, 0.1)  # of the selected patches: mask token, another patch, unchanged
# `how` values: 0 not selected, 1 mask token, 2 another patch, 3 selected and unchanged.
NOT_SELECTED, MASKED, REPLACED, KEPT = 0, 1, 2, 3


def corruption(rng: jax.Array, batch: int, patches: int, mask_prob: float = 0.5
               ) -> Tuple[jax.Array, jax.Array]:
  """(how [batch, patches] int32 in {0, 1, 2, 3}, source [batch, patches] int32): which patches
  are selected and how each is corrupted (see the module docstring)."""
  select_key, split_key, source_key = jax.random.split(rng, 3)
  selected = jax.random.bernoulli(select_key, mask_prob, (batch, patches))
  u = jax.random.uniform(split_key, (batch, patches))
  how = jnp.where(u < SPLIT[0], MASKED, jnp.where(u < SPLIT[0] + SPLIT[1], REPLACED, KEPT))
  how = jnp.where(selected, how, NOT_SELECTED).astype(jnp.int32)
  # Another patch: one of the other patches - 1 positions, uniformly.
  offset = jax.random.randint(source_key, (batch, patches), 1, max(patches, 2))
  source = (jnp.arange(patches)[None] + offset) % patches
  return how, source.astype(jnp.int32)


def mean_colour_targets(images: jax.Array, patch_size: int) -> jax.Array:
  """images [batch, h, w, 3] in [-1, 1] -> int32 [batch, patches]: each patch's mean colour,
  each channel quantised to LEVELS levels, as r * 64 + g * 8 + b (row-major patch order)."""
  batch, height, width, _ = images.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  x = images[:, :grid_h * patch_size, :grid_w * patch_size].astype(jnp.float32)
  x = x.reshape(batch, grid_h, patch_size, grid_w, patch_size, 3).mean(axis=(2, 4))
  levels = jnp.clip(jnp.floor((x + 1.0) / 2.0 * LEVELS), 0, LEVELS - 1).astype(jnp.int32)
  levels = levels.reshape(batch, grid_h * grid_w, 3)
  return levels[..., 0] * LEVELS**2 + levels[..., 1] * LEVELS + levels[..., 2]


@dataclasses.dataclass
class MaskedPatchTask(Task):
  """Masked patch prediction on images (labels are not read)."""
  variant: str
  image_size: int
  model_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
  mask_prob: float = 0.5
  headline_metric: str = "accuracy"

  def __post_init__(self):
    if not 0.0 < self.mask_prob <= 1.0:
      raise ValueError(f"config.mask_prob={self.mask_prob} must lie in (0, 1] for masked patch "
                       "prediction (the paper corrupts 0.5).")
    self.model: nn.Module = models.create_model(
        self.variant, num_classes=0, image_size=self.image_size, **self.model_options)
    self.patch_size = self.model.effective_patch_size
    self.patches = (self.image_size // self.patch_size)**2

  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    return {"image": np.zeros((batch_size, self.image_size, self.image_size, 3), np.float32)}

  def init_variables(self, rng: jax.Array, batch) -> Any:
    how = jnp.zeros((batch["image"].shape[0], self.patches), jnp.int32)
    return self.model.init(rng, batch["image"], train=False, corrupt=(how, how))

  def _loss(self, params, images, rng, train) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Per-patch cross-entropy, correctness and selection, each [batch, patches]."""
    corrupt_key, dropout_key = jax.random.split(rng)
    how, source = corruption(corrupt_key, images.shape[0], self.patches, self.mask_prob)
    logits = self.model.apply({"params": params}, images, train=train, corrupt=(how, source),
                              rngs={"dropout": dropout_key})
    targets = mean_colour_targets(images, self.patch_size)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, correct, (how != NOT_SELECTED).astype(jnp.float32)

  def loss_and_metrics(self, params, batch, rng, train):
    loss, correct, selected = self._loss(params, batch["image"], rng, train)
    count = jnp.maximum(selected.sum(), 1.0)
    return (loss * selected).sum() / count, {
        "accuracy": (correct * selected).sum() / count, "masked_fraction": selected.mean()}

  def eval_sums(self, params, batch) -> Dict[str, jax.Array]:
    """Over the selected patches of a fixed corruption (the same for every evaluation); each
    real image weighs its selected patches."""
    loss, correct, selected = self._loss(params, batch["image"], jax.random.PRNGKey(0), False)
    weight = selected * batch["mask"][:, None]
    return {"loss": (loss * weight).sum(), "accuracy": (correct * weight).sum(),
            "count": weight.sum()}
