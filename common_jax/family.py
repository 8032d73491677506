"""Model families: what each one declares, and how `run.py` finds it by task name.

A family (`vit_jax.family.FAMILY`, `igpt_jax.family.FAMILY`) is a `Family` that declares:

  tasks            {task name: run -> Task}; each task builds and owns its model
  settings         the dataclass of the top-level config fields only this family reads
  model_options()  `config.model` -> keyword arguments of the family's model builder
  model(run)       the model a run trains, built without data (for checks and plans)
  check(run)       every check that can fail before compute, `init_from` included
  initializer(run) the loop's pretrained-weights hook for `config.init_from`, or None
  modes            {mode name: run -> exit status}: train, eval and plan for every family,
                   plus the family's own (palette, sample, probe, export, ...)

`run.py` reads the config once into a `Run` of plain values, asks `find(config.task)` for the
family, calls `family.check(run)` and then `family.modes[run.mode](run)`. It names no family and
no task: a new task or mode touches only its family. Families are found by module name
(`FAMILY_MODULES`), imported on first use; `register` adds one from elsewhere.
"""

import dataclasses
import importlib
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from common_jax import checkpoint
from common_jax import optim
from common_jax import sharding
from common_jax import sweep as sweep_lib
from common_jax import task as task_lib
from common_jax import train
from common_jax import weights
from common_jax import workdir as workdir_lib
from common_jax.errors import ConfigError
# The run's plain values and the checks on them, named by families and run.py as `family.X`.
from common_jax.runs import (  # pylint: disable=unused-import
    DataSettings, ExportRequest, NoSettings, Run, check_image_size, check_num_classes,
    check_workdir, has_checkpoints, is_main_process)

FAMILY_MODULES = ("vit_jax.family", "igpt_jax.family")
# Exit statuses of run.py: a wrapper script can tell "run me again" from "done" and "fix me".
EXIT_DONE = 0
EXIT_BAD_INPUT = 2  # one `error:` sentence; nothing was computed or changed
EXIT_DIVERGED = 3  # a non-finite loss or gradient norm; the last good checkpoint is kept
EXIT_SAVE_FAILED = 74  # a checkpoint could not be written (disk full?); the previous one is kept
EXIT_STOPPED = 75  # SIGTERM/SIGINT: a checkpoint was saved, run the same command again
# Loop fields a sweep entry may set (common_jax.sweep).
LOOP_FIELDS = tuple(field.name for field in dataclasses.fields(train.LoopConfig))
_REGISTERED: List["Family"] = []


