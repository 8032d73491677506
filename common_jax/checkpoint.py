"""Orbax checkpoints of the train state: periodic, asynchronous, last K kept, restored onto
whatever mesh the new run has (the abstract target carries the new shardings).

Nothing trained is lost here:
- a save that fails (disk full, directory gone) raises `SaveFailed` as soon as it is noticed
  (`poll` is cheap enough for every step); the checkpoints before it stay;
- a checkpoint that cannot be read is named in one sentence (`DamagedCheckpoint`: the step and
  the file); a resuming run moves it aside to `<workdir>/damaged_checkpoints/` (never deletes it)
  and falls back to the newest intact one, so rotation can never delete an intact checkpoint to
  keep damaged ones;
- a checkpoint that does not fit the model (another shape) is refused before anything is read
  or moved: that is a config mistake, not damage.
"""

import gc
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

DAMAGED_DIRECTORY = "damaged_checkpoints"
# Files every step directory of ours has; a missing one is named rather than the symptom.
_REQUIRED_FILES = ("default/_METADATA", "default/manifest.ocdbt")


class DamagedCheckpoint(ValueError):
  """A checkpoint that cannot be read: a file of it is missing, truncated or corrupt."""


class SaveFailed(RuntimeError):
  """Writing a checkpoint failed (disk full, file size limit, directory not writable)."""


