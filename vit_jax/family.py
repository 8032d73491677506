"""The ViT family: its task, the config fields it reads, its checks, pretrained weights (an
official .npz, a timm .safetensors or another run's workdir in `config.init_from`) and the
export mode (`--format npz` in the official layout, `--format safetensors` with timm names,
`--format stablehlo` the classifier for serving, `common_jax.serving`) and the fewshot mode
(few-shot linear evaluation of the pre-logit features, `vit_jax.fewshot`)."""

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
import vit_jax
import math

from common_jax import checkpoint
from common_jax import family
from common_jax import plan
from common_jax import serving
from common_jax import trees
from common_jax import weights
from vit_jax import attention_analysis
from vit_jax import fewshot
from vit_jax import models
from vit_jax import mpp
from vit_jax import predict as predict_lib
from vit_jax import pretrained
from vit_jax import tasks


@dataclasses.dataclass(frozen=True)
class Settings:
  """Top-level config fields only ViT tasks read."""
  label_smoothing: float  # training targets only; evaluation uses the hard labels
  # --mode fewshot: training examples per class, random draws, ridge penalty (configs/common.py)
  fewshot_shots: Tuple[int, ...] = fewshot.DEFAULT_SHOTS
  fewshot_seeds: int = fewshot.DEFAULT_SEEDS
  fewshot_l2: float = fewshot.DEFAULT_L2
  eval_top5: bool = False  # evaluations also report top5_accuracy
  fewshot_in_eval: bool = False  # every evaluation also runs the few-shot evaluation
  mask_prob: float = 0.5  # vit_masked_patch: the fraction of patches corrupted
  loss: str = "softmax"  # vit_classification: "softmax" or "sigmoid" cross-entropy
  mixup: float = 0.0  # vit_classification: p of mixup's Beta(p, p); 0 = none
  predict_input: str = ""  # --mode predict: the folder of images to classify
  predict_output: str = ""  # --mode predict: the CSV to write; "" = <workdir>/predictions.csv


def _masked_patch(run: family.Run) -> mpp.MaskedPatchTask:
  return mpp.MaskedPatchTask(variant=run.variant, image_size=run.image_size,
                             model_options=run.model, mask_prob=run.settings.mask_prob)


def _classification(run: family.Run) -> tasks.ClassificationTask:
  return tasks.ClassificationTask(
      variant=run.variant, num_classes=run.num_classes, image_size=run.image_size,
      model_options=run.model, label_smoothing=run.settings.label_smoothing,
      top5=run.settings.eval_top5, loss=run.settings.loss, mixup=run.settings.mixup)


