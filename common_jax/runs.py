"""One run, read from the config once into plain values (`Run`), and the checks on a run that
every family makes before any compute (`check_workdir`, `check_num_classes`).
"""

import dataclasses
import os
import tempfile
from typing import Any, Callable, Dict, Optional, Tuple

import jax

from common_jax import optim
from common_jax import sharding
from common_jax import train
from common_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where the images come from and how they are prepared (see `common_jax.data`); the
  defaults are in configs/common.py."""
  dataset: str  # a tfds name, or "image_folder:<root>"
  data_dir: str  # tfds data_dir; "" = tfds's default
  manual_dir: str  # for datasets that need a manual download
  train_split: str
  eval_split: str
  preprocess_train: str
  preprocess_eval: str
  data_workers: int  # 0 = decode in threads of this process
  data_cache: bool  # hold the train split in memory
  skip_bad_images: bool  # skip (and count) undecodable images instead of stopping
  eval_batch_size: int

  @property
  def source(self) -> Dict[str, Optional[str]]:
    return dict(dataset=self.dataset, data_dir=self.data_dir or None,
                manual_dir=self.manual_dir or None)


@dataclasses.dataclass(frozen=True)
class ExportRequest:
  """`--mode export`'s command-line options."""
  output: str
  format: str
  overwrite: bool = False


@dataclasses.dataclass
class Run:
  """One run, read from the config once: plain values only below `run.py`."""
  task: str
  mode: str
  workdir: str
  variant: str  # config.model.variant
  num_classes: int
  image_size: int
  init_from: str  # "" = train from scratch
  model: Dict[str, Any]  # config.model but the variant, as the model builder's keyword arguments
  data: DataSettings
  loop: train.LoopConfig
  optimizer: optim.OptimizerConfig
  mesh: sharding.MeshConfig
  rules: Tuple[Tuple[str, Any], ...]
  settings: Any  # the family's `settings` dataclass
  allow_config_change: bool = False  # a resumed run may change what alters its trajectory
  device_memory_gb: float = 0.0  # plan: the memory of one device; 0 = what the device reports
  config_json: str = "{}"  # recorded as <workdir>/config.json by a fresh training run
  export: Optional[ExportRequest] = None
  sweep: Tuple[str, ...] = ()  # --mode sweep: the runs to make (common_jax.sweep)
  initial_params: Optional[Callable[[Any], Any]] = None  # set by `Family.check`

  def train_data(self, start_step: int):
    """start_step -> this process's train batches from that step on (see common_jax.data)."""
    from common_jax import data  # pylint: disable=g-import-not-at-top  # tfds: not for models
    return data.train_iterator(
        split=self.data.train_split, preprocess=self.data.preprocess_train,
        global_batch_size=self.loop.batch_size, seed=self.loop.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        worker_count=self.data.data_workers, cache=self.data.data_cache,
        skip_bad_images=self.data.skip_bad_images, **self.data.source)

  def eval_data(self, split: Optional[str] = None, *, whole: bool = False):
    """One pass over `split` (default: the eval split), padded rows marked by "mask": this
    process's share of every batch, or with `whole` every example (for work one process does)."""
    from common_jax import data  # pylint: disable=g-import-not-at-top
    return data.eval_iterator(
        split=split or self.data.eval_split, preprocess=self.data.preprocess_eval,
        global_batch_size=self.data.eval_batch_size,
        process_index=0 if whole else jax.process_index(),
        process_count=1 if whole else jax.process_count(),
        skip_bad_images=self.data.skip_bad_images,
        **self.data.source)


@dataclasses.dataclass(frozen=True)
class NoSettings:
  """A family that reads no top-level config fields of its own."""


def is_main_process() -> bool:
  """Only process 0 writes the workdir's files (all processes share it, as Orbax requires)."""
  return jax.process_index() == 0


def has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_workdir(workdir: str) -> None:
  """Fails with one sentence when the workdir cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check"):
      pass
  except OSError as error:
    raise ConfigError(f"--workdir {workdir} is not writable ({error.strerror}); choose a "
                      "directory you can write to.") from None


def check_num_classes(run: Run) -> None:
  """config.num_classes must be the dataset's label count (labels index the logits)."""
  from common_jax import data  # pylint: disable=g-import-not-at-top
  labels = data.dataset_info(**run.data.source).num_classes
  if run.num_classes != labels:
    raise ConfigError(f"config.num_classes={run.num_classes} but {run.data.dataset} has {labels} "
                      f"classes; set config.num_classes={labels}.")


def check_image_size(run: Run, size: Optional[Tuple[int, int]], spec: str, field: str,
                     split: str) -> None:
  """The images a preprocessing string leaves (`size`, from `data.check_preprocess`) must be
  config.image_size square: the model's input (ViT's position embeddings, iGPT's sequence)."""
  if size is None or size == (run.image_size, run.image_size):
    return
  height, width = size
  side = run.image_size
  ops = f"resize({side})"  # a crop can only make images smaller
  if min(height, width) >= side:
    ops = f"resize({side}), central_crop({side}) or random_crop({side})"
  fix = f"set config.image_size={height}, or " if height == width else ""
  raise ConfigError(
      f"{field}={spec!r} leaves the images of split {split!r} of config.dataset="
      f"{run.data.dataset!r} at {height}x{width}, but config.image_size={side}; {fix}bring them "
      f"to {side}x{side} with {ops} in the string.")
