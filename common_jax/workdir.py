"""Keeping a workdir safe: one run at a time, the config it was started with, no export inside.

- `lock(workdir)`: `<workdir>/run.lock` (host, pid, start time) held by process 0 while a mode
  that writes runs; a second run is refused in one sentence; a lock left by a process that no
  longer exists on this host is stale and taken over.
- `check_resumed_config`: a resumed run whose config changes what it computes (optimiser, data,
  model, seed, batch, ...) is refused, naming the fields, unless allowed; `total_steps` may grow.
- `check_export_target`: an export never writes into a workdir or its checkpoints, and replaces
  only what is itself an export.
"""

import contextlib
import datetime
import json
import os
import socket
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple

import jax
import numpy as np

from common_jax import weights
from common_jax.errors import ConfigError

LOCK_NAME = "run.lock"
# Config fields that a resumed run may change: they do not change what it computes.
RESUME_FREE_FIELDS = (
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "on_nonfinite",
    "allow_config_change", "init_from", "data_dir", "manual_dir", "data_workers", "data_cache",
    "eval_split", "eval_batch_size", "preprocess_eval", "mesh", "sharding_rules",
    "model.attention_implementation", "model.remat_policy", "sweep")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _take(path: str) -> None:
  """Creates the lock file or raises FileExistsError; never overwrites another's lock."""
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid(),
               "started": datetime.datetime.now().isoformat(timespec="seconds")}, f)


def _acquire(workdir: str) -> str:
  path = os.path.join(workdir, LOCK_NAME)
  try:
    _take(path)
    return path
  except FileExistsError:
    pass
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.load(f)
  except (OSError, ValueError):
    holder = {}
  host, pid = holder.get("host", "?"), int(holder.get("pid", -1))
  if host == socket.gethostname() and pid > 0 and not _alive(pid):
    print(f"taking over the lock of {workdir}: its process {pid} on {host} is gone")
    os.remove(path)
    _take(path)  # a run starting at this very moment makes one of the two fail here
    return path
  raise ConfigError(f"--workdir {workdir} is in use by process {pid} on {host} since "
                    f"{holder.get('started', '?')}; wait for that run to end, use another "
                    f"--workdir, or delete {path} if that process is gone.")


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds `<workdir>/run.lock` (process 0; every process learns whether it was granted)."""
  path, error = None, None
  if jax.process_index() == 0:
    try:
      path = _acquire(workdir)
    except (ConfigError, OSError) as refused:
      error = refused
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    granted = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not granted and error is None:
      error = ConfigError(f"--workdir {workdir} is in use by another run (process 0 could not "
                          "lock it); wait for that run to end or use another --workdir.")
  if isinstance(error, OSError):
    raise ConfigError(f"--workdir {workdir} cannot be locked ({error.strerror}); choose a "
                      "directory you can write to.")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if path is not None and os.path.exists(path):
      os.remove(path)


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def changed_fields(old: Dict[str, Any], new: Dict[str, Any],
                   free: Sequence[str]) -> Tuple[Dict[str, Tuple[Any, Any]], bool]:
  """({field: (old, new)} of the changes that alter a resumed run, whether total_steps grew).

  A field only one of the two configs has is not a change: the run was started by a version of
  the project without it (or with it, since removed), which behaved as its default does.
  """
  old_flat, new_flat = _flat(old), _flat(new)
  changes = {}
  for key in sorted(set(old_flat) & set(new_flat)):
    before, after = old_flat.get(key), new_flat.get(key)
    if before == after or any(key == f or key.startswith(f + ".") for f in free):
      continue
    if key == "total_steps" and isinstance(before, int) and (after or 0) > before:
      continue
    changes[key] = (before, after)
  grew = (old_flat.get("total_steps") or 0) < (new_flat.get("total_steps") or 0)
  return changes, grew


def check_resumed_config(workdir: str, config_json: str, step: int, *, allow: bool,
                         free: Sequence[str] = RESUME_FREE_FIELDS,
                         say: Callable[[str], None] = print) -> None:
  """Compares a resumed run's config with `<workdir>/config.json` (see the module docstring);
  with `allow`, records the new config (the old one kept as config-<step>.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  new = json.loads(config_json)
  changes, grew = changed_fields(old, new, free)
  if grew:
    say(f"total_steps grows from {old.get('total_steps')} to {new.get('total_steps')}: the "
        "learning-rate schedule (warm-up and decay are functions of total_steps) is stretched "
        f"from step {step} on, so the run differs from one started with the new total.")
  if not changes and not grew:
    return
  if changes and not allow:
    listed = ", ".join(f"{key} ({before!r} -> {after!r})"
                       for key, (before, after) in list(changes.items())[:6])
    more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
    raise ConfigError(f"this config differs from the one {workdir} was started with "
                      f"(config.json) in {listed}{more}, which changes what the resumed run "
                      "computes; use a new --workdir, or pass --config.allow_config_change=true "
                      "to continue with the new values.")
  if jax.process_index() == 0:
    weights.write_text(os.path.join(workdir, f"config-{step}.json"), json.dumps(old, indent=2))
    weights.write_text(path, config_json)
  if changes:
    say(f"continuing at step {step} with changed {', '.join(changes)} "
        f"(config.allow_config_change); the config before is kept as config-{step}.json")


def looks_like_workdir(path: str) -> bool:
  """A training run's directory: checkpoints/ beside its config or metrics, or a run's lock."""
  if os.path.exists(os.path.join(path, LOCK_NAME)):
    return True
  return os.path.isdir(os.path.join(path, "checkpoints")) and any(
      os.path.exists(os.path.join(path, name)) for name in ("config.json", "metrics.jsonl"))


def latest_saved_step(workdir: str) -> int:
  """The highest step directory under `<workdir>/checkpoints` (0 when there is none)."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(
      directory) else []
  return max(steps, default=0)


def check_export_target(output: str, workdir: str) -> None:
  """An export is never written into a workdir (this run's or another's) or its checkpoints."""
  output, workdir = os.path.abspath(output), os.path.abspath(workdir)
  parent = output
  while True:
    if parent == workdir or looks_like_workdir(parent):
      raise ConfigError(f"--output {output} lies in the workdir {parent}; exports are written "
                        "outside workdirs (they never replace or mix with checkpoints): choose "
                        "a path outside it.")
    if os.path.dirname(parent) == parent:
      return
    parent = os.path.dirname(parent)
