"""Orbax checkpoints of the train state: periodic, asynchronous, last K kept, restored onto
whatever mesh the new run has (the abstract target carries the new shardings)."""

import os
from typing import Any, Optional, Sequence, Tuple

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
      raise ValueError(f"{workdir} holds no checkpoints directory; train first or point "
                       "config.init_from / --workdir at the workdir of a training run.")
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

  def all_steps(self) -> Sequence[int]:
    return list(self._manager.all_steps())

  def params_metadata(self, step: Optional[int] = None) -> Tuple[int, Any]:
    """(step, tree of jax.ShapeDtypeStruct) of the saved parameters; no array is read."""
    with self._params_reader() as manager:
      step = self._existing_step(manager, step)
      tree = manager.item_metadata(step)["params"]
    return step, jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype), tree)

  def read_params(self, step: Optional[int] = None) -> Any:
    """The parameters saved at `step` (default: latest) as host numpy arrays, on any topology.

    Only the `params` subtree is restored (the optimiser state is never read into memory), so a
    checkpoint written on any mesh with any optimiser can be read for evaluation, sampling,
    probing, exporting or initialising another run. Nothing under the workdir is written.
    """
    with self._params_reader() as manager:
      step = self._existing_step(manager, step)
      tree = manager.item_metadata(step)["params"]
      restore_args = jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      abstract = jax.tree_util.tree_map(
          lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype), tree)
      restored = manager.restore(step, args=ocp.args.PyTreeRestore(
          item={"params": abstract}, restore_args={"params": restore_args},
          partial_restore=True))
    return restored["params"]

  def _params_reader(self) -> ocp.CheckpointManager:
    # A read-only manager of its own: the PyTree handler restores a subtree (partial_restore),
    # which the train state's handler does not.
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True),
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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
