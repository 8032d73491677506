"""How a run stops early: a stop request (SIGTERM/SIGINT, taken at the same step on every
process) and a non-finite step (`TrainingDiverged`, with the one sentence that says what was kept).
"""

import os
import signal
import threading
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from common_jax import checkpoint as checkpoint_lib

# config.on_nonfinite: stop the run (exit 3) or skip the step and count it.
NONFINITE_ACTIONS = ("stop", "skip")


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm stopped being finite (config.on_nonfinite="stop"), or the
  updated parameters did (always); nothing non-finite was saved."""


# With several processes and no JAX preemption service, the stop flags are compared this often.
AGREE_EVERY = 10


class StopRequest:
  """Turns SIGTERM/SIGINT into a stop the loop takes between steps: at the same step on every
  process, so that all of them save the one checkpoint (a collective) and end together.

  One process: a flag set by the signal handlers. Several processes: JAX's preemption sync point
  (`multihost_utils.reached_preemption_sync_point`). `jax.distributed` installs its own SIGTERM
  notifier, which tells every process through the coordination service; they agree on the step
  after the furthest one. So SIGTERM is left to it, and SIGINT is passed on to it as a SIGTERM.
  Asking costs a lock and a comparison per step. Without the preemption service, the processes
  compare their flags every AGREE_EVERY steps (one small all-gather).
  """

  def __init__(self, start_step: int):
    self.signal_name: Optional[str] = None
    self._previous = {}
    self._several = jax.process_count() > 1
    self._synced = False
    if self._several:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:  # also tells JAX the step we start at, which it compares every later step with
        multihost_utils.reached_preemption_sync_point(start_step)
        self._synced = True
      except RuntimeError:  # jax_enable_preemption_service is off
        pass

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if not (self._synced and sig == signal.SIGTERM):
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.signal_name = signal.Signals(signum).name
    if self._synced:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells the other processes

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; call it once after every step, with consecutive steps."""
    if self._synced:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    if self._several:
      return step % AGREE_EVERY == 0 and not checkpoint_lib.all_processes(
          self.signal_name is None)
    return self.signal_name is not None

  def describe(self) -> str:
    if self._several:
      return (f"a stop request ({self.signal_name or 'SIGTERM or SIGINT'} to one of the "
              f"{jax.process_count()} processes)")
    return self.signal_name or "a stop request"


def all_finite(tree: Any) -> jax.Array:
  """bool scalar: every element of every floating-point leaf is finite."""
  checks = [jnp.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.bool_(True)


def diverged(step: int, kept: Optional[int],
              metrics: Optional[Dict[str, jax.Array]] = None) -> TrainingDiverged:
  """The sentence for a non-finite loss (`metrics` of that step) or, without metrics, for
  parameters found non-finite at `step` although every loss and gradient norm was finite."""
  left = (f"the checkpoint at step {kept} is kept and nothing after it was saved"
          if kept is not None else "nothing was saved")
  if metrics is None:
    what = ("the parameters are not finite although every loss and gradient norm was (an "
            "update of nan or inf)")
    fix = "check config.optimizer: a learning rate of nan or inf, or one that overflows"
  else:
    loss, grad_norm = (float(x) for x in jax.device_get((metrics["loss"], metrics["grad_norm"])))
    what = f"the loss is {loss:.4g} and the gradient norm {grad_norm:.4g}"
    fix = ("lower config.optimizer.learning_rate, or set config.on_nonfinite='skip' to skip such "
           "steps")
  return TrainingDiverged(f"training diverged at step {step}: {what}; {left} ({fix}).")
