r"""The one entry point: reads a recipe, finds the family of its task, checks, runs a mode.

  python run.py                                   # the default job: ViT on the bundled digits
  python run.py --config configs/vit_finetune.py:B/16,cifar10 --workdir /tmp/ft \
      --config.batch_size=256
  python run.py --config configs/vit_digits.py --mode plan    # check a config, no compute

Every family has the modes train (default), eval and plan; a family adds its own (the iGPT
family: palette, sample, probe; both: export). The config is read here, once, into a
`common_jax.family.Run` of plain values; the family does the rest.
"""

import signal
import sys

if __name__ == "__main__":
  # Ctrl-C while the libraries below import (seconds) ends quietly rather than in a traceback.
  signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
import os  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
import re  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
from typing import Optional, Tuple  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from common_jax import config as config_lib
from common_jax import family as family_lib
from common_jax import optim
from common_jax import sharding
from common_jax import train

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "vit_digits.py")

# No default here: config_flags would load it while this module imports, before its errors can
# become one sentence; `_parse_flags` adds --config=DEFAULT_CONFIG when none is given.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Recipe file (configs/*.py), optionally with ':args' (default: "
    "configs/vit_digits.py).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go (default: workdirs/<recipe>[_<argument>]).")
_MODE = flags.DEFINE_string(
    "mode", "train", "What to do with the config: train, eval, plan, or a mode of the task's "
    "family (palette, sample, probe, export).")
_FORMAT = flags.DEFINE_string(
    "format", None, "--mode export: npz (official ViT layout) or safetensors (timm names) for a "
    "ViT, hf (Hugging Face ImageGPT directory) for an iGPT, stablehlo (the inference function, "
    "jax.export) for either; default: the family's first.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode export: the file (or directory) to write.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "--mode export: replace an existing --output that is itself an earlier "
    "export of that format (written to a temporary name first, so a failed export never "
    "replaces a good one; never inside a workdir).")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first (multi-host; arguments auto-detected on TPU, "
    "SLURM and Kubernetes, or from --coordinator_address/--num_processes/--process_id).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

ConfigError = family_lib.ConfigError
# Top-level fields every recipe has (configs/common.py), besides `DataSettings`' and the family's.
LOOP_FIELDS = ("seed", "batch_size", "accum_steps", "total_steps", "log_every", "eval_every",
               "checkpoint_every", "keep_checkpoints", "on_nonfinite")
RUN_FIELDS = ("task", "num_classes", "image_size", "init_from", "model", "optimizer", "mesh",
              "sharding_rules", "allow_config_change", "device_memory_gb", "sweep") + LOOP_FIELDS


def prepare(config, workdir: str, mode: str = "train",
            export: Optional[family_lib.ExportRequest] = None
            ) -> Tuple[family_lib.Family, family_lib.Run]:
  """Reads the whole config into a `Run` and runs every check; no compute, nothing written
  (except creating a workdir the mode will write to)."""
  family, run = read(config, workdir, mode, export)
  family.check(run)
  return family, run


def read(config, workdir: str, mode: str = "train",
         export: Optional[family_lib.ExportRequest] = None
         ) -> Tuple[family_lib.Family, family_lib.Run]:
  """The config as a `Run` of plain values, its family found by `config.task`; every field
  known and present, nothing else checked yet."""
  family = family_lib.find(config.task)
  data_fields = {field.name for field in dataclasses.fields(family_lib.DataSettings)}
  own_fields = {field.name for field in dataclasses.fields(family.settings)}
  values = config.to_dict()
  config_lib.check_fields(values, set(RUN_FIELDS) | data_fields | own_fields, "config")
  model = dict(values["model"])
  if "variant" not in model:
    raise ConfigError("config.model lacks `variant`; set it (e.g. 'B/16', or 'custom' with the "
                      "shape given explicitly).")
  variant = model.pop("variant")
  run = family_lib.Run(
      task=config.task, mode=mode, workdir=workdir, variant=variant,
      num_classes=config.num_classes, image_size=config.image_size, init_from=config.init_from,
      model=family.model_options(model),
      data=config_lib.read_section(family_lib.DataSettings,
                                   {k: values[k] for k in data_fields}, "config"),
      loop=train.LoopConfig(**{k: values[k] for k in LOOP_FIELDS}),
      optimizer=config_lib.read_section(optim.OptimizerConfig, values["optimizer"],
                                        "config.optimizer"),
      mesh=config_lib.read_section(sharding.MeshConfig, values["mesh"], "config.mesh"),
      rules=tuple(tuple(rule) for rule in config.sharding_rules) or sharding.DEFAULT_RULES,
      settings=config_lib.read_section(family.settings, {k: values[k] for k in own_fields},
                                       "config"),
      allow_config_change=config.allow_config_change,
      device_memory_gb=float(config.device_memory_gb),
      config_json=config.to_json_best_effort(indent=2), export=export,
      sweep=tuple(config.sweep))
  return family, run


def _workdir(config_flag: str) -> str:
  """--workdir, else workdirs/<recipe>[_<argument>]: configs/vit_finetune.py:B/16,cifar10 ->
  workdirs/vit_finetune_B_16_cifar10."""
  if _WORKDIR.value:
    return os.path.abspath(_WORKDIR.value)
  config_path, _, config_arg = config_flag.partition(":")
  recipe = os.path.splitext(os.path.basename(config_path))[0]
  if config_arg:
    recipe += "_" + re.sub(r"\W+", "_", config_arg).strip("_")
  return os.path.join(ROOT, "workdirs", recipe)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --flag=value.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep the libraries' INFO lines off the console
  if _DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  export = family_lib.ExportRequest(output=_OUTPUT.value or "", format=_FORMAT.value or "",
                                    overwrite=_OVERWRITE.value)
  try:
    config = _CONFIG.value
    config.keys()  # config_flags reports a recipe it could not load on first use
  except Exception as error:  # pylint: disable=broad-except  # a missing or broken recipe
    print(f"error: {config_lib.flag_error(error, sys.argv, DEFAULT_CONFIG)}", file=sys.stderr)
    return family_lib.EXIT_BAD_INPUT
  return dispatch(config, _workdir(flags.FLAGS["config"].config_filename), _MODE.value, export)


def dispatch(config, workdir: str, mode: str = "train",
             export: Optional[family_lib.ExportRequest] = None) -> int:
  """Runs `mode` of the family of `config.task` and returns the exit status: 0 done, 2 bad input
  (one `error:` line), 3 training diverged, 75 stopped by a signal with a checkpoint saved."""
  try:  # ValueError: ConfigError and the checks of the packages below run.py
    family, run = prepare(config, workdir, mode, export)
    return family.run_mode(run)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return family_lib.EXIT_BAD_INPUT


def _parse_flags(argv):
  """absl's parsing (which also loads the recipe), with its errors as one `error:` line."""
  if not any(re.match(r"^--?config(=|$)", arg) for arg in argv[1:]):
    argv = [argv[0], f"--config={DEFAULT_CONFIG}"] + list(argv[1:])
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except  # any failure of a recipe or a flag
    print(f"error: {config_lib.flag_error(error, argv, DEFAULT_CONFIG)}", file=sys.stderr)
    sys.exit(family_lib.EXIT_BAD_INPUT)


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
