"""The one layer every weight file and every small file the project writes goes through.

- `write_atomically` / `write_text` / `write_directory`: a file (or directory) is written under a
  temporary name beside its destination and renamed into place only when complete, so readers
  see the old content or the new, never a half-written one. Only process 0 writes.
- `Tensors`: stored tensors under flat names, their shapes known up front (a file's header, a
  checkpoint's metadata) and each array read on demand. `read_npz` (never unpickles),
  `read_safetensors`, `read_torch` (weights only), `read_tf_checkpoint` and `read_workdir` (the
  parameters of a training run's checkpoint, never its optimiser state) open one.

`in_layout` presents stored tensors in the block layout of the model they are for (per-block
`{prefix}_{i}/...` or scanned `{prefix}/...`, see `trees.stack_layers`), so the file's layout and
the model's need not agree. What is read is then checked with `trees.check_names_and_shapes`, the
one names-and-shapes check, which so sees the model's layout.
Each external format is a small file of name mappings in its family (vit_jax/npz.py,
vit_jax/timm.py, igpt_jax/hf.py, igpt_jax/openai.py) on top of these two modules.
"""

import os
import re
import shutil
import tempfile
import zipfile
import zlib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from common_jax import trees

Shape = Tuple[int, ...]


# ------------------------------------------------------------------------------------------------
# Atomic writes


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


# ------------------------------------------------------------------------------------------------
# Stored tensors: shapes up front, arrays on demand


class Tensors:
  """Stored tensors under flat names: `shapes` known up front, `read(name)` -> numpy array.

  A context manager: leaving it closes the file or checkpoint behind it.
  """

  def __init__(self, origin: str, shapes: Dict[str, Shape], read: Callable[[str], np.ndarray],
               close: Callable[[], None] = lambda: None, step: Optional[int] = None):
    self.origin = origin  # how error sentences name where the tensors are
    self.shapes = shapes
    self.read = read
    self.close = close
    self.step = step  # the checkpoint step, for a workdir

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, Any], origin: str) -> "Tensors":
    """Arrays already in memory, e.g. {OpenAI variable name: array}."""
    return cls(origin, {k: tuple(np.shape(v)) for k, v in arrays.items()},
               lambda key: np.asarray(arrays[key]))

  def __enter__(self) -> "Tensors":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def in_layout(tensors: Tensors, prefix: str, scanned: bool) -> Tensors:
  """`tensors` under the names and shapes a model with `scan_layers=scanned` has: blocks stored
  per block (`{prefix}_{i}/...`) are stacked for a scanned model, a stored stack
  (`{prefix}/...` [depth, ...]) is split into blocks for a per-block one, and tensors already in
  the model's layout come back as they are (the same object).

  Shapes are converted now (raising one sentence when the blocks cannot be stacked); arrays are
  read, stacked or sliced on demand, bit for bit.
  """
  names = list(tensors.shapes)
  if scanned:
    sources = trees.stack_layers({name: name for name in names}, prefix, stack=tuple,
                                 origin=tensors.origin)
    if set(sources) == set(names):  # no per-block names: nothing to stack
      return tensors
    shapes = trees.stack_shapes(tensors.shapes, prefix, origin=tensors.origin)

    def read(key: str) -> np.ndarray:
      source = sources[key]
      if isinstance(source, tuple):
        return np.stack([np.asarray(tensors.read(name)) for name in source])
      return tensors.read(source)
  else:
    stacks = {name for name in names if name.startswith(prefix + "/")}
    if not stacks:
      return tensors
    shapes = trees.unstack_shapes(tensors.shapes, prefix)
    sources = trees.unstack_layers(
        {name: name for name in names}, prefix,
        unstack=lambda name: [(name, i) for i in range(tensors.shapes[name][0])])
    cache = {}

    def read(key: str) -> np.ndarray:
      source = sources[key]
      if isinstance(source, tuple):
        name, i = source
        if name not in cache:  # the stack is read once, not once per block
          cache[name] = np.asarray(tensors.read(name))
        return cache[name][i]
      return tensors.read(source)

  return Tensors(tensors.origin, shapes, read, tensors.close, tensors.step)


def error_detail(error: BaseException) -> str:
  """"TypeName: first sentence of the message", to quote inside one sentence of ours."""
  text = (str(error).splitlines() or [""])[0]
  text = re.split(r"\.\s", text, maxsplit=1)[0].rstrip(".")[:200]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _corrupt(path: str, error: BaseException, key: Optional[str] = None) -> ValueError:
  where = f"the array `{key}` in {path}" if key else path
  return ValueError(f"{where} cannot be read as an .npz archive of arrays (truncated or corrupt: "
                    f"{error_detail(error)}); export or download the file again.")


def _pickle_error(path: str, key: str) -> ValueError:
  return ValueError(f"the array `{key}` in {path} holds pickled Python objects, which are not "
                    "loaded (allow_pickle=False) because unpickling can run arbitrary code; "
                    "save it again with plain numeric arrays (e.g. with export_npz).")


def _npy_header(archive: zipfile.ZipFile, member: str) -> Tuple[Shape, np.dtype]:
  """Shape and dtype of one .npy member from its header, without reading the data."""
  with archive.open(member) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise ValueError(f"unsupported .npy format version {version}")
  return tuple(int(d) for d in shape), dtype


