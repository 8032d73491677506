"""The one layer every weight file and every small file the project writes goes through.

- `write_atomically` / `write_text` / `write_directory`: a file (or directory) is written under a
  temporary name beside its destination and renamed into place only when complete, so readers
  see the old content or the new, never a half-written one. Only process 0 writes.
"""

import os
import shutil
import tempfile
from typing import Any, Callable

import jax


def write_atomically(path: str, write: Callable[[str], Any]) -> str:
  """Runs `write(temporary_path)` for a temporary file next to `path`, then renames it over
  `path`; on any failure the temporary file is removed and `path` is left as it was.

  Only process 0 writes (every process may call); returns the absolute path.
  """
  path = os.path.abspath(os.fspath(path))
  if jax.process_index() != 0:
    return path
  directory = os.path.dirname(path)
  if not os.path.isdir(directory):
    raise ValueError(f"the directory of {path} does not exist; create it or choose another "
                     "output path.")
  fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
  os.close(fd)
  try:
    write(temporary)
    with open(temporary, "rb+") as f:
      os.fsync(f.fileno())  # on disk before the rename makes it visible
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; outputs are ordinary files
    os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the new one
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return path


def write_text(path: str, text: str) -> str:
  """`write_atomically` for a small UTF-8 text file (JSON reports, configs)."""

  def write(temporary: str) -> None:
    with open(temporary, "w", encoding="utf-8") as f:
      f.write(text)

  return write_atomically(path, write)


def write_directory(directory: str, write: Callable[[str], None], *, overwrite: bool) -> str:
  """Runs `write(temporary_directory)` next to `directory`, then renames the result into place.

  An existing non-empty `directory` is replaced only with overwrite=True, and only after the new
  one is complete. On any failure the temporary directory is removed and `directory` is left as
  it was. Only process 0 writes; returns the absolute path.
  """
  directory = os.path.abspath(os.fspath(directory))
  if jax.process_index() != 0:
    return directory
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{directory} is a file, not a directory; choose another output path.")
  replace = os.path.isdir(directory) and bool(os.listdir(directory))
  if replace and not overwrite:
    raise ValueError(f"{directory} already exists and is not empty; choose a new directory or "
                     "replace it (overwrite=True; run.py --overwrite).")
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  temporary = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
  previous = None
  try:
    write(temporary)
    for entry in os.listdir(temporary):
      with open(os.path.join(temporary, entry), "rb+") as f:
        os.fsync(f.fileno())  # on disk before the rename makes them visible
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)  # mkdtemp makes it private; exports are ordinary dirs
    if replace:
      # Two renames (POSIX has no atomic swap of non-empty directories): the old directory is
      # moved aside, the new one takes its name, and the old one is deleted only afterwards.
      previous = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".old")
      os.rmdir(previous)
      os.rename(directory, previous)
      try:
        os.rename(temporary, directory)
      except BaseException:
        os.rename(previous, directory)
        previous = None
        raise
    else:
      os.replace(temporary, directory)  # replaces an empty directory atomically on POSIX
  except BaseException:
    shutil.rmtree(temporary, ignore_errors=True)
    raise
  if previous is not None:
    shutil.rmtree(previous, ignore_errors=True)
  return directory
