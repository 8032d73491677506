"""The iGPT family: its tasks, the config fields it reads, its checks, and its modes.

Tasks: `igpt_ar` (next-pixel prediction), `igpt_bert` (masked pixels), `igpt_finetune_ar` and
`igpt_finetune_bert` (L_GEN of that objective + L_CLF, from a pre-training run's workdir in
`config.init_from`). The objective is named by the task alone.
Modes besides train, eval and plan: `palette` (fit the k-means colour palette), `sample`
(completions and unconditional samples as PNG grids), `probe` (linear probes per layer against
the raw pixels), `export` (`--format hf`, a Hugging Face ImageGPT directory; `--format
stablehlo`, ids -> logits for serving, `common_jax.serving`).
Every run reads the palette of `palette_path(run)`; a training run fits it first when missing.
"""

import dataclasses
import json
import math
import os
from typing import Any, Optional, Tuple

import numpy as np

import igpt_jax
from common_jax import checkpoint
from common_jax import family
from common_jax import plan
from common_jax import serving
from common_jax import trees
from common_jax import weights
from common_jax.task import Task
from igpt_jax import models
from igpt_jax import pretrained
from igpt_jax import probe
from igpt_jax import sampling
from igpt_jax import tasks


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """config.sample: what `--mode sample` draws."""
  num_images: int  # test images whose top part is the prompt
  num_samples: int  # completions per image
  prompt_fraction: float  # share of the raster sequence given as prompt
  temperature: float
  top_k: int  # 0 = sample from all clusters
  seed: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """Top-level config fields only iGPT runs read (defaults: configs/common.py)."""
  palette: str  # [k, 3] .npy colour centres; "" = see palette_path
  palette_clusters: int
  palette_iterations: int
  palette_max_pixels: int
  mask_prob: float  # BERT objectives
  probe_layers: Tuple[int, ...]  # () = all
  probe_l2: Tuple[float, ...]
  probe_folds: int
  sample: SampleSettings


# Task name -> (objective, classifier?).
TASKS = {"igpt_ar": ("autoregressive", False), "igpt_bert": ("bert", False),
         "igpt_finetune_ar": ("autoregressive", True), "igpt_finetune_bert": ("bert", True)}


def _fine_tuning(run: family.Run) -> bool:
  """Whether the task trains a classifier (a task added from outside is taken to)."""
  return TASKS.get(run.task, ("", True))[1]


def palette_path(run: family.Run) -> str:
  """config.palette; when empty, the palette of the run config.init_from names (its weights were
  trained on those colour ids), else <workdir>/palette.npy."""
  if run.settings.palette:
    return run.settings.palette
  if run.init_from and os.path.isdir(run.init_from):
    return os.path.join(run.init_from, "palette.npy")
  return os.path.join(run.workdir, "palette.npy")


def _task(run: family.Run) -> Task:
  objective, classifier = TASKS[run.task]
  palette = igpt_jax.load_palette(palette_path(run), num_clusters=run.settings.palette_clusters)
  common = dict(variant=run.variant, image_size=run.image_size, model_options=run.model,
                mask_prob=run.settings.mask_prob)
  if classifier:
    return tasks.FineTuneTask(palette, run.num_classes, objective=objective, **common)
  if objective == "bert":
    return tasks.BertTask(palette, **common)
  return tasks.AutoregressiveTask(palette, **common)