class Family:
  """Base class of the model families; see the module docstring."""

  name: str = ""
  tasks: Dict[str, Callable[[Run], task_lib.Task]] = {}
  settings: type = NoSettings
  #: Modes that write into the workdir (it must be writable); the others only read it.
  writing_modes: Tuple[str, ...] = ("train",)
  #: `--format`s of the export mode, the default first; () = no export mode.
  export_formats: Tuple[str, ...] = ()

  def __init__(self):
    self.modes: Dict[str, Callable[[Run], int]] = {
        "train": self.train, "eval": self.evaluate, "plan": self.plan, "sweep": self.sweep}
    if self.export_formats:
      self.modes["export"] = self.export

  # -- What a family fills in ----------------------------------------------------------------

  def model_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
    """`config.model` -> the model builder's keyword arguments: dtype names resolved, and ""
    (config files cannot hold None for a field the command line may set) meaning None."""
    options = dict(options)
    for key in ("dtype", "param_dtype"):
      if key in options:
        dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
        if options[key] not in dtypes:
          raise ConfigError(f"config.model.{key}={options[key]!r} is unknown; use float32, "
                            "bfloat16 or float16.")
        options[key] = dtypes[options[key]]
    if "attention_implementation" in options:
      options["attention_implementation"] = options["attention_implementation"] or None
      if options["attention_implementation"] == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"config.model.attention_implementation='cudnn' needs an NVIDIA GPU "
                          f"with cuDNN, and this run's devices are {jax.default_backend()}; "
                          "leave it empty (JAX chooses) or set 'xla'.")
    return options

  def model(self, run: Run):
    """The model `run.task` trains (raises for bad options); a family whose tasks need data to
    be built (the iGPT palette) builds it without."""
    return self.make_task(run).model

  def abstract_params(self, run: Run) -> Any:
    """The parameter tree of `model(run)` as shapes (jax.eval_shape; no memory spent)."""
    task = self.make_task(run)
    batch = {key: jax.ShapeDtypeStruct(value.shape, value.dtype)
             for key, value in task.dummy_batch(1).items()}
    return jax.eval_shape(task.init_variables, jax.random.PRNGKey(0), batch)["params"]

  def uses_labels(self, run: Run) -> bool:
    """Whether the run reads labels (then config.num_classes must be the dataset's count)."""
    return True

  def check_settings(self, run: Run) -> None:
    """The family's own checks before any compute (settings, files it needs)."""

  def initializer(self, run: Run) -> Optional[Callable[[Any], Any]]:
    """The loop's hook that loads `run.init_from` into a fresh run, checked now; or None."""
    return None

  def before_training(self, run: Run) -> None:
    """Work a training run needs first (e.g. fitting the iGPT palette)."""

  def plan_note(self, run: Run) -> str:
    """Said after the plan line (e.g. what a training run will prepare first)."""
    return ""

  def export_checkpoint(self, run: Run, output: str, export_format: str) -> str:
    """Writes the params of the workdir's latest checkpoint to `output`; returns the path."""
    raise NotImplementedError

  def is_export(self, path: str, export_format: str) -> bool:
    """Whether `path` is an earlier export in `export_format` (--overwrite may replace it)."""
    return False

  #: Config fields (dotted) a resumed run may change besides `workdir.RESUME_FREE_FIELDS`.
  resume_free_fields: Tuple[str, ...] = ()

  # -- Shared by every family ----------------------------------------------------------------

  def make_task(self, run: Run) -> task_lib.Task:
    return self.tasks[run.task](run)

  def run_mode(self, run: Run) -> int:
    """Runs `run.mode` (checked already), holding the workdir's lock when the mode writes."""
    if not self.writes(run.mode):
      return self.modes[run.mode](run)
    with workdir_lib.lock(run.workdir):
      try:
        return self.modes[run.mode](run)
      except train.TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
      except checkpoint.SaveFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_SAVE_FAILED

  def check(self, run: Run) -> None:
    """Every check that can fail before compute: the model, loop, optimiser, mesh and batch,
    dataset and labels, the family's own (`check_settings`), `init_from` (`initializer`), and
    last the workdir, which a writing mode creates."""
    from common_jax import data  # pylint: disable=g-import-not-at-top  # tfds: not for models
    if run.mode not in self.modes:
      raise ConfigError(f"--mode {run.mode} is not a mode of {self.name} tasks such as "
                        f"{run.task!r}; use one of {', '.join(self.modes)}.")
    for name, value in (("image_size", run.image_size), ("num_classes", run.num_classes)):
      if value < 1:
        raise ConfigError(f"config.{name}={value} must be positive.")
    self.model(run)
    if run.mode != "export":  # an export reads the workdir only: no data, any device count
      if run.device_memory_gb < 0:
        raise ConfigError(f"config.device_memory_gb={run.device_memory_gb} must be >= 0 (0: "
                          "what the device reports).")
      train.check_loop(run.loop)
      optim.check(run.optimizer, run.loop.total_steps)
      mesh = sharding.make_mesh(run.mesh)
      sharding.check_batch_size(run.loop.batch_size, mesh)
      if run.loop.accum_steps > 1:
        sharding.check_batch_size(run.loop.batch_size // run.loop.accum_steps, mesh,
                                  field="config.batch_size / config.accum_steps")
      sharding.check_batch_size(run.data.eval_batch_size, mesh, field="config.eval_batch_size")
    if run.mode != "export":
      reads_data = run.mode != "plan"  # plan from shapes alone: the data may not be there
      for split, field, spec, spec_field in (
          (run.data.train_split, "config.train_split", run.data.preprocess_train,
           "config.preprocess_train"),
          (run.data.eval_split, "config.eval_split", run.data.preprocess_eval,
           "config.preprocess_eval")):
        source = {}  # without data: the string alone, and the size it sets if it sets one
        if reads_data:
          data.check_dataset(split=split, split_field=field,
                             skip_bad_images=run.data.skip_bad_images, **run.data.source)
          source = dict(split=split, **run.data.source)
        size = data.check_preprocess(spec, spec_field, **source)
        check_image_size(run, size, spec, spec_field, split)
      if reads_data and self.uses_labels(run):
        check_num_classes(run)
    self.check_settings(run)
    run.initial_params = self.initializer(run) if run.mode == "train" else None
    if run.mode == "sweep":  # each run's own checks, all before the first one trains
      for name, overrides in sweep_lib.parse(run.sweep, LOOP_FIELDS):
        self.check(sweep_lib.sub_run(self, run, name, overrides))
    if self.writes(run.mode):  # last: a run refused above leaves no workdir behind
      check_workdir(run.workdir)

  def writes(self, mode: str) -> bool:
    """Whether `mode` writes into the workdir (which must then be writable and is locked)."""
    return mode in self.writing_modes or mode == "sweep"

  def sweep(self, run: Run) -> int:
    """Trains every entry of `config.sweep` in `<workdir>/<name>` (see `common_jax.sweep`),
    then writes the table of their results to `<workdir>/sweep.md` and `sweep.json`."""
    rows = []
    for name, overrides in sweep_lib.parse(run.sweep, LOOP_FIELDS):
      sub = sweep_lib.sub_run(self, run, name, overrides)
      self.check(sub)
      print(f"sweep: run {name!r} ({', '.join(f'{k}={v}' for k, v in overrides.items())}) in "
            f"{sub.workdir}", flush=True)
      status = self.train(sub)
      if status != EXIT_DONE:
        return status
      with open(os.path.join(sub.workdir, "result.json"), encoding="utf-8") as f:
        rows.append({"name": name, "overrides": overrides, **json.load(f)})
    headline = self.make_task(run).headline_metric
    text = sweep_lib.table(rows, headline)
    if is_main_process():
      weights.write_text(os.path.join(run.workdir, "sweep.json"), json.dumps(rows, indent=2))
      weights.write_text(os.path.join(run.workdir, "sweep.md"), text)
    print(text + f"(also in {os.path.join(run.workdir, 'sweep.md')})", flush=True)
    return EXIT_DONE

  def train(self, run: Run) -> int:
    """Trains (resuming from the workdir's latest checkpoint) and writes result.json."""
    if has_checkpoints(run.workdir):  # resumed: the config it was started with still holds
      workdir_lib.check_resumed_config(
          run.workdir, run.config_json, workdir_lib.latest_saved_step(run.workdir),
          allow=run.allow_config_change,
          free=workdir_lib.RESUME_FREE_FIELDS + self.resume_free_fields)
    elif is_main_process():
      weights.write_text(os.path.join(run.workdir, "config.json"), run.config_json)
    self.before_training(run)
    task = self.make_task(run)
    result = train.train_and_evaluate(
        task, loop=run.loop, optimizer=run.optimizer, mesh_config=run.mesh, workdir=run.workdir,
        train_data=run.train_data, eval_data=run.eval_data, rules=run.rules,
        initial_params=run.initial_params, flops_per_example=self.flops_per_example(run),
        evaluators=self.evaluators(run))
    if result["stopped"]:
      return EXIT_STOPPED
    if result["eval"] and is_main_process():
      headline = task.headline_metric
      summary = {"step": result["step"], headline: result["eval"].get(headline),
                 "train_seconds": round(result["seconds"], 1)}
      path = weights.write_text(os.path.join(run.workdir, "result.json"),
                                json.dumps(dict(summary, eval=result["eval"]), indent=2))
      print(f"final {headline}: {result['eval'].get(headline, float('nan')):.4f} "
            f"(results in {path})")
    return EXIT_DONE

  def evaluate(self, run: Run) -> int:
    """Evaluates the parameters of the workdir's latest checkpoint on the eval split."""
    reader = checkpoint.Checkpointer(run.workdir, read_only=True)  # refuses a missing workdir
    step, _ = reader.params_metadata()
    params = reader.read_params(step)
    reader.close()
    # No optimiser: evaluation needs the parameters' shardings only.
    trainer = train.Trainer(task=self.make_task(run), mesh=sharding.make_mesh(run.mesh),
                            rules=run.rules, tx=optax.identity())
    params = jax.device_put(params, trainer.state_shardings.params)
    results = trainer.evaluate(params, run.eval_data())
    print(f"eval of step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return 0

  def export(self, run: Run) -> int:
    """Writes the latest checkpoint of the workdir in another format; the workdir is only read."""
    request = run.export
    if request is None or not request.output:
      raise ConfigError("--mode export needs --output=<file or directory>.")
    export_format = request.format or self.export_formats[0]
    if export_format not in self.export_formats:
      raise ConfigError(f"--format {export_format} is not an export format of {self.name} "
                        f"models; use one of {', '.join(self.export_formats)}.")
    output = os.path.abspath(request.output)
    workdir_lib.check_export_target(output, run.workdir)
    if os.path.exists(output) and not (os.path.isdir(output) and not os.listdir(output)):
      if not request.overwrite:
        raise ConfigError(f"--output {output} already exists; choose a new path or pass "
                          "--overwrite to replace it.")
      if not self.is_export(output, export_format):
        raise ConfigError(f"--output {output} is not an earlier {export_format} export of a "
                          f"{self.name} model, and --overwrite replaces only those; choose "
                          "another path.")
    try:
      path = self.export_checkpoint(run, output, export_format)
    except OSError as error:
      raise ConfigError(f"--output {request.output} cannot be written "
                        f"({error.strerror or error}); choose a path you can write to.") from None
    print(f"exported the latest checkpoint of {run.workdir} to {path}")
    return 0

  def plan(self, run: Run) -> int:
    """What the run will cost per device, from shapes alone (see `common_jax.plan`): nothing is
    allocated, read or written."""
    from common_jax import plan as plan_lib  # pylint: disable=g-import-not-at-top
    report, model = self.plan_report(run)
    mesh = sharding.make_mesh(run.mesh)
    print(f"plan OK: {type(model).__name__} with {report.parameters:,} parameters; mesh "
          f"{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices; "
          f"{run.loop.total_steps} steps of global batch {run.loop.batch_size}; workdir "
          f"{run.workdir}{self.plan_note(run)}")
    print(plan_lib.format_report(report))
    return EXIT_DONE

  def plan_report(self, run: Run):
    """(`common_jax.plan.PlanReport`, model) of the run's train step, compiled from shapes."""
    from common_jax import plan as plan_lib  # pylint: disable=g-import-not-at-top
    trainer = train.Trainer(task=self.plan_task(run), mesh=sharding.make_mesh(run.mesh),
                            rules=run.rules,
                            tx=optim.make_optimizer(run.optimizer, run.loop.total_steps),
                            accum_steps=run.loop.accum_steps)
    return plan_lib.plan_step(trainer, run.loop.batch_size, self.flops_per_example(run),
                              run.device_memory_gb), trainer.model

  def plan_task(self, run: Run) -> task_lib.Task:
    """The task `plan` compiles: `make_task`, or a stand-in of the same shapes where the task
    needs a file that may not exist yet."""
    return self.make_task(run)

  def evaluators(self, run: Run) -> List[Callable[[Any], Dict[str, float]]]:
    """More evaluations the loop runs with every evaluation (params -> {name: value})."""
    del run
    return []

  def flops_per_example(self, run: Run) -> Optional[float]:
    """Training FLOPs of one example by formula (`plan.transformer_flops_per_example`), or
    None where the family has none."""
    return None


def register(family: Family) -> None:
  """Makes `family`'s tasks findable by `find` (families outside `FAMILY_MODULES`)."""
  if family not in _REGISTERED:
    _REGISTERED.append(family)


def families() -> List[Family]:
  """Every family: those of `FAMILY_MODULES` (imported on first use) and the registered ones."""
  for name in FAMILY_MODULES:
    register(importlib.import_module(name).FAMILY)
  return list(_REGISTERED)


def find(task: str) -> Family:
  """The family that declares `task`, or one sentence naming every known task."""
  known = []
  for family in families():
    if task in family.tasks:
      return family
    known.extend(family.tasks)
  raise ConfigError(f"config.task={task!r} is unknown; use one of {sorted(known)}.")