class VitFamily(family.Family):
  """Supervised ViT classification (pre-training and fine-tuning) and masked patch prediction."""

  name = "ViT"
  tasks = {"vit_classification": _classification, "vit_masked_patch": _masked_patch}
  settings = Settings
  export_formats = ("npz", "safetensors", serving.FORMAT)
  # fewshot writes <workdir>/fewshot.json, attention its plots and numbers
  writing_modes = ("train", "fewshot", "attention", "predict")
  resume_free_fields = ("fewshot_shots", "fewshot_seeds", "fewshot_l2", "eval_top5",
                        "fewshot_in_eval",
                        "predict_input", "predict_output")

  def __init__(self):
    super().__init__()
    self.modes["fewshot"] = self.fewshot
    self.modes["attention"] = self.attention
    self.modes["predict"] = self.predict

  def model_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
    options = super().model_options(options)
    if "representation_size" in options:
      options["representation_size"] = options["representation_size"] or None
    return options

  def flops_per_example(self, run: family.Run) -> Optional[float]:
    """6 * N * T + attention, N without the position embedding, class token and head (looked
    up, not multiplied per token), T the tokens (patches, plus the class token)."""
    if run.task not in ("vit_classification", "vit_masked_patch"):  # added from outside
      return None
    model = self.model(run)
    if getattr(model, "resnet_stages", None) is not None:  # convolutions: not 6 * N * T
      return None
    flat = trees.flat_shapes(self.abstract_params(run))
    looked_up = ("cls", "head/", "mask_token", "Transformer/posembed")
    per_token = sum(math.prod(shape) for key, shape in flat.items()
                    if not key.startswith(looked_up) and "relative_posemb" not in key)
    tokens = ((run.image_size // model.effective_patch_size)**2
              + (model.classifier == "token"))
    return plan.transformer_flops_per_example(per_token, tokens, model.depth, model.width)

  def evaluators(self, run: family.Run):
    """With config.fewshot_in_eval, the few-shot evaluation (`vit_jax.fewshot`) at every
    evaluation of a vit_classification run, logged as eval/fewshot/<k>shot_accuracy."""
    if not run.settings.fewshot_in_eval:
      return []
    settings = run.settings
    return [fewshot.make_evaluator(
        self.model(run), lambda: run.eval_data(run.data.train_split, whole=True),
        lambda: run.eval_data(whole=True), num_classes=run.num_classes,
        shots=tuple(settings.fewshot_shots), seeds=settings.fewshot_seeds,
        l2=settings.fewshot_l2)]

  def uses_labels(self, run: family.Run) -> bool:
    """Masked patch prediction reads images only (fewshot reads labels whatever trained it)."""
    return run.task != "vit_masked_patch" or run.mode == "fewshot"

  def check_settings(self, run: family.Run) -> None:
    """The fewshot mode's settings, and a trained workdir for it to read."""
    if run.mode == "attention":
      if not family.has_checkpoints(run.workdir):
        raise family.ConfigError(f"--workdir {run.workdir} holds no checkpoint; --mode attention "
                                 "analyses a trained run, so train there first or point "
                                 "--workdir at a ViT training run.")
      if run.task != "vit_classification" or run.model.get("scan_layers"):
        raise family.ConfigError("--mode attention analyses a vit_classification run with "
                                 "config.model.scan_layers=False; set those.")
    if run.mode == "predict":
      self._check_predict(run)
    if run.settings.fewshot_in_eval and run.mode == "train":
      if run.task != "vit_classification":
        raise family.ConfigError(f"config.fewshot_in_eval=True evaluates a classifier's features, "
                                 f"and config.task={run.task!r}; set it False.")
      fewshot.check_settings(tuple(run.settings.fewshot_shots), run.settings.fewshot_seeds,
                             run.settings.fewshot_l2)
    if run.mode != "fewshot":
      return
    if not isinstance(self.model(run), models.VisionTransformer):
      raise family.ConfigError(f"--mode fewshot reads the pre-logit features of a ViT "
                               f"classifier, and task {run.task!r} builds another model; use it "
                               "with task vit_classification.")
    settings = run.settings
    fewshot.check_settings(tuple(settings.fewshot_shots), settings.fewshot_seeds,
                           settings.fewshot_l2)
    if not family.has_checkpoints(run.workdir):
      raise family.ConfigError(f"--workdir {run.workdir} holds no checkpoint; --mode fewshot "
                               "evaluates a trained run, so train there first or point "
                               "--workdir at a ViT training run.")

  def initializer(self, run: family.Run):
    if not run.init_from:
      return None
    # Names and shapes are checked against the file or workdir now; arrays are read later.
    return vit_jax.pretrained_initializer(run.init_from, self.model(run))

  def export_checkpoint(self, run: family.Run, output: str, export_format: str) -> str:
    if export_format == serving.FORMAT:
      return self._export_serving(run, output)
    return vit_jax.export_from_checkpoint(run.workdir, self.model(run), output,
                                          export_format)

  def is_export(self, path: str, export_format: str) -> bool:
    """An npz in the official layout, safetensors with timm's names, or a ViT serving export."""
    if export_format == serving.FORMAT:
      return serving.is_export(path, self.name)
    read, name = {"npz": (weights.read_npz, "embedding/kernel"),
                  "safetensors": (lambda p: weights.read_safetensors([p]),
                                  "patch_embed.proj.weight")}[export_format]
    try:
      with read(path) as tensors:
        return name in tensors.shapes
    except (ValueError, OSError):
      return False

  def _export_serving(self, run: family.Run, output: str) -> str:
    """The classifier of the latest checkpoint as StableHLO: images -> logits, batch symbolic."""
    if run.task != "vit_classification":
      raise family.ConfigError(f"--format stablehlo exports a classifier, and config.task="
                               f"{run.task!r} trains another model; export its weights with "
                               "--format npz or safetensors instead.")
    model = self.model(run)
    serving.check_size(self.abstract_params(run), f"ViT {run.variant}")
    step, params = pretrained.read_checkpoint_params(run.workdir, model)
    size, batch = run.image_size, serving.BATCH
    images = serving.TensorSpec(
        "images", (batch, size, size, 3), "float32",
        f"RGB in [-1, 1], prepared as config.preprocess_eval={run.data.preprocess_eval!r}")
    logits = serving.TensorSpec(
        "logits", (batch, run.num_classes), "float32",
        f"class scores before the {'sigmoid' if run.settings.loss == 'sigmoid' else 'softmax'} "
        f"of config.loss={run.settings.loss!r}")
    inference = serving.portable(model)
    return serving.export(
        lambda p, x: inference.apply({"params": p}, x), params, images, logits, output,
        about=dict(serving.describe_run(run, step, self.name),
                   preprocess=run.data.preprocess_eval), overwrite=run.export.overwrite)

  def fewshot(self, run: family.Run) -> int:
    """Few-shot linear evaluation of the workdir's latest checkpoint (`vit_jax.fewshot`): prints
    shots x accuracy and writes <workdir>/fewshot.json."""
    settings, data = run.settings, run.data
    shots, seeds, l2 = tuple(settings.fewshot_shots), settings.fewshot_seeds, settings.fewshot_l2
    reader = checkpoint.Checkpointer(run.workdir, read_only=True)
    step, _ = reader.params_metadata()
    params = reader.read_params(step)
    reader.close()
    model = self.model(run)
    # Every example of both splits on every process (whole=True): the same numbers everywhere.
    train_x, train_y = fewshot.extract_features(
        model, params, run.eval_data(data.train_split, whole=True))
    fewshot.check_shots(train_y, shots, run.num_classes,
                        f"config.train_split={data.train_split!r}")
    test_x, test_y = fewshot.extract_features(
        model, params, run.eval_data(data.eval_split, whole=True))
    rows = fewshot.summarize(fewshot.fewshot_accuracies(
        train_x, train_y, test_x, test_y, num_classes=run.num_classes, shots=shots, seeds=seeds,
        l2=l2))
    print(f"few-shot linear evaluation of step {step}: {train_x.shape[1]}-d pre-logit features, "
          f"ridge l2={l2:g} on {{-1, 1}} targets, training examples drawn from "
          f"{data.train_split!r} ({len(train_y)} images), accuracy on {data.eval_split!r} "
          f"({len(test_y)} images)")
    print(fewshot.format_table(rows))
    if family.is_main_process():
      report = {"step": step, "l2": l2, "seeds": list(range(seeds)),
                "train_split": data.train_split, "train_examples": len(train_y),
                "eval_split": data.eval_split, "eval_examples": len(test_y),
                "feature_dim": int(train_x.shape[1]), "std": "over seeds, ddof=1",
                "results": rows}
      path = weights.write_text(os.path.join(run.workdir, "fewshot.json"),
                                json.dumps(report, indent=2))
      print(f"written to {path}")
    return 0

  def _check_predict(self, run: family.Run) -> None:
    folder = run.settings.predict_input
    if not folder or not os.path.isdir(folder):
      raise family.ConfigError(f"config.predict_input={folder!r} is not a folder; set it to the "
                               "folder of images to classify.")
    if not predict_lib.list_images(folder):
      raise family.ConfigError(f"config.predict_input={folder!r} holds no image file "
                               f"({', '.join(predict_lib.EXTENSIONS)}); point it at images.")
    if run.task != "vit_classification":
      raise family.ConfigError(f"--mode predict classifies with a vit_classification model, and "
                               f"config.task={run.task!r}; set config.task=vit_classification.")
    if not family.has_checkpoints(run.workdir) and not run.init_from:
      raise family.ConfigError(f"--workdir {run.workdir} holds no checkpoint and "
                               "config.init_from is empty; train there first, or set "
                               "config.init_from to a trained .npz, .safetensors or workdir.")

  def predict(self, run: family.Run) -> int:
    """Classifies the images of config.predict_input with the workdir's latest checkpoint (else
    the weights of config.init_from) and writes the top-5 labels and probabilities as CSV."""
    model = self.model(run)
    if family.has_checkpoints(run.workdir):
      step, params = pretrained.read_checkpoint_params(run.workdir, model)
      source = f"step {step} of {run.workdir}"
    else:
      images = np.zeros((1, run.image_size, run.image_size, 3), np.float32)
      fresh = jax.device_get(model.init(jax.random.PRNGKey(0), images)["params"])
      params, source = self.initializer(run)(nn.meta.unbox(fresh)), run.init_from
    paths = predict_lib.list_images(run.settings.predict_input)
    labels, scores = predict_lib.predict(model, params, paths, run.data.preprocess_eval)
    try:
      from common_jax import data  # pylint: disable=g-import-not-at-top  # tfds: not for models
      names = data.get_builder(**run.data.source).info.features["label"].names
    except Exception:  # pylint: disable=broad-except  # a dataset not prepared here: ids
      names = None
    output = run.settings.predict_output or os.path.join(run.workdir, "predictions.csv")
    if family.is_main_process():
      weights.write_text(output, predict_lib.to_csv(paths, labels, scores, names))
    print(f"classified {len(paths)} images of {run.settings.predict_input} with {source}: top-"
          f"{labels.shape[1]} labels and probabilities written to {output}")
    return 0

  def attention(self, run: family.Run) -> int:
    """What the latest checkpoint's attention looks at, on the first `ATTENTION_IMAGES` images
    of the eval split: mean attention distance per head and layer (the paper's Figure 7) as
    <workdir>/attention_distance.{json,png}, and attention-rollout maps of the first 8 images
    over the images as <workdir>/attention_rollout.png."""
    reader = checkpoint.Checkpointer(run.workdir, read_only=True)
    step, _ = reader.params_metadata()
    params = reader.read_params(step)
    reader.close()
    model = self.model(run)
    images, count = [], 0
    for batch in run.eval_data(whole=True):
      keep = batch["mask"] > 0
      images.append(batch["image"][keep])
      count += int(keep.sum())
      if count >= ATTENTION_IMAGES:
        break
    images = np.concatenate(images)[:ATTENTION_IMAGES]
    weights_ = attention_analysis.attention_weights(model, params, images)
    patch = model.effective_patch_size
    grid = (run.image_size // patch,) * 2
    prefix = int(model.classifier == "token")
    distances = attention_analysis.mean_attention_distance(weights_, grid, patch, prefix)
    print(f"mean attention distance (pixels) of step {step} over {len(images)} images of "
          f"{run.data.eval_split!r}, per layer: min / mean / max over the {distances.shape[1]} "
          "heads")
    for layer, row in enumerate(distances):
      print(f"  layer {layer:2d}: {row.min():6.2f} / {row.mean():6.2f} / {row.max():6.2f}")
    if family.is_main_process():
      weights.write_text(os.path.join(run.workdir, "attention_distance.json"), json.dumps(
          {"step": step, "images": len(images), "patch_size": patch, "grid": list(grid),
           "distance_pixels": distances.round(4).tolist()}, indent=2))
      plot = os.path.join(run.workdir, "attention_distance.png")
      figure = attention_analysis.distance_plot(distances, patch, run.image_size)
      weights.write_atomically(plot, lambda temporary: figure.save(temporary, format="PNG"))
      maps = attention_analysis.rollout_maps([w[:8] for w in weights_], grid, prefix)
      rollout = os.path.join(run.workdir, "attention_rollout.png")
      sheet = attention_analysis.overlay(images[:8], maps, scale=max(1, 64 // run.image_size))
      weights.write_atomically(rollout, lambda temporary: sheet.save(temporary, format="PNG"))
      print(f"written: {plot}, {rollout} (each image beside its rollout map in red)")
    return 0


# Images the attention mode analyses (the first of the eval split).
ATTENTION_IMAGES = 256
FAMILY = VitFamily()