def read_npz(path: str) -> Tensors:
  """An .npz archive, never unpickled: member headers read now, arrays (CRC-checked) on demand.

  Raises ValueError (one sentence) for a missing, truncated or corrupt file and for pickled data.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"no file at {path}; check the path of the .npz checkpoint.")
  try:
    archive = np.load(path, allow_pickle=False)
  except ValueError as error:
    if "pickle" not in str(error):
      raise _corrupt(path, error) from None
    # Neither a zip nor an .npy: np.load falls through to unpickling, which it refuses.
    raise ValueError(f"{path} is not an .npz archive (numpy would have to unpickle it, and "
                     "pickled data is never loaded because unpickling can run arbitrary code); "
                     "check the path or export the weights with export_npz.") from None
  except (OSError, EOFError, zipfile.BadZipFile) as error:
    raise _corrupt(path, error) from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single .npy array, not an .npz archive of named "
                     "parameters; export it with export_npz.")
  shapes, pickled, key = {}, None, None
  members = set(archive.zip.namelist())
  try:
    for key in archive.files:
      shapes[key], dtype = _npy_header(
          archive.zip, key + ".npy" if key + ".npy" in members else key)
      if dtype.hasobject:
        pickled = key
        break
  except (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile) as error:
    archive.close()
    raise _corrupt(path, error, key) from None
  if pickled is not None:
    archive.close()
    raise _pickle_error(path, pickled)

  def read(key: str) -> np.ndarray:
    try:
      return archive[key]
    except ValueError as error:
      if "allow_pickle" in str(error):
        raise _pickle_error(path, key) from None
      raise _corrupt(path, error, key) from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as error:
      raise _corrupt(path, error, key) from None

  return Tensors(path, shapes, read, archive.close)


def read_safetensors(paths: Sequence[str], origin: Optional[str] = None) -> Tensors:
  """One or more .safetensors files (a sharded checkpoint has several) as one set of tensors:
  headers read now, each tensor on demand. `origin` names them in errors (default: the first)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  paths = [os.fspath(path) for path in paths]
  shapes, where = {}, {}
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"no file at {path}; check the path of the .safetensors file.")
    try:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          shapes[key], where[key] = tuple(f.get_slice(key).get_shape()), path
    except Exception as error:  # pylint: disable=broad-except  # SafetensorError is not exported
      raise ValueError(f"{path} cannot be read as .safetensors (truncated or corrupt: "
                       f"{error_detail(error)}); export or download the file again.") from None

  def read(key: str) -> np.ndarray:
    try:
      with safe_open(where[key], framework="numpy") as f:
        return np.asarray(f.get_tensor(key))
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f"`{key}` in {where[key]} cannot be read (truncated or corrupt: "
                       f"{error_detail(error)}); export or download the file again.") from None

  return Tensors(origin or paths[0], shapes, read)


def read_torch(path: str) -> Tensors:
  """A PyTorch state dict file (e.g. pytorch_model.bin): needs torch, read with
  weights_only=True, so no code in the file runs. bfloat16 tensors widen to float32 (exact)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{path} is a PyTorch file and torch is not installed; pip install torch, "
                     "or save the weights as .safetensors (save_pretrained does by default)."
                     ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"{path} cannot be read by torch.load(weights_only=True) "
                     f"({error_detail(error)}); save the weights again, preferably as "
                     ".safetensors.") from None
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; save the model "
                     "with save_pretrained.")
  arrays = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
  return Tensors.from_arrays(arrays, path)


def read_tf_checkpoint(prefix: str) -> Tensors:
  """A TensorFlow checkpoint (the prefix of its .index and .data files), through
  `tf.train.load_checkpoint`; needs TensorFlow."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"{prefix} is a TensorFlow checkpoint and TensorFlow is not installed; "
                      "pip install tensorflow (the CPU build is enough).") from None
  prefix = os.fspath(prefix)
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
  except Exception as error:  # pylint: disable=broad-except  # TF raises several error types
    raise ValueError(f"{prefix} cannot be read as a TensorFlow checkpoint "
                     f"({error_detail(error)}); pass the prefix of its .index and .data files."
                     ) from None
  return Tensors(prefix, shapes, reader.get_tensor)


def read_workdir(workdir: str, step: Optional[int] = None) -> Tensors:
  """The parameters of a training run's checkpoint (latest, or `step`): the one way to read a
  workdir. Shapes come from the checkpoint's metadata; the first `read` restores the `params`
  subtree alone to host memory (never the optimiser state), on any topology. Nothing under the
  workdir is written."""
  from common_jax import checkpoint  # pylint: disable=g-import-not-at-top  # orbax: only here
  checkpointer = checkpoint.Checkpointer(os.fspath(workdir), read_only=True)
  try:
    step, metadata = checkpointer.params_metadata(step)
  except BaseException:
    checkpointer.close()
    raise
  params = {}

  def read(key: str) -> np.ndarray:
    if not params:
      params.update(trees.flatten(checkpointer.read_params(step)))
    return params[key]

  return Tensors(f"the checkpoint at step {step} in {checkpointer.directory}",
                 trees.flat_shapes(metadata), read, checkpointer.close, step)
