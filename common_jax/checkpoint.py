"""Orbax checkpoints of the train state: periodic, asynchronous, last K kept, restored onto
whatever mesh the new run has (the abstract target carries the new shardings)."""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores the train state under `<workdir>/checkpoints/<step>`."""

  def __init__(self, workdir: str, *, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous)
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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
