"""ViT weights in the official `.npz` layout: the checkpoints the official code publishes.

    from vit_jax import create_model, npz
    model = create_model("B/16", num_classes=10, image_size=384)
    variables = npz.load_npz("ViT-B_16.npz", model)  # new head, position embedding resized
    npz.export_npz(variables, "/tmp/mine.npz")        # official layout, float32

The layout is the model's own: flat '/'-joined parameter names (`embedding/kernel`, `cls`,
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`, ...). Older official
checkpoints keep them under `opt/target/`. Files are read with allow_pickle=False; how a file is
fitted to a model (new head, resized position embedding) is in `vit_jax.adapt`.
"""

from typing import Any, Dict, Optional

import jax
import numpy as np

from common_jax import weights
from vit_jax import adapt
from vit_jax import models

_OLD_PREFIX = "opt/target/"


def open_npz(path: str) -> weights.Tensors:
  """An official-layout .npz under the official names (an `opt/target/` prefix removed)."""
  tensors = weights.read_npz(path)
  names = list(tensors.shapes)
  if not names or not all(name.startswith(_OLD_PREFIX) for name in names):
    return tensors
  return weights.Tensors(tensors.origin,
                         {name[len(_OLD_PREFIX):]: shape for name, shape in tensors.shapes.items()},
                         lambda key: tensors.read(_OLD_PREFIX + key), tensors.close)


def load_npz(path: str, model: models.VisionTransformer, *, rng: Optional[jax.Array] = None,
             variables: Any = None) -> Dict[str, Any]:
  """Loads an official-layout ViT `.npz` onto `model`, adapting head and position embedding.

  Args:
    path: .npz with flat '/'-joined keys (`embedding/kernel`, `cls`,
      `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`, ...), read with
      allow_pickle=False.
    model: the target ViT; its shapes decide what the file must hold.
    rng: when given (and `variables` is not), the model is initialised with it and a replaced
      head takes its initial values; by default no initialisation runs and a replaced head is
      zeros, which is what the model's own initialiser gives.
    variables: the target's current variables ({"params": ...}, boxed or not, e.g. a fresh
      initialisation); a replaced head keeps their values and every array gets their dtype.

  Returns:
    {"params": tree of numpy arrays}, the same tree as `model.init(...)["params"]` unboxed, in
    the model's param_dtype.

  Raises:
    ValueError (one sentence) for a missing or unreadable file, a pickle inside it, and the first
    key that is missing, extra, or of a shape the model cannot take.
  """
  with open_npz(path) as tensors:
    return adapt.adapt(tensors, model, variables, rng)


def export_npz(variables: Any, path: str) -> str:
  """Writes params in the official layout: flat '/'-joined keys, float32 arrays.

  Args:
    variables: {"params": ...} or the params tree (boxed or not, sharded or not).
    path: destination; written to a temporary file in the same directory and renamed over
      `path` only when complete, so a failure never leaves a partial file or clobbers a good one.

  Returns:
    The absolute path written. In a multi-process run every process must call this (sharded
    arrays are gathered); process 0 writes.
  """
  flat = adapt.export_flat(variables)

  def write(temporary: str) -> None:
    with open(temporary, "wb") as f:  # a file object: np.savez would append ".npz" to a name
      np.savez(f, **flat)

  return weights.write_atomically(path, write)
