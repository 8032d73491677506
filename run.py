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
import sys
import tempfile
from typing import Any, Callable, Dict, Optional

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "vit_digits.py")
MODES = ("train", "eval", "plan")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Recipe file (configs/*.py), optionally with ':args'.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go (default: workdirs/<recipe name>).")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do with the config.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first (multi-host; arguments auto-detected on TPU, "
    "SLURM and Kubernetes, or from --coordinator_address/--num_processes/--process_id).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


class ConfigError(ValueError):
  """A setting that cannot work; raised before any compute."""


def _dtype(name: str):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ConfigError(f"config.model dtype {name!r} is unknown; use float32, bfloat16 or "
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


def build_task(config):
  """The task named by config.task, with the model options of config.model."""
  model = dict(config.model)
  for key in ("dtype", "param_dtype"):
    if key in model:
      model[key] = _dtype(model[key])
  # Config files cannot hold None for a field that the command line may set: "" and 0 stand in.
  if "attention_implementation" in model:
    model["attention_implementation"] = model["attention_implementation"] or None
  if "representation_size" in model:
    model["representation_size"] = model["representation_size"] or None
  if config.task == "vit_classification":
    from vit_jax import tasks  # pylint: disable=g-import-not-at-top
    variant = model.pop("variant")
    task = tasks.ClassificationTask(variant=variant, num_classes=config.num_classes,
                                    image_size=config.image_size, model_options=model)
    task.build_model()  # validates variant, patch size, classifier, posemb
    return task
  raise ConfigError(f"config.task={config.task!r} is unknown; use 'vit_classification'.")


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
  task: Any
  loop: Any
  optimizer: Any
  mesh: Any
  rules: Any
  train_data: Callable
  eval_data: Callable
  initial_params: Optional[Callable] = None


def make_plan(config, workdir: str) -> Plan:
  """Validates the whole config (model, data, mesh, batch, optimiser, workdir); no compute."""
  import jax  # pylint: disable=g-import-not-at-top
  from common_jax import data, optim, sharding, train  # pylint: disable=g-import-not-at-top

  task = build_task(config)
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
  check_workdir(workdir)

  def train_data(start_step: int):
    return data.train_iterator(
        split=config.train_split, preprocess=config.preprocess_train,
        global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=config.data_workers, **data_args)

  def eval_data():
    return data.eval_iterator(
        split=config.eval_split, preprocess=config.preprocess_eval,
        global_batch_size=config.eval_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), **data_args)

  return Plan(task=task, loop=loop, optimizer=optimizer, mesh=mesh_config, rules=rules,
              train_data=train_data, eval_data=eval_data)


def describe(plan: Plan, workdir: str) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  from common_jax import layers, sharding  # pylint: disable=g-import-not-at-top
  model = plan.task.build_model()
  dummy = plan.task.dummy_batch(1)
  shapes = jax.eval_shape(lambda b: plan.task.init_variables(model, jax.random.PRNGKey(0), b),
                          {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dummy.items()})
  mesh = sharding.make_mesh(plan.mesh)
  return (f"plan OK: {type(model).__name__} with {layers.count_params(shapes['params']):,} "
          f"parameters; mesh {dict(mesh.shape)} over {jax.device_count()} devices; "
          f"{plan.loop.total_steps} steps of global batch {plan.loop.batch_size}; "
          f"workdir {workdir}")


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
  config_path = flags.FLAGS["config"].config_filename
  recipe = os.path.splitext(os.path.basename(config_path))[0]
  workdir = os.path.abspath(_WORKDIR.value or os.path.join(ROOT, "workdirs", recipe))
  try:
    plan = make_plan(config, workdir)
  except ValueError as error:  # ConfigError and the checks of the packages below run.py
    print(f"error: {error}", file=sys.stderr)
    return 2
  if _MODE.value == "plan":
    print(describe(plan, workdir))
    return 0
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  from common_jax import train  # pylint: disable=g-import-not-at-top
  if _MODE.value == "eval":
    return _evaluate(plan, workdir)
  result = train.train_and_evaluate(
      plan.task, loop=plan.loop, optimizer=plan.optimizer, mesh_config=plan.mesh,
      workdir=workdir, train_data=plan.train_data, eval_data=plan.eval_data, rules=plan.rules,
      initial_params=plan.initial_params)
  if not result["stopped"] and result["eval"]:
    headline = plan.task.headline_metric
    summary = {"step": result["step"], headline: result["eval"].get(headline),
               "train_seconds": round(result["seconds"], 1)}
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
      json.dump(dict(summary, eval=result["eval"]), f, indent=2)
    print(f"final {headline}: {result['eval'].get(headline, float('nan')):.4f} "
          f"(results in {os.path.join(workdir, 'result.json')})")
  return 0


def _evaluate(plan: Plan, workdir: str) -> int:
  """Evaluates the latest checkpoint of `workdir` on config.eval_split."""
  import jax  # pylint: disable=g-import-not-at-top
  from common_jax import checkpoint, optim, sharding, train  # pylint: disable=g-import-not-at-top
  checkpointer = checkpoint.Checkpointer(workdir)
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
