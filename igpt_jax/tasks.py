"""iGPT tasks of the shared train loop: autoregressive, BERT and fine-tuning.

Batches carry "image" [batch, image_size, image_size, 3] float32 in [-1, 1] (and "label" [batch]
int32 for fine-tuning); each task quantizes them on device to cluster ids with the palette it was
given at construction (held as a constant of the compiled step).

Generative losses are in nats per token and are also reported as `bits_per_token` (nats / ln 2),
the paper's unit.
"""

import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common_jax.task import Batch, Metrics, Task
from igpt_jax import models
from igpt_jax import palette as palette_lib

OBJECTIVES = ("autoregressive", "bert")
LN2 = math.log(2.0)


def _variables(params: Any) -> Dict[str, Any]:
  """Accepts the "params" collection or the whole variables dict; returns the variables dict."""
  # An iGPT parameter tree never has a top-level entry called "params" (its entries are wte, wpe,
  # h_0, ...), so this test cannot confuse the two.
  if isinstance(params, dict) and "params" in params:
    return params
  return {"params": params}


def _row_weights(batch: Batch) -> jax.Array:
  """Evaluation row weights: batch["mask"] [batch] float32 (1 for real rows), or all ones."""
  if "mask" in batch:
    return batch["mask"].astype(jnp.float32)
  return jnp.ones((batch["image"].shape[0],), jnp.float32)


def masked_token_loss(nll: jax.Array, masked: jax.Array) -> jax.Array:
  """BERT loss per image: mean of nll [batch, length] over masked positions -> [batch].

  As in OpenAI's code (per-image mean, then mean over images); an image with no masked position
  contributes 0.
  """
  masked = masked.astype(jnp.float32)
  return jnp.sum(nll * masked, axis=1) / jnp.maximum(jnp.sum(masked, axis=1), 1.0)


class _ImageGPTTask(Task):
  """What the three iGPT tasks share: palette, model options, quantization."""

  headline_metric = "bits_per_token"
  objective = "autoregressive"

  def __init__(self, palette: np.ndarray, *, variant: str = "S", image_size: int = 32,
               model_options: Optional[Dict[str, Any]] = None, mask_prob: float = 0.15,
               eval_mask_seed: int = 0, num_classes: int = 0):
    """
    Args:
      palette: [num_clusters, 3] float32 colour centres (`igpt_jax.load_palette`).
      variant, image_size: passed to `igpt_jax.create_model`.
      model_options: the other keyword arguments of `igpt_jax.create_model` (dtype, param_dtype,
        dropout_rate, attention_implementation, width, depth, num_heads, mlp_dim).
      mask_prob: BERT only, probability that a position is masked (0.15 in the paper).
      eval_mask_seed: BERT only, evaluation masks come from this fixed seed so evaluations are
        deterministic and comparable across checkpoints.
      num_classes: > 0 adds the classifier (fine-tuning).
    """
    palette = np.asarray(palette, np.float32)
    if palette.ndim != 2 or palette.shape[1] != 3:
      raise ValueError(f"palette must be [num_clusters, 3], got shape {palette.shape}; load it "
                       "with igpt_jax.load_palette.")
    if not 0.0 < mask_prob < 1.0:
      raise ValueError(f"mask_prob={mask_prob} must be in (0, 1).")
    self.palette = palette
    self.variant = variant
    self.image_size = image_size
    self.mask_prob = mask_prob
    self.eval_mask_seed = eval_mask_seed
    self.num_classes = num_classes
    self.model_options = dict(model_options or {})
    # Built once so that shape errors surface at construction, not inside the first step.
    self.model = models.create_model(
        variant, image_size=image_size, num_clusters=len(palette), num_classes=num_classes,
        causal=self.objective == "autoregressive", **self.model_options)

  def dummy_batch(self, batch_size: int) -> Dict[str, np.ndarray]:
    batch = {"image": np.zeros((batch_size, self.image_size, self.image_size, 3), np.float32)}
    if self.num_classes:
      batch["label"] = np.zeros((batch_size,), np.int32)
    return batch

  def token_ids(self, batch: Batch) -> jax.Array:
    """batch["image"] [batch, size, size, 3] -> ids [batch, size * size] int32."""
    images = batch["image"]
    expected = (self.image_size, self.image_size, 3)
    if tuple(images.shape[1:]) != expected:
      raise ValueError(f"batch images have shape {tuple(images.shape[1:])} but the task expects "
                       f"{expected}; set the data pipeline's image size to image_size="
                       f"{self.image_size}.")
    ids = palette_lib.quantize(images, jnp.asarray(self.palette))
    return ids.reshape(images.shape[0], -1)

  def bert_mask(self, rng: jax.Array, ids: jax.Array) -> jax.Array:
    """[batch, length] bool, each position True (masked) independently with mask_prob."""
    return jax.random.bernoulli(rng, self.mask_prob, ids.shape)

  def init_variables(self, rng: jax.Array, batch: Batch) -> Any:
    ids = self.token_ids(batch)
    if self.num_classes:
      return self.model.init(rng, ids, method=models.ImageGPT.classify)
    return self.model.init(rng, ids)


