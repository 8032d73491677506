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
import os
import shutil
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from common_jax import checkpoint_failures as failures

DAMAGED_DIRECTORY = "damaged_checkpoints"


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
    failures.filter_orbax_noise()
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
        f"({failures.write_detail(error)}); the run stops and {left}: free disk space or fix "
        "the directory, then run the same command again.")

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
      failures.raise_unless_damage(error)
      raise self._damaged(step, error) from None
    self._check_fits(step, saved, _leaf_shapes(target))
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as error:  # pylint: disable=broad-except
      failures.raise_unless_damage(error)
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
        failures.raise_unless_damage(error)
        raise self._damaged(step, error, reading=True) from None
    return restored["params"]

  def _read_params_metadata(self, manager: ocp.CheckpointManager, step: int) -> Any:
    try:
      return manager.item_metadata(step)["params"]
    except Exception as error:  # pylint: disable=broad-except
      failures.raise_unless_damage(error)
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
               f"{failures.damage_detail(step_dir, error)}")
    if reading:  # eval, export, ...: say what else there is; a training run falls back itself
      others = [s for s in self.all_steps() if s != step]
      message += (f"; the other checkpoints there are at steps {others}: train in that workdir "
                  f"again (it falls back to the newest intact one) or move {step_dir} away")
    return DamagedCheckpoint(message)


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