class Checkpointer:
  """Saves and restores the train state under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False, say: Callable[[str], None] = print):
    """read_only: for reading another run's checkpoints; creates and deletes nothing.
    say: where the fallback past a damaged checkpoint is reported (one line)."""
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    if read_only and not os.path.isdir(self.directory):
      raise ValueError(f"{workdir} holds no checkpoints directory; train first or point "
                       "config.init_from / --workdir at the workdir of a training run.")
    self._say = say
    _filter_orbax_noise()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=asynchronous,
        # Leftovers of saves that a kill interrupted; committed steps are never touched.
        cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())
    # Orbax asks JAX's preemption sync point from its save-finalize thread too, with the step
    # being saved; that would set JAX's step counter back behind the loop's and could make the
    # processes disagree on the step to stop at. The loop alone asks (common_jax.train).
    self._manager.reached_preemption = lambda step: False
    self._saving: Optional[int] = None  # the step whose asynchronous save may still run
    self._closed = False

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    return list(self._manager.all_steps())

  # -- Saving ---------------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts saving `state` at `step` (returns at once when asynchronous); raises SaveFailed
    if this save or the one before it failed."""
    self.wait()  # a failure of the previous save is reported as that save's, not this one's
    try:
      saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as error:  # pylint: disable=broad-except  # OSError, ValueError, ...
      raise self._save_failed(step, error) from None
    if saved:
      self._saving = step
    return saved

  def poll(self) -> None:
    """Raises SaveFailed once the save in flight has failed; returns at once otherwise (a lock
    and a flag: cheap enough to call after every step)."""
    if self._saving is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def save_finished(self) -> bool:
    """Whether no save is running any more (its outcome not yet checked: `wait` does that)."""
    return self._saving is None or not self._manager.is_saving_in_progress()

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises SaveFailed if it failed."""
    step, self._saving = self._saving, None
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_failed(step, error) from None

  def close(self) -> None:
    """Waits for the save in flight (raising SaveFailed if it failed), then releases Orbax;
    calling it again does nothing."""
    if self._closed:
      return
    try:
      self.wait()
    finally:
      self._closed = True
      self._manager.close()

  def _save_failed(self, step: Optional[int], error: BaseException) -> SaveFailed:
    gc.collect()  # finalises the failed save's coroutines now, not noisily at interpreter exit
    self._manager.reload()  # the failed step is not a checkpoint
    kept = [s for s in self.all_steps() if s != step]
    left = (f"the checkpoint at step {max(kept)} is kept" if kept
            else "no earlier checkpoint exists")
    return SaveFailed(
        f"saving the checkpoint at step {step} to {self.directory} failed "
        f"({_write_detail(error)}); the run stops and {left}: free disk space or fix the "
        "directory, then run the same command again.")

  # -- Restoring the train state ----------------------------------------------------------------

  def restore(self, state_like: Any, step: Optional[int] = None) -> Any:
    """The train state saved at `step` (default: latest), on the shapes, dtypes and shardings of
    `state_like` (arrays or abstract). Raises ValueError if it was written for another model,
    DamagedCheckpoint if a file of it cannot be read."""
    step = self.latest_step() if step is None else step
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_like)
    try:
      saved = _leaf_shapes(self._manager.item_metadata(step))
    except Exception as error:  # pylint: disable=broad-except  # many kinds: TypeError, ...
      _raise_unless_damage(error)
      raise self._damaged(step, error) from None
    self._check_fits(step, saved, _leaf_shapes(target))
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as error:  # pylint: disable=broad-except
      _raise_unless_damage(error)
      raise self._damaged(step, error) from None

  def restore_newest_intact(self, state_like: Any) -> Tuple[Any, Optional[int]]:
    """(state, step) of the newest checkpoint that restores, or (state_like, None) when there
    is none. The damaged checkpoints newer than it are reported (`say`) and moved to
    `<workdir>/damaged_checkpoints/`, out of the rotation. When checkpoints exist but none
    restores, nothing is moved and the newest one's DamagedCheckpoint is raised: a run never
    starts over by itself. Every process takes the same decisions."""
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, damage = self.restore(state_like, step), None
      except DamagedCheckpoint as error:
        state, damage = None, error
      if all_processes(damage is None):
        for bad_step, reason in damaged:
          moved = self._move_aside(bad_step)
          self._say(f"{reason}; moved it to {moved} and resuming from step {step}, the newest "
                    "intact one.")
        return state, step
      damaged.append((step, damage or f"the checkpoint at step {step} in {self.directory} "
                                      "cannot be read by another process"))
    if damaged:
      raise DamagedCheckpoint(
          f"{damaged[0][1]}; no checkpoint there restores (tried steps "
          f"{[step for step, _ in damaged]}), so nothing was moved aside: use a new --workdir "
          "to start over, or repair or remove the damaged files.")
    return state_like, None

  def _check_fits(self, step: int, saved: Dict[str, Tuple[Tuple[int, ...], str]],
                  wanted: Dict[str, Tuple[Tuple[int, ...], str]]) -> None:
    if saved == wanted:
      return
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    changed = sorted(k for k in set(saved) & set(wanted) if saved[k][0] != wanted[k][0])
    if missing or extra:
      detail = f"arrays {(missing or extra)[:3]} are {'missing' if missing else 'unexpected'}"
    elif changed:
      key = changed[0]
      detail = f"{key} has shape {saved[key][0]} there but {wanted[key][0]} here"
    else:
      return  # only dtypes differ: restoring casts
    raise ValueError(
        f"the checkpoint at step {step} in {self.directory} does not fit this model ({detail}); "
        "use a new --workdir or the config the checkpoint was written with.")

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step directory out of the rotation (never deletes it); the new path."""
    source = os.path.join(self.directory, str(step))
    target_dir = os.path.join(self.workdir, DAMAGED_DIRECTORY)
    target, n = os.path.join(target_dir, str(step)), 1
    while os.path.exists(target):
      target, n = os.path.join(target_dir, f"{step}.{n}"), n + 1
    _sync_processes(f"checkpoint_damaged_{step}")  # all have chosen `target` before it exists
    if jax.process_index() == 0:
      os.makedirs(target_dir, exist_ok=True)
      shutil.move(source, target)
    _sync_processes(f"checkpoint_moved_aside_{step}")
    self._manager.reload()
    return target

  # -- Reading parameters only (eval, export, sample, probe, init_from) ------------------------

  def params_metadata(self, step: Optional[int] = None) -> Tuple[int, Any]:
    """(step, tree of jax.ShapeDtypeStruct) of the saved parameters; no array is read."""
    with self._params_reader() as manager:
      step = self._existing_step(manager, step)
      tree = self._read_params_metadata(manager, step)
    return step, jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype), tree)

  def read_params(self, step: Optional[int] = None) -> Any:
    """The parameters saved at `step` (default: latest) as host numpy arrays, on any topology.

    Only the `params` subtree is restored (the optimiser state is never read into memory), so a
    checkpoint written on any mesh with any optimiser can be read for evaluation, sampling,
    probing, exporting or initialising another run. Nothing under the workdir is written. A
    damaged checkpoint raises DamagedCheckpoint (no fall back: a read is of the step it names).
    """
    with self._params_reader() as manager:
      step = self._existing_step(manager, step)
      tree = self._read_params_metadata(manager, step)
      restore_args = jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      abstract = jax.tree_util.tree_map(
          lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype), tree)
      try:
        restored = manager.restore(step, args=ocp.args.PyTreeRestore(
            item={"params": abstract}, restore_args={"params": restore_args},
            partial_restore=True))
      except Exception as error:  # pylint: disable=broad-except
        _raise_unless_damage(error)
        raise self._damaged(step, error, reading=True) from None
    return restored["params"]

  def _read_params_metadata(self, manager: ocp.CheckpointManager, step: int) -> Any:
    try:
      return manager.item_metadata(step)["params"]
    except Exception as error:  # pylint: disable=broad-except
      _raise_unless_damage(error)
      raise self._damaged(step, error, reading=True) from None

  def _params_reader(self) -> ocp.CheckpointManager:
    # A read-only manager of its own: the PyTree handler restores a subtree (partial_restore),
    # which the train state's handler does not.
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            create=False, read_only=True, save_interval_steps=0),
        item_handlers=ocp.PyTreeCheckpointHandler())

  def _existing_step(self, manager: ocp.CheckpointManager, step: Optional[int]) -> int:
    steps = list(manager.all_steps())
    if step is None:
      step = manager.latest_step()
    if step is None or step not in steps:
      at = "" if step is None else f" at step {step}"
      raise ValueError(f"{self.directory} holds no checkpoint{at}; train first or point "
                       f"config.init_from / --workdir at a run that saved one (steps: {steps}).")
    return step

  def _damaged(self, step: int, error: BaseException, reading: bool = False
               ) -> DamagedCheckpoint:
    step_dir = os.path.join(self.directory, str(step))
    message = (f"the checkpoint at step {step} in {self.directory} is damaged: "
               f"{_damage_detail(step_dir, error)}")
    if reading:  # eval, export, ...: say what else there is; a training run falls back itself
      others = [s for s in self.all_steps() if s != step]
      message += (f"; the other checkpoints there are at steps {others}: train in that workdir "
                  f"again (it falls back to the newest intact one) or move {step_dir} away")
    return DamagedCheckpoint(message)