class AutoregressiveTask(_ImageGPTTask):
  """Next-pixel prediction: loss = mean over tokens of -log p(x_t | x_<t)."""

  objective = "autoregressive"

  def loss_and_metrics(self, params: Any, batch: Batch, rng: jax.Array,
                       train: bool) -> Tuple[jax.Array, Metrics]:
    ids = self.token_ids(batch)
    logits = self.model.apply(_variables(params), ids, train=train, rngs={"dropout": rng})
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids))
    return loss, {"loss": loss, "bits_per_token": loss / LN2}

  def eval_sums(self, params: Any, batch: Batch) -> Metrics:
    ids = self.token_ids(batch)
    logits = self.model.apply(_variables(params), ids)
    per_image = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids), axis=1)
    weights = _row_weights(batch)
    nats = jnp.sum(per_image * weights)
    return {"loss": nats, "bits_per_token": nats / LN2, "count": jnp.sum(weights)}


class BertTask(_ImageGPTTask):
  """BERT objective: mask each position with probability mask_prob (input embedding zeroed),
  attend without a causal mask, and predict the masked tokens; the loss covers masked positions
  only. Training masks come from the step rng, evaluation masks from `eval_mask_seed`."""

  objective = "bert"

  def _nll(self, params, ids, masked, train, rng):
    rngs = {"dropout": rng} if rng is not None else None
    logits = self.model.apply(_variables(params), ids, masked=masked, train=train, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids)

  def loss_and_metrics(self, params: Any, batch: Batch, rng: jax.Array,
                       train: bool) -> Tuple[jax.Array, Metrics]:
    ids = self.token_ids(batch)
    mask_rng, dropout_rng = jax.random.split(rng)
    masked = self.bert_mask(mask_rng, ids)
    per_image = masked_token_loss(self._nll(params, ids, masked, train, dropout_rng),
                                  masked)
    loss = jnp.mean(per_image)
    return loss, {"loss": loss, "bits_per_token": loss / LN2,
                  "mask_rate": jnp.mean(masked.astype(jnp.float32))}

  def eval_sums(self, params: Any, batch: Batch) -> Metrics:
    ids = self.token_ids(batch)
    masked = self.bert_mask(jax.random.PRNGKey(self.eval_mask_seed), ids)
    per_image = masked_token_loss(self._nll(params, ids, masked, False, None), masked)
    weights = _row_weights(batch)
    nats = jnp.sum(per_image * weights)
    return {"loss": nats, "bits_per_token": nats / LN2, "count": jnp.sum(weights)}


class FineTuneTask(_ImageGPTTask):
  """Fine-tuning: average-pool ln_f's output, a zero-initialised linear head `clf`, and
  loss = L_GEN + L_CLF (the paper's best fine-tuning objective).

  L_GEN is the pre-training objective (`objective="autoregressive"` or "bert"); with BERT the
  classifier sees the same masked input as L_GEN, as in OpenAI's code.
  """

  headline_metric = "accuracy"

  def __init__(self, palette: np.ndarray, num_classes: int, *,
               objective: str = "autoregressive", **kwargs: Any):
    if objective not in OBJECTIVES:
      raise ValueError(f"objective={objective!r} is unknown; use one of {OBJECTIVES}.")
    if num_classes < 1:
      raise ValueError(f"num_classes={num_classes} must be >= 1 for fine-tuning.")
    self.objective = objective
    super().__init__(palette, num_classes=num_classes, **kwargs)

  def _forward(self, params, batch, mask_rng, train, dropout_rng):
    """-> (per-image L_GEN [batch], class logits [batch, classes], labels [batch])."""
    ids = self.token_ids(batch)
    masked = self.bert_mask(mask_rng, ids) if self.objective == "bert" else None
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    logits, class_logits = self.model.apply(_variables(params), ids, masked=masked, train=train,
                                       rngs=rngs, method=models.ImageGPT.classify)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
    gen = masked_token_loss(nll, masked) if masked is not None else jnp.mean(nll, axis=1)
    return gen, class_logits, batch["label"].astype(jnp.int32)

  def loss_and_metrics(self, params: Any, batch: Batch, rng: jax.Array,
                       train: bool) -> Tuple[jax.Array, Metrics]:
    mask_rng, dropout_rng = jax.random.split(rng)
    gen, class_logits, labels = self._forward(params, batch, mask_rng, train, dropout_rng)
    gen_loss = jnp.mean(gen)
    clf_loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(class_logits, labels))
    accuracy = jnp.mean((jnp.argmax(class_logits, axis=-1) == labels).astype(jnp.float32))
    loss = gen_loss + clf_loss
    return loss, {"loss": loss, "gen_loss": gen_loss, "clf_loss": clf_loss,
                  "bits_per_token": gen_loss / LN2, "accuracy": accuracy}

  def eval_sums(self, params: Any, batch: Batch) -> Metrics:
    gen, class_logits, labels = self._forward(
        params, batch, jax.random.PRNGKey(self.eval_mask_seed), False, None)
    clf = optax.softmax_cross_entropy_with_integer_labels(class_logits, labels)
    correct = (jnp.argmax(class_logits, axis=-1) == labels).astype(jnp.float32)
    weights = _row_weights(batch)
    return {
        "loss": jnp.sum((gen + clf) * weights),
        "gen_loss": jnp.sum(gen * weights),
        "clf_loss": jnp.sum(clf * weights),
        "bits_per_token": jnp.sum(gen * weights) / LN2,
        "accuracy": jnp.sum(correct * weights),
        "count": jnp.sum(weights),
    }
