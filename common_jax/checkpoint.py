"""Orbax checkpoints of the train state: periodic, asynchronous, last K kept, restored onto
whatever mesh the new run has (the abstract target carries the new shardings)."""

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores the train state under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False):
    """read_only: for reading another run's checkpoints; creates and deletes nothing."""
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if read_only and not os.path.isdir(self.directory):
      raise ValueError(f"{workdir} holds no checkpoints (no {self.directory}); point "
                       "config.init_from or --workdir at the workdir of a training run.")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts saving `state` at `step` (returns at once when asynchronous)."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, state_like: Any, step: Optional[int] = None) -> Any:
    """Restores onto the shapes, dtypes and shardings of `state_like` (arrays or abstract)."""
    step = self.latest_step() if step is None else step
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError) as error:
      raise ValueError(
          f"the checkpoint at step {step} in {self.directory} does not fit this model "
          f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); use a new --workdir "
          "or the config the checkpoint was written with.") from error

  def read_numpy(self, step: Optional[int] = None) -> Any:
    """The whole saved tree at `step` (default: latest) as host numpy arrays, on any topology.

    For reading parameters into another task or exporting them; resuming uses `restore`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{self.directory} holds no checkpoint; train first or point "
                       "config.init_from at a workdir that has one.")
    path = os.path.join(self.directory, str(step), "default")
    with ocp.PyTreeCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(path)
      tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
      restore_args = jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