def _raise_unless_damage(error: BaseException) -> None:
  """Re-raises a failure to read that says nothing about the files (memory, permissions, an
  unavailable file system): reported as it is, never taken for damage, which moves a checkpoint
  aside."""
  text = _tensorstore_message(error)
  if (isinstance(error, (MemoryError, PermissionError)) or re.match(
      r"(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED): ", text)):
    raise error


def _damage_detail(step_dir: str, error: BaseException) -> str:
  """Which file of a step directory is missing or unreadable, from what Orbax/TensorStore say."""
  for name in _REQUIRED_FILES:
    if not os.path.exists(os.path.join(step_dir, name)):
      return f"{os.path.join(step_dir, name)} is missing"
  text = _tensorstore_message(error)
  status = re.match(r"([A-Z_]+): ", text)
  reason = (text.rsplit(": ", 1)[-1].splitlines() or [""])[0][:160]
  reason = f"{status.group(1)}: {reason}" if status else _error_detail(error)
  for path in re.findall(r'local file "([^"]+)"', text):
    if not path.endswith("/"):  # a file, not the directory of the database
      return (f"{path} cannot be read ({reason})" if os.path.exists(path)
              else f"{path} is missing")
  truncated = re.search(r"not valid for value of size (\d+)", text)
  if truncated:  # TensorStore names the array; the data file is the one of that size
    for root, _, files in os.walk(step_dir):
      for name in files:
        if os.path.getsize(os.path.join(root, name)) == int(truncated.group(1)):
          return f"{os.path.join(root, name)} is truncated ({reason})"
  array = re.search(r'(?:reading|Metadata at) "([^"/]+)[^"]*" in OCDBT database at local file '
                    r'"([^"]+)"', text)
  if array:
    return (f"the array {array.group(1)} cannot be read from {array.group(2).rstrip('/')} "
            f"({reason})")
  return f"{step_dir} cannot be read ({reason})"


