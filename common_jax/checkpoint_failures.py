"""How a failed checkpoint read or write is told: which file of a step directory is missing,
truncated or unreadable (from what Orbax and TensorStore say), which failures are not damage at
all, and Orbax's noise around one error (a hundred lines) cut to that error.
"""

import logging
import os
import re
import sys

# Files every step directory of ours has; a missing one is named rather than the symptom.
REQUIRED_FILES = ("default/_METADATA", "default/manifest.ocdbt")


def raise_unless_damage(error: BaseException) -> None:
  """Re-raises a failure to read that says nothing about the files (memory, permissions, an
  unavailable file system): reported as it is, never taken for damage, which moves a checkpoint
  aside."""
  text = _tensorstore_message(error)
  if (isinstance(error, (MemoryError, PermissionError)) or re.match(
      r"(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED): ", text)):
    raise error


def damage_detail(step_dir: str, error: BaseException) -> str:
  """Which file of a step directory is missing or unreadable, from what Orbax/TensorStore say."""
  for name in REQUIRED_FILES:
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


def write_detail(error: BaseException) -> str:
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


_NOISE_FILTERED = []


def filter_orbax_noise() -> None:
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
