r"""The one entry point: train (default), eval, plan, and the family-specific modes.

  python run.py                                   # the default job: ViT on the bundled digits
  python run.py --config configs/vit_finetune.py:B/16,cifar10 --workdir /tmp/ft \
      --config.batch_size=256
  python run.py --config configs/vit_digits.py --mode plan    # check a config, no compute

The config is read here, once; everything below receives plain values.
"""

import dataclasses
import json
import os
import re
import sys
import tempfile
from typing import Any, Callable, Dict, Optional

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "vit_digits.py")
MODES = ("train", "eval", "plan", "palette", "sample", "probe", "export")
EXPORT_FORMATS = ("npz", "safetensors", "hf")
IGPT_TASKS = ("igpt_ar", "igpt_bert", "igpt_finetune")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Recipe file (configs/*.py), optionally with ':args'.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go (default: workdirs/<recipe>[_<argument>]).")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do with the config.")
_FORMAT = flags.DEFINE_enum(
    "format", "npz", EXPORT_FORMATS,
    "--mode export: npz (official ViT layout), safetensors (timm names) or hf (Hugging Face "
    "ImageGPT directory).")
_OUTPUT = flags.DEFINE_string("output", None, "--mode export: the file (or directory) to write.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "--mode export: replace an existing --output (files are always written "
    "to a temporary name first, so a failed export never replaces a good one).")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first (multi-host; arguments auto-detected on TPU, "
    "SLURM and Kubernetes, or from --coordinator_address/--num_processes/--process_id).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


class ConfigError(ValueError):
  """A setting that cannot work; raised before any compute."""


def _dtype(name: str, key: str):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ConfigError(f"config.model.{key}={name!r} is unknown; use float32, bfloat16 or "
                      "float16.") from None


def _section(cls, values, field: str):
  """Builds a plain dataclass from a config section, naming unknown fields."""
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"config.{field} has unknown field(s) {unknown}; known fields are "
                      f"{sorted(known)}.")
  return cls(**values)


def _model_options(config) -> Dict[str, Any]:
  """config.model without `variant`, with dtypes resolved and ""/0 meaning None."""
  model = dict(config.model)
  model.pop("variant")
  for key in ("dtype", "param_dtype"):
    if key in model:
      model[key] = _dtype(model[key], key)
  # Config files cannot hold None for a field that the command line may set: "" and 0 stand in.
  if "attention_implementation" in model:
    model["attention_implementation"] = model["attention_implementation"] or None
  if "representation_size" in model:
    model["representation_size"] = model["representation_size"] or None
  return model


def palette_path(config, workdir: str) -> str:
  """config.palette; when empty, the palette of the run config.init_from names (the weights were
  trained on its colour ids), else <workdir>/palette.npy."""
  if config.palette:
    return config.palette
  if config.get("init_from") and os.path.isdir(config.init_from):
    return os.path.join(config.init_from, "palette.npy")
  return os.path.join(workdir, "palette.npy")


def _is_main_process() -> bool:
  """Only process 0 writes the workdir's files (all processes share it, as Orbax requires)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def task_factory(config, workdir: str) -> Callable[[], Any]:
  """Validates the model options now and returns a function that builds the task.

  iGPT tasks need the palette file, which may not exist yet when the plan is made (the palette
  mode, or a train run that fits it first, writes it).
  """
  options = _model_options(config)
  variant = config.model.variant
  if config.task == "vit_classification":
    from vit_jax import tasks  # pylint: disable=g-import-not-at-top
    task = tasks.ClassificationTask(variant=variant, num_classes=config.num_classes,
                                    image_size=config.image_size, model_options=options)
    task.build_model()  # validates variant, patch size, classifier, posemb
    return lambda: task
  if config.task in IGPT_TASKS:
    import igpt_jax  # pylint: disable=g-import-not-at-top
    from igpt_jax import tasks  # pylint: disable=g-import-not-at-top
    _igpt_model(config)  # validates the shape options before anything runs

    def build():
      palette = igpt_jax.load_palette(palette_path(config, workdir),
                                      num_clusters=config.palette_clusters)
      common = dict(variant=variant, image_size=config.image_size, model_options=options)
      if config.task == "igpt_ar":
        return tasks.AutoregressiveTask(palette, **common)
      if config.task == "igpt_bert":
        return tasks.BertTask(palette, mask_prob=config.mask_prob, **common)
      return tasks.FineTuneTask(palette, config.num_classes, objective=config.objective,
                                mask_prob=config.mask_prob, **common)
    return build
  raise ConfigError(f"config.task={config.task!r} is unknown; use 'vit_classification' or one "
                    f"of {IGPT_TASKS}.")


def _igpt_model(config):
  """The iGPT model a config describes, built without its palette (which may not exist yet)."""
  import igpt_jax  # pylint: disable=g-import-not-at-top
  num_classes = config.num_classes if config.task == "igpt_finetune" else 0
  causal = config.task == "igpt_ar" or (config.task == "igpt_finetune" and
                                        config.objective == "autoregressive")
  return igpt_jax.create_model(config.model.variant, image_size=config.image_size,
                               num_clusters=config.palette_clusters, num_classes=num_classes,
                               causal=causal, **_model_options(config))


def check_workdir(workdir: str) -> None:
  """Fails with one sentence when the workdir cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check"):
      pass
  except OSError as error:
    raise ConfigError(f"--workdir {workdir} is not writable ({error.strerror}); choose a "
                      "directory you can write to.") from None


@dataclasses.dataclass
class Plan:
  """Everything a run needs, validated, before any compute."""
  make_task: Callable[[], Any]
  loop: Any
  optimizer: Any
  mesh: Any
  rules: Any
  train_data: Callable
  eval_data: Callable
  initial_params: Optional[Callable] = None
  _task: Any = None

  @property
  def task(self):
    if self._task is None:
      self._task = self.make_task()
    return self._task


def make_plan(config, workdir: str, mode: str = "train") -> Plan:
  """Validates the whole config (model, data, mesh, batch, optimiser, workdir); no compute.

  Modes that only read the workdir (plan, eval) neither create nor check it for writing.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from common_jax import data, optim, sharding, train  # pylint: disable=g-import-not-at-top

  make_task = task_factory(config, workdir)
  loop = train.LoopConfig(
      total_steps=config.total_steps, batch_size=config.batch_size, seed=config.seed,
      accum_steps=config.accum_steps, log_every=config.log_every,
      eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints)
  train.check_loop(loop)
  optimizer = _section(optim.OptimizerConfig, config.optimizer, "optimizer")
  optim.check(optimizer, loop.total_steps)
  mesh_config = _section(sharding.MeshConfig, config.mesh, "mesh")
  mesh = sharding.make_mesh(mesh_config)
  sharding.check_batch_size(config.batch_size, mesh)
  if config.accum_steps > 1:
    sharding.check_batch_size(config.batch_size // config.accum_steps, mesh,
                              field="config.batch_size / config.accum_steps")
  sharding.check_batch_size(config.eval_batch_size, mesh, field="config.eval_batch_size")
  rules = tuple(tuple(r) for r in config.sharding_rules) if config.get(
      "sharding_rules") else sharding.DEFAULT_RULES

  data_args = dict(dataset=config.dataset, data_dir=config.data_dir or None,
                   manual_dir=config.manual_dir or None)
  data.check_dataset(split=config.train_split, **data_args)
  data.check_dataset(split=config.eval_split, **data_args)
  if mode not in ("plan", "eval"):
    check_workdir(workdir)
  if config.task in IGPT_TASKS:
    _check_igpt(config, workdir, mode)

  def train_data(start_step: int):
    return data.train_iterator(
        split=config.train_split, preprocess=config.preprocess_train,
        global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data_workers, cache=config.data_cache, **data_args)

  def eval_data(split: Optional[str] = None):
    return data.eval_iterator(
        split=split or config.eval_split, preprocess=config.preprocess_eval,
        global_batch_size=config.eval_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), **data_args)

  initial_params = None
  if config.task == "vit_classification" and config.init_from:
    from vit_jax import interop  # pylint: disable=g-import-not-at-top
    # Checks names and shapes against the file now, before any compute.
    initial_params = interop.pretrained_initializer(config.init_from, make_task().build_model())
  return Plan(make_task=make_task, initial_params=initial_params, loop=loop, optimizer=optimizer,
              mesh=mesh_config, rules=rules,
              train_data=train_data, eval_data=eval_data)


def _check_igpt(config, workdir: str, mode: str) -> None:
  """The palette and init_from settings of an iGPT run, before any compute."""
  if config.init_from:
    if config.task != "igpt_finetune" and mode == "train":
      raise ConfigError(f"config.init_from is for igpt_finetune runs and the sample and probe "
                        f"modes; to continue {config.task} pre-training, rerun with the same "
                        "--workdir (it resumes) and leave config.init_from empty.")
    if not _has_checkpoints(config.init_from):
      raise ConfigError(f"config.init_from={config.init_from} holds no checkpoint; point it at "
                        "the workdir of an iGPT pre-training run.")
  if mode == "probe":
    from igpt_jax import probe  # pylint: disable=g-import-not-at-top
    model = _igpt_model(config)
    for layer in config.probe_layers:
      model.check_layer(layer)
    probe.check_probe_settings(tuple(config.probe_l2), config.probe_folds)
  path = palette_path(config, workdir)
  if mode == "palette" and os.path.exists(path) and _has_checkpoints(workdir):
    raise ConfigError(f"{workdir} holds checkpoints trained on the colour ids of {path}; "
                      "refitting would change what they mean: use a new --workdir.")
  if os.path.exists(path) or mode == "palette":
    return
  if config.palette or config.init_from:
    raise ConfigError(f"palette {path} does not exist; set config.palette to the palette.npy of "
                      "the pre-training run, or fit one with --mode palette.")
  if mode in ("sample", "probe", "eval"):
    raise ConfigError(f"{workdir} has no palette.npy; train there first (train fits the "
                      "palette) or set config.palette.")


def describe(config, plan: Plan, workdir: str) -> str:
  """One line: model size, mesh, steps, workdir (parameter shapes via jax.eval_shape)."""
  import jax  # pylint: disable=g-import-not-at-top
  from common_jax import layers, sharding  # pylint: disable=g-import-not-at-top
  if config.task in IGPT_TASKS and not os.path.exists(palette_path(config, workdir)):
    import igpt_jax  # pylint: disable=g-import-not-at-top
    model = _igpt_model(config)
    shapes = igpt_jax.models.abstract_variables(model)
    note = f"; palette {palette_path(config, workdir)} not fitted yet (train fits it first)"
  else:
    model = plan.task.build_model()
    dummy = plan.task.dummy_batch(1)
    shapes = jax.eval_shape(
        lambda b: plan.task.init_variables(model, jax.random.PRNGKey(0), b),
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dummy.items()})
    note = ""
  mesh = sharding.make_mesh(plan.mesh)
  return (f"plan OK: {type(model).__name__} with {layers.count_params(shapes['params']):,} "
          f"parameters; mesh {dict(mesh.shape)} over {jax.device_count()} devices; "
          f"{plan.loop.total_steps} steps of global batch {plan.loop.batch_size}; "
          f"workdir {workdir}{note}")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --flag=value.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep the libraries' INFO lines off the console
  config = _CONFIG.value
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  # "configs/vit_finetune.py:B/16,cifar10" -> workdirs/vit_finetune_B_16_cifar10
  config_path, _, config_arg = flags.FLAGS["config"].config_filename.partition(":")
  recipe = os.path.splitext(os.path.basename(config_path))[0]
  if config_arg:
    recipe += "_" + re.sub(r"\W+", "_", config_arg).strip("_")
  workdir = os.path.abspath(_WORKDIR.value or os.path.join(ROOT, "workdirs", recipe))
  if _MODE.value == "export":
    return _export(config, workdir)
  mode = _MODE.value
  try:  # ValueError: ConfigError and the checks of the packages below run.py
    if config.task not in IGPT_TASKS and mode in ("palette", "sample", "probe"):
      raise ConfigError(f"--mode {mode} is for the iGPT tasks {IGPT_TASKS}; config.task is "
                        f"{config.task!r}.")
    plan = make_plan(config, workdir, mode)
    if config.task in IGPT_TASKS:
      if mode == "palette" or (mode == "train" and
                               not os.path.exists(palette_path(config, workdir))):
        _fit_palette(config, plan, workdir)
        if mode == "palette":
          return 0
      if config.init_from and config.task == "igpt_finetune" and mode == "train":
        plan.initial_params = _pretrained_initializer(config.init_from)
    if mode == "plan":
      print(describe(config, plan, workdir))
      return 0
    if mode == "sample":
      return _sample(config, plan, workdir)
    if mode == "probe":
      return _probe(config, plan, workdir)
    if mode == "eval":
      return _evaluate(plan, workdir)
    return _train(config, plan, workdir)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2


def _train(config, plan: Plan, workdir: str) -> int:
  """Trains (resuming from the workdir's latest checkpoint) and writes result.json."""
  from common_jax import train  # pylint: disable=g-import-not-at-top
  if _is_main_process() and not _has_checkpoints(workdir):
    # A fresh run records its config; a resumed run keeps the one it was started with.
    _write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
  result = train.train_and_evaluate(
      plan.task, loop=plan.loop, optimizer=plan.optimizer, mesh_config=plan.mesh,
      workdir=workdir, train_data=plan.train_data, eval_data=plan.eval_data, rules=plan.rules,
      initial_params=plan.initial_params)
  if not result["stopped"] and result["eval"] and _is_main_process():
    headline = plan.task.headline_metric
    summary = {"step": result["step"], headline: result["eval"].get(headline),
               "train_seconds": round(result["seconds"], 1)}
    _write_text(os.path.join(workdir, "result.json"),
                json.dumps(dict(summary, eval=result["eval"]), indent=2))
    print(f"final {headline}: {result['eval'].get(headline, float('nan')):.4f} "
          f"(results in {os.path.join(workdir, 'result.json')})")
  return 0


def _write_text(path: str, text: str) -> None:
  """Writes a small file whole: to a temporary name, then renamed over `path`."""
  temporary = f"{path}.tmp-{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(temporary, path)


def _params_of(workdir: str) -> Any:
  """Host parameters of the latest checkpoint in `workdir`."""
  from common_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.Checkpointer(workdir, read_only=True).read_numpy()["params"]


def _pretrained_initializer(source_workdir: str) -> Callable[[Any], Any]:
  """fresh params -> fresh params with every parameter present in `source_workdir` replaced.

  Only the classifier head (`clf`) may be new; every other parameter must be in the checkpoint
  with the same shape, and the checkpoint may hold nothing the model lacks.
  """
  import flax  # pylint: disable=g-import-not-at-top

  def initialize(fresh):
    pretrained = flax.traverse_util.flatten_dict(_params_of(source_workdir), sep="/")
    flat = flax.traverse_util.flatten_dict(fresh, sep="/")
    fix = "use the same model options as the pre-training run"
    for key in sorted(set(pretrained) - set(flat)):
      raise ValueError(f"config.init_from={source_workdir} holds parameter {key}, which this "
                       f"model does not have; {fix}.")
    for key in sorted(set(flat) - set(pretrained)):
      if not key.startswith("clf"):
        raise ValueError(f"config.init_from={source_workdir} has no parameter {key}, which "
                         f"this model needs; {fix}.")
    for key, value in pretrained.items():
      if flat[key].shape != value.shape:
        raise ValueError(f"config.init_from={source_workdir}: parameter {key} has shape "
                         f"{value.shape} there but {flat[key].shape} in this model; {fix}.")
      flat[key] = value.astype(flat[key].dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")
  return initialize


def _collect(batches, limit: Optional[int] = None, what: str = "the split"):
  """Concatenates eval batches (real rows only) -> (images, labels)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
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


def _fit_palette(config, plan: Plan, workdir: str) -> str:
  """Fits the k-means palette on the train split and writes it; returns the path."""
  import jax  # pylint: disable=g-import-not-at-top
  import igpt_jax  # pylint: disable=g-import-not-at-top
  path = palette_path(config, workdir)
  if not _is_main_process():  # process 0 fits and writes it; the others read it afterwards
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("palette written")
    return path
  pixels_per_image = config.image_size**2
  images, _ = _collect(plan.eval_data(config.train_split),
                       limit=max(1, config.palette_max_pixels // pixels_per_image))
  print(f"fitting a {config.palette_clusters}-colour palette on {len(images) * pixels_per_image:,}"
        f" pixels of {config.dataset}:{config.train_split} ...", flush=True)
  centres = igpt_jax.fit_palette(images, config.palette_clusters,
                                 iterations=config.palette_iterations, seed=config.seed,
                                 max_pixels=config.palette_max_pixels)
  igpt_jax.save_palette(path, centres)
  # The reference for bits per token: a model that ignores context needs the unigram entropy.
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = np.asarray(igpt_jax.quantize(images, centres)).ravel()
  frequencies = np.bincount(ids, minlength=len(centres)) / ids.size
  entropy = float(-np.sum(frequencies[frequencies > 0] * np.log2(frequencies[frequencies > 0])))
  _write_text(os.path.splitext(path)[0] + ".json", json.dumps(
      {"unigram_entropy_bits": entropy, "num_clusters": len(centres), "pixels": int(ids.size)},
      indent=2))
  print(f"palette written to {path}; unigram entropy of its ids on the train split: "
        f"{entropy:.3f} bits per token")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("palette written")
  return path


def _sample(config, plan: Plan, workdir: str) -> int:
  """Unconditional samples and half-image completions of test images, as PNG grids."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from igpt_jax import sampling  # pylint: disable=g-import-not-at-top
  task = plan.task
  model = task.build_model()
  if not model.causal:
    raise ConfigError(f"--mode sample needs an autoregressive model; config.task is "
                      f"{config.task!r}, use 'igpt_ar'.")
  variables = {"params": _params_of(config.init_from or workdir)}
  options = config.sample
  top_k = options.top_k or None
  rng = jax.random.PRNGKey(options.seed)
  images, _ = _collect(plan.eval_data(), limit=options.num_images,
                       what=f"config.eval_split={config.eval_split!r}")
  originals = np.asarray(task.token_ids({"image": images}))
  prompt_len = int(options.prompt_fraction * originals.shape[1])
  prompt = np.repeat(originals[:, :prompt_len], options.num_samples, axis=0)
  completions = sampling.sample(model, variables, rng, prompt=prompt,
                                temperature=options.temperature, top_k=top_k)
  completions = np.asarray(completions).reshape(len(originals), options.num_samples, -1)
  completion_path = os.path.join(workdir, "completions.png")
  unconditional = sampling.sample(model, variables, jax.random.fold_in(rng, 1),
                                  num_samples=len(originals) * options.num_samples,
                                  temperature=options.temperature, top_k=top_k)
  unconditional_path = os.path.join(workdir, "samples.png")
  if not _is_main_process():
    return 0
  sampling.save_sample_grid(completion_path, task.palette, completions, originals=originals,
                            prompt_len=prompt_len)
  sampling.save_sample_grid(unconditional_path, task.palette, np.asarray(unconditional).reshape(
      len(originals), options.num_samples, -1))
  print(f"completions (prompt | {options.num_samples} samples | original) written to "
        f"{completion_path}; unconditional samples to {unconditional_path}")
  return 0


def _probe(config, plan: Plan, workdir: str) -> int:
  """Linear probes on the pooled features of each layer, and on the raw quantised pixels."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from igpt_jax import probe  # pylint: disable=g-import-not-at-top
  task = plan.task
  model = task.build_model()
  layers = list(config.probe_layers) or list(range(model.depth + 1))
  variables = {"params": _params_of(config.init_from or workdir)}
  splits = {}
  for split in (config.train_split, config.eval_split):
    images, labels = _collect(plan.eval_data(split), what=f"split {split!r}")
    ids = np.asarray(task.token_ids({"image": images}))
    features = probe.extract_features(model, variables, ids, layers=layers,
                                      batch_size=config.eval_batch_size)
    splits[split] = (ids, labels, features)
  (train_ids, train_labels, train_features) = splits[config.train_split]
  (test_ids, test_labels, test_features) = splits[config.eval_split]
  settings = dict(num_classes=config.num_classes, l2=tuple(config.probe_l2),
                  folds=config.probe_folds)
  results = probe.probe_layers(train_features, train_labels, test_features, test_labels,
                               layers=layers, **settings)
  baseline = probe.pixel_probe(train_ids, train_labels, test_ids, test_labels, task.palette,
                               **settings)
  # The best layer is chosen without the test split where cross-validation ran.
  selection = "cv_accuracy" if config.probe_folds else "test_accuracy"
  best = max(results, key=lambda row: row[selection])
  rows = [(str(row["layer"]), row) for row in results] + [("pixels", baseline)]
  print(f"{'layer':>6} {'l2':>8} {'cv acc':>8} {'train acc':>10} {'test acc':>9}")
  for name, row in rows:
    cv = "-" if row["cv_accuracy"] is None else f"{row['cv_accuracy']:.4f}"
    print(f"{name:>6} {row['l2']:>8.0e} {cv:>8} {row['train_accuracy']:>10.4f} "
          f"{row['test_accuracy']:>9.4f}")
  note = (f"; cv acc = {config.probe_folds}-fold cross-validated accuracy on "
          f"{config.train_split!r}, which chose l2") if config.probe_folds else ""
  print(f"pixels = the same linear probe on the raw quantised pixels{note}")
  print(f"best layer {best['layer']} (by {selection.replace('_', ' ')}): test accuracy "
        f"{best['test_accuracy']:.4f} vs {baseline['test_accuracy']:.4f} on raw pixels")
  report = {"layers": [{"layer": int(row["layer"]),
                        **{key: row[key] for key in probe.REPORT_KEYS}} for row in results],
            "pixels": {key: baseline[key] for key in probe.REPORT_KEYS},
            "best_layer": int(best["layer"]), "best_layer_by": selection,
            "classifier": "ridge regression (closed form), penalty chosen per feature set by "
                          f"{config.probe_folds}-fold cross-validation on the train split"
                          if config.probe_folds else "ridge regression (closed form)"}
  if _is_main_process():
    _write_text(os.path.join(workdir, "probe.json"), json.dumps(report, indent=2))
  return 0


def _export(config, workdir: str) -> int:
  """Writes the latest checkpoint of `workdir` in another format; the workdir is only read."""
  try:
    if not _OUTPUT.value:
      raise ConfigError("--mode export needs --output=<file or directory>.")
    model = task_factory(config, workdir)().build_model()
    output = os.path.abspath(_OUTPUT.value)
    if config.task == "vit_classification":
      if _FORMAT.value == "hf":
        raise ConfigError("--format hf is for iGPT; export a ViT as npz or safetensors.")
      from vit_jax import interop  # pylint: disable=g-import-not-at-top
      if os.path.exists(output) and not _OVERWRITE.value:
        raise ConfigError(f"--output {output} already exists; choose a new path or pass "
                          "--overwrite to replace it.")
      path = interop.export_from_checkpoint(workdir, model, output, _FORMAT.value)
    else:
      if _FORMAT.value != "hf":
        raise ConfigError(f"--format {_FORMAT.value} is for ViT; export an iGPT as hf.")
      from igpt_jax import interop  # pylint: disable=g-import-not-at-top
      import igpt_jax  # pylint: disable=g-import-not-at-top
      clusters = igpt_jax.load_palette(palette_path(config, workdir))
      path = interop.export_hf_from_checkpoint(workdir, model, output, clusters,
                                               overwrite=_OVERWRITE.value)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except OSError as error:
    print(f"error: --output {_OUTPUT.value} cannot be written ({error.strerror or error}); "
          "choose a path you can write to.", file=sys.stderr)
    return 2
  print(f"exported the latest checkpoint of {workdir} to {path}")
  return 0


def _evaluate(plan: Plan, workdir: str) -> int:
  """Evaluates the latest checkpoint of `workdir` on config.eval_split."""
  import jax  # pylint: disable=g-import-not-at-top
  from common_jax import checkpoint, optim, sharding, train  # pylint: disable=g-import-not-at-top
  checkpointer = checkpoint.Checkpointer(workdir, read_only=True)  # refuses a missing dir
  step = checkpointer.latest_step()
  if step is None:
    print(f"error: --workdir {workdir} holds no checkpoint; train first.", file=sys.stderr)
    return 2
  trainer = train.Trainer(task=plan.task, mesh=sharding.make_mesh(plan.mesh), rules=plan.rules,
                          tx=optim.make_optimizer(plan.optimizer, plan.loop.total_steps))
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
  state = checkpointer.restore(state, step)
  results = trainer.evaluate(state.params, plan.eval_data())
  print(f"eval of step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