def _tensorstore_message(error: BaseException) -> str:
  """The message of the TensorStore error ("OUT_OF_RANGE: Error reading ...") behind `error`
  (Orbax wraps it in errors of its own), else `error`'s; without the long spec."""
  messages, seen = [], error
  while seen is not None and len(messages) < 10:
    messages.append(re.sub(r"\s*\[tensorstore_spec=.*", "", str(seen), flags=re.S).strip())
    seen = seen.__cause__ or seen.__context__
  return next((m for m in messages if re.match(r"[A-Z_]+: ", m)), messages[0])


def _write_detail(error: BaseException) -> str:
  """"File too large writing /w/checkpoints/30.orbax-checkpoint-tmp/.../d/1f2e" from what
  TensorStore says, else the first line of the error."""
  text = re.sub(r"\s*\[(tensorstore_spec|os_error_code)=.*?\]", "", str(error), flags=re.S)
  path = re.search(r'Failed writing: "([^"]+)"', text)
  if path:
    return f"{text.rsplit(': ', 1)[-1].strip()} writing {path.group(1)}"
  return _error_detail(error)


def _error_detail(error: BaseException) -> str:
  text = re.sub(r"\s*\[tensorstore_spec=.*", "", str(error), flags=re.S).strip()
  text = (text.splitlines() or [""])[0][:200]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _leaf_shapes(tree: Any) -> Dict[str, Tuple[Tuple[int, ...], str]]:
  """{"params/embedding/kernel": (shape, dtype)} of a state, abstract state or Orbax metadata
  tree (which stores dataclasses and named tuples as dicts and lists)."""

  def name(key) -> str:
    for attribute in ("key", "idx", "name"):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)

  return {"/".join(name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (one small all-gather when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


_NOISE_FILTERED = []


def _filter_orbax_noise() -> None:
  """After a failed read or write, TensorStore operations still in flight complete into the
  asyncio loop that Orbax already closed, asyncio logs the futures nobody awaited, Orbax logs the
  error with its traceback, and the coroutines left behind fail again when the interpreter exits:
  a hundred lines about one error that we report in one sentence. That noise (only) is dropped or
  cut to its first line, also when it arrives later; so is Orbax's warning that a read-only
  directory is read-only. Installed once, by the first Checkpointer."""
  if _NOISE_FILTERED:
    return
  _NOISE_FILTERED.append(True)
  previous = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if isinstance(unraisable.exc_value, RuntimeError) and (
        str(unraisable.exc_value) == "Event loop is closed"):
      return
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return  # a coroutine of a failed save, finalised as the interpreter exits
    previous(unraisable)

  def orbax_without_traceback(record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return not record.getMessage().startswith("Given directory is read only")  # as asked

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage().split("\n")[0])
  logging.getLogger("absl").addFilter(orbax_without_traceback)