class IgptFamily(family.Family):
  """Image GPT: generative pre-training, fine-tuning, sampling and linear probes."""

  name = "iGPT"
  tasks = {name: _task for name in TASKS}
  settings = Settings
  writing_modes = ("train", "palette", "sample", "probe")
  resume_free_fields = ("sample", "probe_layers", "probe_l2", "probe_folds", "palette_iterations",
                        "palette_max_pixels")
  export_formats = ("hf", serving.FORMAT)

  def __init__(self):
    super().__init__()
    self.modes.update(palette=self.fit_palette, sample=self.sample, probe=self.probe)

  def model(self, run: family.Run) -> models.ImageGPT:
    """The model without its palette (which may not be fitted yet): only its size matters."""
    if run.task not in TASKS:  # a task added from outside builds its model its own way
      return super().model(run)
    objective, classifier = TASKS[run.task]
    return models.create_model(
        run.variant, image_size=run.image_size, num_clusters=run.settings.palette_clusters,
        num_classes=run.num_classes if classifier else 0, causal=objective == "autoregressive",
        **run.model)

  def abstract_params(self, run: family.Run) -> Any:
    if run.task not in TASKS:
      return super().abstract_params(run)
    return models.abstract_variables(self.model(run))["params"]

  def plan_task(self, run: family.Run) -> Task:
    """The run's task; before the palette is fitted, one with a stand-in palette of the same
    number of colours (only shapes matter to a plan)."""
    if os.path.exists(palette_path(run)) or run.task not in TASKS:
      return self.make_task(run)
    stand_in = np.linspace(-1, 1, run.settings.palette_clusters * 3, dtype=np.float32)
    objective, classifier = TASKS[run.task]
    common = dict(variant=run.variant, image_size=run.image_size, model_options=run.model,
                  mask_prob=run.settings.mask_prob)
    palette = stand_in.reshape(-1, 3)
    if classifier:
      return tasks.FineTuneTask(palette, run.num_classes, objective=objective, **common)
    return (tasks.BertTask if objective == "bert" else tasks.AutoregressiveTask)(palette, **common)

  def flops_per_example(self, run: family.Run) -> float:
    """6 * N * T + attention, N without the embeddings looked up per token (wte, wpe, sos) and
    the classifier, T = image_size**2 positions."""
    model = self.model(run)
    flat = trees.flat_shapes(self.abstract_params(run))
    per_token = sum(math.prod(shape) for key, shape in flat.items()
                    if key.split("/")[0] not in ("wte", "wpe", "sos", "clf"))
    return plan.transformer_flops_per_example(per_token, model.seq_len, model.depth,
                                              model.width)

  def plan_note(self, run: family.Run) -> str:
    path = palette_path(run)
    return "" if os.path.exists(path) else f"; palette {path} not fitted yet (train fits it first)"

  def uses_labels(self, run: family.Run) -> bool:
    return _fine_tuning(run) or run.mode == "probe"

  def check_settings(self, run: family.Run) -> None:
    """init_from, mask, sample, probe and palette settings, before any compute."""
    if not 0.0 < run.settings.mask_prob < 1.0:
      raise family.ConfigError(f"config.mask_prob={run.settings.mask_prob} must lie in (0, 1).")
    if run.init_from:
      if not _fine_tuning(run) and run.mode == "train":
        raise family.ConfigError(
            f"config.init_from is for the igpt_finetune_* tasks and the sample and probe modes; "
            f"to continue {run.task} pre-training, rerun with the same --workdir (it resumes) "
            "and leave config.init_from empty.")
      if not family.has_checkpoints(run.init_from):
        raise family.ConfigError(f"config.init_from={run.init_from} holds no checkpoint; point "
                                 "it at the workdir of an iGPT pre-training run.")
    if run.mode == "sample" and not self.model(run).causal:
      raise family.ConfigError(f"--mode sample needs an autoregressive model; config.task is "
                               f"{run.task!r}, use 'igpt_ar'.")
    if run.mode == "probe":
      model = self.model(run)
      for layer in run.settings.probe_layers:
        model.check_layer(layer)
      probe.check_probe_settings(tuple(run.settings.probe_l2), run.settings.probe_folds)
    self._check_palette(run)

  def _check_palette(self, run: family.Run) -> None:
    path = palette_path(run)
    if os.path.exists(path) and run.mode != "palette":
      igpt_jax.load_palette(path, num_clusters=run.settings.palette_clusters)  # its own checks
    if run.mode == "palette" and os.path.exists(path) and family.has_checkpoints(run.workdir):
      raise family.ConfigError(f"{run.workdir} holds checkpoints trained on the colour ids of "
                               f"{path}; refitting would change what they mean: use a new "
                               "--workdir.")
    if os.path.exists(path) or run.mode == "palette":
      return
    if run.settings.palette or run.init_from:
      raise family.ConfigError(f"palette {path} does not exist; set config.palette to the "
                               "palette.npy of the pre-training run, or fit one with --mode "
                               "palette.")
    if run.mode not in ("train", "plan"):
      raise family.ConfigError(f"{run.workdir} has no palette.npy; train there first (train "
                               "fits the palette) or set config.palette.")

  def initializer(self, run: family.Run):
    if not (run.init_from and _fine_tuning(run)):
      return None
    # Names and shapes are checked against the workdir's checkpoint now; arrays read later.
    return igpt_jax.pretrained_initializer(run.init_from, self.model(run))

  def before_training(self, run: family.Run) -> None:
    if not os.path.exists(palette_path(run)):
      self.fit_palette(run)

  # -- Modes -----------------------------------------------------------------------------------

  def fit_palette(self, run: family.Run) -> int:
    """Fits the k-means palette on the train split and writes it (with its unigram entropy)."""
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    path = palette_path(run)
    if family.is_main_process():  # process 0 fits and writes it; the others read it afterwards
      settings = run.settings
      pixels_per_image = run.image_size**2
      images, _ = _collect(run.eval_data(run.data.train_split, whole=True),
                           limit=max(1, settings.palette_max_pixels // pixels_per_image))
      print(f"fitting a {settings.palette_clusters}-colour palette on "
            f"{len(images) * pixels_per_image:,} pixels of {run.data.dataset}:"
            f"{run.data.train_split} ...", flush=True)
      centres = igpt_jax.fit_palette(images, settings.palette_clusters,
                                     iterations=settings.palette_iterations, seed=run.loop.seed,
                                     max_pixels=settings.palette_max_pixels)
      igpt_jax.save_palette(path, centres)
      # The reference for bits per token: a model that ignores context needs the unigram entropy.
      ids = np.asarray(igpt_jax.quantize(images, centres)).ravel()
      frequencies = np.bincount(ids, minlength=len(centres)) / ids.size
      frequencies = frequencies[frequencies > 0]
      entropy = float(-np.sum(frequencies * np.log2(frequencies)))
      weights.write_text(os.path.splitext(path)[0] + ".json", json.dumps(
          {"unigram_entropy_bits": entropy, "num_clusters": len(centres),
           "pixels": int(ids.size)}, indent=2))
      print(f"palette written to {path}; unigram entropy of its ids on the train split: "
            f"{entropy:.3f} bits per token")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("palette written")
    return 0

  def _trained(self, run: family.Run):
    """(task, {"params": ...}) of the pre-training run (config.init_from, else the workdir)."""
    task = self.make_task(run)
    params = checkpoint.Checkpointer(run.init_from or run.workdir, read_only=True).read_params()
    return task, {"params": params}

  def sample(self, run: family.Run) -> int:
    """Half-image completions of test images and unconditional samples, as PNG grids."""
    import jax  # pylint: disable=g-import-not-at-top
    task, variables = self._trained(run)
    options = run.settings.sample
    top_k = options.top_k or None
    rng = jax.random.PRNGKey(options.seed)
    images, _ = _collect(run.eval_data(), limit=options.num_images,
                         what=f"config.eval_split={run.data.eval_split!r}")
    originals = np.asarray(task.token_ids({"image": images}))
    prompt_len = int(options.prompt_fraction * originals.shape[1])
    prompt = np.repeat(originals[:, :prompt_len], options.num_samples, axis=0)
    completions = sampling.sample(task.model, variables, rng, prompt=prompt,
                                  temperature=options.temperature, top_k=top_k)
    completions = np.asarray(completions).reshape(len(originals), options.num_samples, -1)
    unconditional = sampling.sample(task.model, variables, jax.random.fold_in(rng, 1),
                                    num_samples=len(originals) * options.num_samples,
                                    temperature=options.temperature, top_k=top_k)
    if not family.is_main_process():
      return 0
    completion_path = os.path.join(run.workdir, "completions.png")
    unconditional_path = os.path.join(run.workdir, "samples.png")
    sampling.save_sample_grid(completion_path, task.palette, completions, originals=originals,
                              prompt_len=prompt_len)
    sampling.save_sample_grid(unconditional_path, task.palette, np.asarray(unconditional).reshape(
        len(originals), options.num_samples, -1))
    print(f"completions (prompt | {options.num_samples} samples | original) written to "
          f"{completion_path}; unconditional samples to {unconditional_path}")
    return 0

  def probe(self, run: family.Run) -> int:
    """Linear probes on the pooled features of each layer, and on the raw quantised pixels."""
    task, variables = self._trained(run)
    settings, data = run.settings, run.data
    layers = list(settings.probe_layers) or list(range(task.model.depth + 1))
    splits = {}
    for split in (data.train_split, data.eval_split):
      images, labels = _collect(run.eval_data(split), what=f"split {split!r}")
      ids = np.asarray(task.token_ids({"image": images}))
      features = probe.extract_features(task.model, variables, ids, layers=layers,
                                        batch_size=data.eval_batch_size)
      splits[split] = (ids, labels, features)
    train_ids, train_labels, train_features = splits[data.train_split]
    test_ids, test_labels, test_features = splits[data.eval_split]
    options = dict(num_classes=run.num_classes, l2=tuple(settings.probe_l2),
                   folds=settings.probe_folds)
    results = probe.probe_layers(train_features, train_labels, test_features, test_labels,
                                 layers=layers, **options)
    baseline = probe.pixel_probe(train_ids, train_labels, test_ids, test_labels, task.palette,
                                 **options)
    report = _probe_report(results, baseline, settings.probe_folds, data.train_split)
    if family.is_main_process():
      weights.write_text(os.path.join(run.workdir, "probe.json"), json.dumps(report, indent=2))
    return 0

  def is_export(self, path: str, export_format: str) -> bool:
    """A Hugging Face ImageGPT directory (config.json with model_type imagegpt), or an iGPT
    serving export."""
    if export_format == serving.FORMAT:
      return serving.is_export(path, self.name)
    try:
      with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f).get("model_type") == "imagegpt"
    except (OSError, ValueError, AttributeError):
      return False

  def export_checkpoint(self, run: family.Run, output: str, export_format: str) -> str:
    clusters = igpt_jax.load_palette(palette_path(run))
    if export_format == serving.FORMAT:
      return self._export_serving(run, output, clusters)
    return igpt_jax.export_hf_from_checkpoint(run.workdir, self.model(run), output, clusters,
                                              overwrite=run.export.overwrite)

  def _export_serving(self, run: family.Run, output: str, clusters: np.ndarray) -> str:
    """The latest checkpoint's next-pixel (or BERT) logits as StableHLO: ids -> logits, batch
    symbolic; the palette that maps pixels to ids goes into spec.json."""
    if run.task not in TASKS:
      raise family.ConfigError(f"--format stablehlo exports the iGPT tasks {sorted(TASKS)}, and "
                               f"config.task={run.task!r} is not one of them; export with "
                               "--format hf instead.")
    model = self.model(run)
    serving.check_size(self.abstract_params(run), f"iGPT {run.variant}")
    with weights.read_workdir(run.workdir) as stored:
      step = stored.step
    params = pretrained.read_checkpoint_params(run.workdir, model, step)
    batch = serving.BATCH
    ids = serving.TensorSpec(
        "ids", (batch, model.seq_len), "int32",
        f"palette ids in [0, {model.num_clusters}) of the pixels in raster order: "
        "igpt_jax.quantize(images in [-1, 1], palette) with spec.json's palette")
    meaning = ("position t predicts id t from the ids before it" if model.causal else
               "every position's id given all ids (none masked)")
    logits = serving.TensorSpec("logits", (batch, model.seq_len, model.num_clusters), "float32",
                                f"unnormalised log-probabilities over the palette: {meaning}")
    inference = serving.portable(model)
    return serving.export(
        lambda p, x: inference.apply({"params": p}, x), params, ids, logits, output,
        about=dict(serving.describe_run(run, step, self.name),
                   palette=np.asarray(clusters, np.float32).tolist()),
        overwrite=run.export.overwrite)


def _probe_report(results, baseline, folds: int, train_split: str) -> dict:
  """Prints the probe table and returns probe.json's content; the best layer is chosen without
  the test split where cross-validation ran."""
  selection = "cv_accuracy" if folds else "test_accuracy"
  best = max(results, key=lambda row: row[selection])
  rows = [(str(row["layer"]), row) for row in results] + [("pixels", baseline)]
  print(f"{'layer':>6} {'l2':>8} {'cv acc':>8} {'train acc':>10} {'test acc':>9}")
  for name, row in rows:
    cv = "-" if row["cv_accuracy"] is None else f"{row['cv_accuracy']:.4f}"
    print(f"{name:>6} {row['l2']:>8.0e} {cv:>8} {row['train_accuracy']:>10.4f} "
          f"{row['test_accuracy']:>9.4f}")
  note = (f"; cv acc = {folds}-fold cross-validated accuracy on {train_split!r}, which chose l2"
          if folds else "")
  print(f"pixels = the same linear probe on the raw quantised pixels{note}")
  print(f"best layer {best['layer']} (by {selection.replace('_', ' ')}): test accuracy "
        f"{best['test_accuracy']:.4f} vs {baseline['test_accuracy']:.4f} on raw pixels")
  return {"layers": [{"layer": int(row["layer"]),
                      **{key: row[key] for key in probe.REPORT_KEYS}} for row in results],
          "pixels": {key: baseline[key] for key in probe.REPORT_KEYS},
          "best_layer": int(best["layer"]), "best_layer_by": selection,
          "classifier": "ridge regression (closed form), penalty chosen per feature set by "
                        f"{folds}-fold cross-validation on the train split"
                        if folds else "ridge regression (closed form)"}


def _collect(batches, limit: Optional[int] = None, what: str = "the split"):
  """Concatenates eval batches (real rows only) -> (images, labels)."""
  images, labels, count = [], [], 0
  for batch in batches:
    real = batch["mask"] > 0
    images.append(batch["image"][real])
    labels.append(batch["label"][real])
    count += int(real.sum())
    if limit is not None and count >= limit:
      break
  if count == 0:
    raise ValueError(f"{what} yielded no images; check the split (and config.sample.num_images "
                     "for --mode sample).")
  return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


FAMILY = IgptFamily()
