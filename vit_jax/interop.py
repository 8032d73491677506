"""ViT weights in and out: official `.npz` checkpoints, timm `.safetensors`, Orbax workdirs.

    from vit_jax import create_model, interop
    model = create_model("B/16", num_classes=10, image_size=384)
    variables = interop.load_npz("ViT-B_16.npz", model)  # new head, position embedding resized
    interop.export_npz(variables, "/tmp/mine.npz")        # official layout, float32
    interop.export_safetensors(variables, "/tmp/mine.safetensors")  # timm names
    interop.export_from_checkpoint("workdirs/ft", model, "/tmp/ft.npz", "npz")
    train_and_evaluate(..., initial_params=interop.pretrained_initializer("ViT-B_16.npz", model))

Loading adapts a file to the model the way the official fine-tuning code does:
  - `head` is replaced (zeros, as the model initialises it) when its shape differs, e.g. a new
    number of classes, or when the file has no head;
  - `pre_logits` (the representation layer) is dropped when the model has none;
  - `Transformer/posembed_input/pos_embedding` is resized to the model's patch grid by
    `scipy.ndimage.zoom(order=1)` over the 2-D grid (as the official code does; corners aligned, so
    a linear ramp stays a linear ramp), the class-token slot copied as it is.
Everything else must match in name and shape; the first key that does not is named in a
one-sentence ValueError, before any array is read.

timm layout (`timm.models.vision_transformer.VisionTransformer`, timm >= 0.9):
  embedding/kernel [P, P, 3, W]            -> patch_embed.proj.weight [W, 3, P, P]
  cls [1, 1, W]                            -> cls_token
  Transformer/posembed_input/pos_embedding -> pos_embed [1, tokens, W]
  encoderblock_{i}/LayerNorm_0, LayerNorm_2 -> blocks.{i}.norm1, norm2 (scale -> weight)
  MultiHeadDotProductAttention_1/{query,key,value}/kernel [W, heads, head_dim]
                                           -> blocks.{i}.attn.qkv.weight [3 W, W] (q, k, v rows)
  MultiHeadDotProductAttention_1/out/kernel [heads, head_dim, W] -> blocks.{i}.attn.proj.weight
  MlpBlock_3/Dense_{0,1}                   -> blocks.{i}.mlp.fc{1,2} (kernel [in, out] -> [out, in])
  Transformer/encoder_norm                 -> norm
  pre_logits                               -> pre_logits.fc (timm < 0.9 only; see below)
  head                                     -> head
A classifier="token" model is timm's default (`global_pool="token"`). A classifier="gap" model
normalises every token and then averages, which is timm's
`VisionTransformer(class_token=False, global_pool="avg", fc_norm=False)`; timm's default for
"avg" (`fc_norm=None`) would normalise after averaging instead, a different function.
Current timm has no representation layer, so a file with `pre_logits.fc.*` loads into timm only
with strict=False; models with `representation_size=None` export files that timm loads strictly.
timm's MLP uses the exact GELU: build the model with gelu_approximate=False for the same logits
(the default tanh approximation moves ViT-Ti/16's logits by about 1e-3).
"""

import os
import re
import tempfile
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from common_jax.trees import flatten, unflatten
from common_jax.trees import params_of as _params_of
from common_jax.trees import to_host as _to_host
from vit_jax import models

Params = Any
Flat = Dict[str, np.ndarray]
FORMATS = ("npz", "safetensors")

_POSEMB = "Transformer/posembed_input/pos_embedding"
_ATTENTION = "MultiHeadDotProductAttention_1"
# Official key (with {i} for the block) -> timm key, for the parameters that map one to one.
_TIMM_NAMES = (
    ("embedding/kernel", "patch_embed.proj.weight"),
    ("embedding/bias", "patch_embed.proj.bias"),
    ("cls", "cls_token"),
    (_POSEMB, "pos_embed"),
    ("Transformer/encoderblock_{i}/LayerNorm_0/scale", "blocks.{i}.norm1.weight"),
    ("Transformer/encoderblock_{i}/LayerNorm_0/bias", "blocks.{i}.norm1.bias"),
    (f"Transformer/encoderblock_{{i}}/{_ATTENTION}/out/kernel", "blocks.{i}.attn.proj.weight"),
    (f"Transformer/encoderblock_{{i}}/{_ATTENTION}/out/bias", "blocks.{i}.attn.proj.bias"),
    ("Transformer/encoderblock_{i}/LayerNorm_2/scale", "blocks.{i}.norm2.weight"),
    ("Transformer/encoderblock_{i}/LayerNorm_2/bias", "blocks.{i}.norm2.bias"),
    ("Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/kernel", "blocks.{i}.mlp.fc1.weight"),
    ("Transformer/encoderblock_{i}/MlpBlock_3/Dense_0/bias", "blocks.{i}.mlp.fc1.bias"),
    ("Transformer/encoderblock_{i}/MlpBlock_3/Dense_1/kernel", "blocks.{i}.mlp.fc2.weight"),
    ("Transformer/encoderblock_{i}/MlpBlock_3/Dense_1/bias", "blocks.{i}.mlp.fc2.bias"),
    ("Transformer/encoder_norm/scale", "norm.weight"),
    ("Transformer/encoder_norm/bias", "norm.bias"),
    ("pre_logits/kernel", "pre_logits.fc.weight"),
    ("pre_logits/bias", "pre_logits.fc.bias"),
    ("head/kernel", "head.weight"),
    ("head/bias", "head.bias"),
)
_QKV = ("query", "key", "value")


# ------------------------------------------------------------------------------------------------
# Trees <-> flat dicts


def _export_flat(variables: Any) -> Flat:
  """Params -> flat official names, float32 numpy (bfloat16/float16 widen exactly)."""
  flat = {}
  for key, value in flatten(_params_of(variables)).items():
    array = _to_host(value)
    if not (jnp.issubdtype(array.dtype, jnp.floating)):
      raise ValueError(f"parameter `{key}` has dtype {array.dtype}, not a float; pass the "
                       "variables of a ViT model ({'params': ...}).")
    flat[key] = np.ascontiguousarray(array.astype(np.float32))
  if not flat:
    raise ValueError("the variables hold no parameters; pass {'params': ...} of a ViT model.")
  return flat


# ------------------------------------------------------------------------------------------------
# Position embeddings


def resize_posemb(posemb: np.ndarray, new_grid: Tuple[int, int], *, num_tokens: int = 1,
                  old_grid: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """Resizes a learned position embedding to another patch grid, as the official code does.

  Args:
    posemb: [1, num_tokens + old_h * old_w, width]; the first `num_tokens` rows (the class
      token's slot) are copied unchanged.
    new_grid: (new_h, new_w), square or not.
    num_tokens: leading rows that are not part of the grid (1 for classifier="token", else 0).
    old_grid: (old_h, old_w); default: the square grid the row count implies.

  Returns:
    [1, num_tokens + new_h * new_w, width] in the dtype of `posemb`, the grid interpolated by
    `scipy.ndimage.zoom(order=1)` (bilinear with aligned corners: the corner embeddings are kept
    and a linear ramp stays a linear ramp).
  """
  import scipy.ndimage  # pylint: disable=g-import-not-at-top  # only needed when resizing
  posemb = np.asarray(posemb)
  tokens, grid = posemb[:, :num_tokens], posemb[0, num_tokens:]
  if old_grid is None:
    side = int(round(np.sqrt(grid.shape[0])))
    if side * side != grid.shape[0]:
      raise ValueError(f"position embedding of {grid.shape[0]} grid rows (after {num_tokens} "
                       "token rows) is not a square grid; pass old_grid=(height, width).")
    old_grid = (side, side)
  old_h, old_w = old_grid
  new_h, new_w = new_grid
  if old_h * old_w != grid.shape[0]:
    raise ValueError(f"old_grid {tuple(old_grid)} has {old_h * old_w} cells but the position "
                     f"embedding has {grid.shape[0]} grid rows; pass the grid it was trained on.")
  grid = grid.reshape(old_h, old_w, -1)
  zoom = (new_h / old_h, new_w / old_w, 1)
  # grid_mode=False (the default) maps corner to corner, as the official ViT code does.
  grid = scipy.ndimage.zoom(grid, zoom, order=1)
  assert grid.shape[:2] == (new_h, new_w), (grid.shape, new_grid)
  grid = grid.reshape(1, new_h * new_w, -1).astype(posemb.dtype)
  return np.concatenate([tokens, grid], axis=1)


# ------------------------------------------------------------------------------------------------
# Adapting a file's parameters to a model


class _Source:
  """Stored parameters under official flat names: shapes known up front, arrays on demand."""

  def __init__(self, origin: str, shapes: Dict[str, Tuple[int, ...]],
               read: Callable[[str], np.ndarray]):
    self.origin = origin  # how error messages name the file
    self.shapes = shapes
    self.read = read

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _target(model: models.VisionTransformer, variables: Any, rng: Optional[jax.Array]
            ) -> Tuple[Dict[str, Any], Callable[[str], np.ndarray]]:
  """(flat target leaves with .shape/.dtype, key -> fresh value for a key the file cannot give)."""
  if variables is not None:
    flat = flatten(_params_of(variables))
    return flat, lambda key: _to_host(flat[key])
  if rng is not None:
    images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    flat = flatten(jax.jit(model.init)(rng, images)["params"])
    return flat, lambda key: _to_host(flat[key])
  flat = flatten(models.abstract_variables(model)["params"])
  # The model initialises `head` to zeros, so no initialisation needs to run for it.
  return flat, lambda key: np.zeros(flat[key].shape, flat[key].dtype)


def _layout_order(key: str) -> Tuple[int, int, str, bool]:
  """Sort key: the order of the forward pass (embedding, cls, posemb, blocks 0..n, norm,
  pre_logits, head), kernels before biases, so that "the first key that does not fit" is the
  earliest and most telling one."""
  module, _, leaf = key.rpartition("/")
  is_bias = leaf == "bias"
  block = re.match(r"Transformer/encoderblock_(\d+)/", key)
  if block:
    return (3, int(block.group(1)), module, is_bias)
  ranks = ("embedding/", "cls", "Transformer/posembed_input/", None, "Transformer/encoder_norm/",
           "pre_logits/", "head/")
  for rank, prefix in enumerate(ranks):
    if prefix and key.startswith(prefix):
      return (rank, 0, module, is_bias)
  return (len(ranks), 0, key, is_bias)


def _model_fix(key: str) -> str:
  """The configuration change that would make a model have (or lack) `key`."""
  if key.startswith("pre_logits/"):
    return "set representation_size to the file's (pre_logits/kernel's last dimension)"
  if key == "cls":
    return "set classifier to the file's ('token' has `cls`, 'gap' has none)"
  if key == _POSEMB:
    return "set posemb='learn' (the file has a learned position embedding)"
  if key.startswith("Transformer/encoderblock_"):
    return "set depth to the file's number of encoderblock_<i> entries"
  return "build the model variant the file was written for"


def _shape_fix(key: str) -> str:
  """The configuration change that would give `key` the file's shape."""
  if key.startswith("pre_logits/"):
    return _model_fix(key)
  return ("build the model with the variant the file was written for (its width, mlp_dim, "
          "num_heads and patch_size)")


def _plan(source: _Source, model: models.VisionTransformer, target: Dict[str, Any]
          ) -> Dict[str, str]:
  """Decides, from shapes alone, how each target key is filled: "copy", "resize" or "fresh".

  Raises ValueError naming the first key that does not fit.
  """
  origin, shapes = source.origin, source.shapes
  if ("cls" in shapes) != ("cls" in target):
    has, lacks = ("the file", "the model") if "cls" in shapes else ("the model", "the file")
    raise ValueError(f"{has} has a class token (`cls`) but {lacks} does not ({origin}); "
                     f"{_model_fix('cls')}.")
  actions = {}
  heads = [k for k in target if k.startswith("head/")]
  for key in sorted((k for k in target if not k.startswith("head/")), key=_layout_order):
    want = tuple(target[key].shape)
    if key not in shapes:
      raise ValueError(f"{origin} has no `{key}` {want}, which the model needs; "
                       f"{_model_fix(key)}.")
    have = shapes[key]
    if have == want:
      actions[key] = "copy"
    elif key == _POSEMB and len(have) == 3 and have[0] == 1 and have[2] == want[2]:
      num_tokens = 1 if "cls" in target else 0
      side = int(round(np.sqrt(have[1] - num_tokens)))
      if side * side != have[1] - num_tokens:
        raise ValueError(f"`{key}` in {origin} has {have[1]} rows, which is not {num_tokens} "
                         "token row(s) plus a square grid; pass a file from a ViT with a square "
                         "patch grid.")
      grid = model.image_size // model.patch_size
      if grid * grid + num_tokens != want[1]:
        raise ValueError(f"`{key}` of the model has {want[1]} rows, not {num_tokens} + "
                         f"{grid}x{grid}; pass the model the variables belong to.")
      actions[key] = "resize"
    else:
      raise ValueError(f"`{key}` has shape {have} in {origin} but the model expects {want}; "
                       f"{_shape_fix(key)}.")
  # A new number of classes (or a head fed by a dropped pre_logits) gets a fresh head; head
  # kernel and bias are replaced together so they never come from two different models.
  if heads:
    fits = all(k in shapes and shapes[k] == tuple(target[k].shape) for k in heads)
    actions.update({k: "copy" if fits else "fresh" for k in heads})
  for key in sorted(shapes, key=_layout_order):
    if key in target or (key.startswith("pre_logits/") and "pre_logits/kernel" not in target):
      continue  # pre_logits is dropped when the model has no representation layer
    if key.startswith("head/") and not heads:
      continue  # a model with num_classes=0 has no head to fill
    raise ValueError(f"{origin} holds `{key}` {shapes[key]}, which the model does not have; "
                     f"{_model_fix(key)}.")
  return actions


def _adapt(source: _Source, model: models.VisionTransformer, variables: Any,
           rng: Optional[jax.Array]) -> Dict[str, Params]:
  """Reads and adapts the file's arrays onto the model's tree -> {"params": numpy tree}."""
  target, fresh = _target(model, variables, rng)
  actions = _plan(source, model, target)
  grid = model.image_size // model.patch_size
  out = {}
  for key, action in actions.items():
    dtype = target[key].dtype
    if action == "fresh":
      out[key] = np.asarray(fresh(key), dtype)
      continue
    array = source.read(key)
    if action == "resize":
      array = resize_posemb(array, (grid, grid), num_tokens=1 if "cls" in target else 0)
    # Same-dtype astype copies the bits; other dtypes are what the model's param_dtype asks for.
    out[key] = np.asarray(array).astype(dtype)
  return {"params": unflatten(out)}


# ------------------------------------------------------------------------------------------------
# .npz (the official layout)


def _npz_header(archive: zipfile.ZipFile, member: str) -> Tuple[Tuple[int, ...], np.dtype]:
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


def _detail(error: Exception) -> str:
  """"TypeName: first sentence of the message", to quote inside one sentence of ours."""
  text = (str(error).splitlines() or [""])[0]
  text = re.split(r"\.\s", text, maxsplit=1)[0].rstrip(".")[:200]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _corrupt(path: str, error: Exception, key: Optional[str] = None) -> ValueError:
  where = f"the array `{key}` in {path}" if key else path
  return ValueError(f"{where} cannot be read as an .npz archive of arrays (truncated or corrupt: "
                    f"{_detail(error)}); export or download the file again.")


def _pickle_error(path: str, key: str) -> ValueError:
  return ValueError(f"the array `{key}` in {path} holds pickled Python objects, which are not "
                    "loaded (allow_pickle=False) because unpickling can run arbitrary code; "
                    "save it again with plain numeric arrays (e.g. with export_npz).")


class _NpzSource(_Source):
  """An open .npz: member headers read at once, arrays read (and CRC-checked) on demand."""

  def __init__(self, path: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise ValueError(f"no file at {path}; check the path of the .npz checkpoint.")
    try:
      self._npz = np.load(path, allow_pickle=False)
    except ValueError as error:
      if "pickle" not in str(error):
        raise _corrupt(path, error) from None
      # Neither a zip nor an .npy: np.load falls through to unpickling, which it refuses.
      raise ValueError(f"{path} is not an .npz archive (numpy would have to unpickle it, and "
                       "pickled data is never loaded because unpickling can run arbitrary code); "
                       "check the path or export the weights with export_npz.") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
      raise _corrupt(path, error) from None
    if not isinstance(self._npz, np.lib.npyio.NpzFile):
      raise ValueError(f"{path} holds a single .npy array, not an .npz archive of named "
                       "parameters; export it with export_npz.")
    names = self._npz.files
    # Old official checkpoints keep the parameters under opt/target/.
    self._prefix = "opt/target/" if names and all(
        n.startswith("opt/target/") for n in names) else ""
    shapes, self._members, key = {}, {}, None
    members = set(self._npz.zip.namelist())
    try:
      for name in names:
        key = name[len(self._prefix):]
        member = name + ".npy" if name + ".npy" in members else name
        shape, dtype = _npz_header(self._npz.zip, member)
        if dtype.hasobject:
          raise _pickle_error(path, key)
        shapes[key] = shape
        self._members[key] = name
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as error:
      raise _corrupt(path, error, key) from None
    except ValueError as error:
      if "holds pickled" in str(error):
        raise
      raise _corrupt(path, error, key) from None
    super().__init__(path, shapes, self._read)

  def _read(self, key: str) -> np.ndarray:
    try:
      return self._npz[self._members[key]]
    except ValueError as error:
      if "allow_pickle" in str(error):
        raise _pickle_error(self.origin, key) from None
      raise _corrupt(self.origin, error, key) from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as error:
      raise _corrupt(self.origin, error, key) from None

  def close(self) -> None:
    self._npz.close()


def load_npz(path: str, model: models.VisionTransformer, *, rng: Optional[jax.Array] = None,
             variables: Any = None) -> Dict[str, Params]:
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
  with _NpzSource(path) as source:
    return _adapt(source, model, variables, rng)


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
  flat = _export_flat(variables)

  def write(temporary: str) -> None:
    with open(temporary, "wb") as f:  # a file object: np.savez would append ".npz" to a name
      np.savez(f, **flat)

  return _write_atomically(path, write)


# ------------------------------------------------------------------------------------------------
# .safetensors (timm names)


def _block_indices(keys: Iterable[str], pattern: str) -> Sequence[int]:
  found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
  return sorted(found)


def to_timm(flat: Flat) -> Flat:
  """Official flat params -> timm `VisionTransformer` state dict (numpy, float32, contiguous)."""
  flat = dict(flat)
  out = {}
  for i in _block_indices(flat, r"Transformer/encoderblock_(\d+)/"):
    prefix = f"Transformer/encoderblock_{i}/{_ATTENTION}/"
    fused = [prefix + f"{n}/{leaf}" for leaf in ("kernel", "bias") for n in _QKV]
    missing = [key for key in fused if key not in flat]
    if missing:
      raise ValueError(f"parameter `{missing[0]}` is missing; export_safetensors takes the "
                       "complete params of a vit_jax VisionTransformer.")
    kernels = [flat.pop(key) for key in fused[:3]]  # each [W, heads, head_dim]
    biases = [flat.pop(key) for key in fused[3:]]  # each [heads, head_dim]
    # timm computes qkv = x @ weight.T and reads rows as (3, heads, head_dim).
    out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
        [k.reshape(k.shape[0], -1).T for k in kernels], axis=0)
    out[f"blocks.{i}.attn.qkv.bias"] = np.concatenate([b.reshape(-1) for b in biases])
  names = _expand_names(_block_indices(out, r"blocks\.(\d+)\."))
  for key, value in flat.items():
    if key not in names:
      raise ValueError(f"parameter `{key}` has no timm name; export_safetensors takes the "
                       "params of a vit_jax VisionTransformer.")
    out[names[key]] = _official_to_timm(key, value)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def _expand_names(blocks: Sequence[int]) -> Dict[str, str]:
  names = {}
  for official, timm in _TIMM_NAMES:
    if "{i}" in official:
      names.update({official.format(i=i): timm.format(i=i) for i in blocks})
    else:
      names[official] = timm
  return names


def _official_to_timm(key: str, value: np.ndarray) -> np.ndarray:
  if key == "embedding/kernel":
    return value.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
  if key.endswith("/out/kernel"):
    return value.reshape(-1, value.shape[-1]).T  # [heads, head_dim, W] -> [W, heads * head_dim]
  if key.endswith("/kernel"):
    return value.T  # Dense [in, out] -> Linear [out, in]
  return value


def from_timm(tensors: Flat, num_heads: int) -> Flat:
  """timm `VisionTransformer` state dict -> official flat params (inverse of `to_timm`).

  `num_heads` splits the fused qkv rows back into [W, heads, head_dim] kernels.
  """
  tensors = dict(tensors)
  out = {}
  for i in _block_indices(tensors, r"blocks\.(\d+)\.attn\.qkv\."):
    prefix = f"Transformer/encoderblock_{i}/{_ATTENTION}/"
    weight = tensors.pop(f"blocks.{i}.attn.qkv.weight", None)  # [3 W, W]
    bias = tensors.pop(f"blocks.{i}.attn.qkv.bias", None)  # [3 W]
    if weight is None or bias is None:
      raise ValueError(f"`blocks.{i}.attn.qkv.weight` and `.bias` must both be present; vit_jax's "
                       "attention has biases (timm qkv_bias=True).")
    width = weight.shape[1]
    for n, rows, b in zip(_QKV, np.split(weight, 3, axis=0), np.split(bias, 3)):
      out[prefix + f"{n}/kernel"] = rows.T.reshape(width, num_heads, width // num_heads)
      out[prefix + f"{n}/bias"] = b.reshape(num_heads, width // num_heads)
  names = {timm: official for official, timm in _expand_names(
      _block_indices(tensors, r"blocks\.(\d+)\.")).items()}
  for key, value in tensors.items():
    if key not in names:
      raise ValueError(f"tensor `{key}` has no counterpart in vit_jax's VisionTransformer; "
                       "pass a timm vit_* state dict without extra modules.")
    official = names[key]
    if official == "embedding/kernel":
      value = value.transpose(2, 3, 1, 0)
    elif official.endswith("/out/kernel"):
      value = value.T.reshape(num_heads, -1, value.shape[0])
    elif official.endswith("/kernel"):
      value = value.T
    out[official] = value
  return out


def export_safetensors(variables: Any, path: str) -> str:
  """Writes params with timm's names (see the module docstring), float32, atomically.

  Args:
    variables: {"params": ...} or the params tree (boxed or not, sharded or not).
    path: destination .safetensors, replaced only when the new file is complete. Load it with
      `timm.create_model("vit_base_patch16_224", pretrained=True,
      pretrained_cfg_overlay=dict(file=path))` (the timm name whose shape the model has; for
      classifier="gap" build timm's VisionTransformer with class_token=False, global_pool="avg",
      fc_norm=False).

  Returns:
    The absolute path written (by process 0 in a multi-process run; all processes must call).
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  tensors = to_timm(_export_flat(variables))
  # "format": "pt" tells Hugging Face loaders the tensors are laid out for PyTorch modules.
  return _write_atomically(
      path, lambda temporary: safetensors_numpy.save_file(tensors, temporary,
                                                          metadata={"format": "pt"}))


class _SafetensorsSource(_Source):
  """A .safetensors file under official names: header read at once, tensors on demand."""

  def __init__(self, path: str, num_heads: int):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise ValueError(f"no file at {path}; check the path of the .safetensors file.")
    try:
      with safe_open(path, framework="numpy") as f:
        timm_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as error:  # pylint: disable=broad-except  # SafetensorError is not exported
      raise ValueError(f"{path} cannot be read as .safetensors (truncated or corrupt: "
                       f"{_detail(error)}); export or download the file again.") from None
    # Zero-stride stand-ins give the official names and shapes without reading or allocating.
    stand_ins = {k: np.broadcast_to(np.float32(0), s) for k, s in timm_shapes.items()}
    try:
      shapes = {k: v.shape for k, v in from_timm(stand_ins, num_heads).items()}
    except ValueError as error:
      raise ValueError(f"{path}: {error}") from None
    self._path, self._num_heads, self._tensors = path, num_heads, None
    super().__init__(path, shapes, self._read)

  def _read(self, key: str) -> np.ndarray:
    if self._tensors is None:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
      try:
        self._tensors = from_timm(safetensors_numpy.load_file(self._path), self._num_heads)
      except Exception as error:  # pylint: disable=broad-except
        raise ValueError(f"{self._path} cannot be read as .safetensors (truncated or corrupt: "
                         f"{_detail(error)}); export or download the file again.") from None
    return self._tensors[key]


def load_safetensors(path: str, model: models.VisionTransformer, *,
                     rng: Optional[jax.Array] = None, variables: Any = None) -> Dict[str, Params]:
  """Loads a timm-named ViT `.safetensors` (e.g. from `export_safetensors`) onto `model`.

  Same adaptation, arguments and errors as `load_npz` (the names in errors are the official
  ones); the fused `qkv` rows are split with `model.num_heads`.

  Returns:
    {"params": tree of numpy arrays} matching `model.init(...)["params"]` unboxed.
  """
  return _adapt(_SafetensorsSource(path, model.num_heads), model, variables, rng)


# ------------------------------------------------------------------------------------------------
# The loop hook and Orbax workdirs


def _open(path: str, model: models.VisionTransformer) -> _Source:
  """The stored parameters at `path`: a workdir (its latest checkpoint), .npz or .safetensors."""
  if os.path.isdir(path):
    return _CheckpointSource(path)
  if path.endswith(".npz"):
    return _NpzSource(path)
  if path.endswith(".safetensors"):
    return _SafetensorsSource(path, model.num_heads)
  raise ValueError(f"pretrained weights {path} must be a training workdir, an .npz (official "
                   "layout) or a .safetensors file (timm names); fix the path or convert the file.")


def pretrained_initializer(path: str, model: models.VisionTransformer
                           ) -> Callable[[Params], Params]:
  """`train_and_evaluate(initial_params=...)` hook for `config.init_from`.

  Args:
    path: an official-layout .npz, a timm-named .safetensors, or the workdir of an earlier
      training run (the params of its latest checkpoint).
    model: the model about to be trained; the weights are adapted to it as in `load_npz`
      (new head, resized position embedding, pre_logits dropped).

  The stored names and shapes are checked against `model` now (headers and metadata only), so
  weights that cannot fit fail before any compute; the arrays are read when the loop calls the
  hook with the freshly initialised host params, which give the dtypes and the new head.

  Returns:
    host params -> host params (numpy tree). The loop calls it for a fresh run only, never when
    it resumes from its own checkpoint.
  """
  path = os.fspath(path)
  with _open(path, model) as source:
    _plan(source, model, flatten(models.abstract_variables(model)["params"]))

  def initialize(params: Params) -> Params:
    with _open(path, model) as source:
      return _adapt(source, model, {"params": params}, None)["params"]

  return initialize


def export(variables: Any, path: str, format: str) -> str:  # pylint: disable=redefined-builtin
  """`export_npz` or `export_safetensors` by `format` ("npz" or "safetensors")."""
  if format == "npz":
    return export_npz(variables, path)
  if format == "safetensors":
    return export_safetensors(variables, path)
  raise ValueError(f"export format {format!r} is unknown; use one of {FORMATS}.")


class _CheckpointSource(_Source):
  """The `params` of a workdir's Orbax checkpoint: shapes from its metadata, arrays read once, on
  demand, straight to host memory (partial restore: optimiser state is never read). Read-only:
  nothing under the workdir is created or written."""

  def __init__(self, workdir: str, step: Optional[int] = None):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
      raise ValueError(f"workdir {workdir} holds no checkpoint (no {directory}); train first or "
                       "point at a training run's workdir.")
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False),
        item_handlers=ocp.PyTreeCheckpointHandler())
    try:
      steps = self._manager.all_steps()
      step = self._manager.latest_step() if step is None else step
      if step is None or step not in steps:
        raise ValueError(f"workdir {workdir} holds no checkpoint"
                         + ("" if step is None else f" at step {step}")
                         + f"; train first or pick one of the steps {list(steps)}.")
      metadata = flax.traverse_util.flatten_dict(
          self._manager.item_metadata(step)["params"], sep="/")
    except BaseException:
      self._manager.close()
      raise
    self.step, self._params = step, None
    self._stored = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in metadata.items()}
    super().__init__(f"the checkpoint at step {step} in {directory}",
                     {k: v.shape for k, v in self._stored.items()}, self._read)

  def _read(self, key: str) -> np.ndarray:
    if self._params is None:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      item = unflatten(dict(self._stored))
      restore_args = jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      restored = self._manager.restore(self.step, args=ocp.args.PyTreeRestore(
          item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))
      self._params = flatten(restored["params"])
    return self._params[key]

  def close(self) -> None:
    self._manager.close()


def read_checkpoint_params(workdir: str, model: models.VisionTransformer,
                           step: Optional[int] = None) -> Tuple[int, Params]:
  """The params of a workdir's Orbax checkpoint (latest by default) as numpy, unchanged.

  Only the `params` subtree is read, straight to host memory, so the checkpoint may come from
  any mesh and optimiser; nothing under `workdir` is written. Names and shapes must be the
  model's exactly (no adaptation: this is for exporting what was trained).

  Returns:
    (step, params tree of numpy arrays in the stored dtypes, the tree of `model.init`'s params).
  """
  with _CheckpointSource(workdir, step) as source:
    _check_same_shapes(source.shapes, flatten(models.abstract_variables(model)["params"]),
                       source.origin)
    return source.step, unflatten({key: source.read(key) for key in source.shapes})


def _check_same_shapes(stored: Dict[str, Tuple[int, ...]], target: Dict[str, Any],
                       origin: str) -> None:
  """Checkpoints are exported as they are: same names, same shapes, nothing adapted."""
  for key in sorted(target, key=_layout_order):
    want = tuple(target[key].shape)
    if key not in stored:
      raise ValueError(f"{origin} has no `{key}` {want}, which the model needs; use the config "
                       f"the run was trained with ({_model_fix(key)}).")
    if stored[key] != want:
      raise ValueError(f"`{key}` has shape {stored[key]} in {origin} but the model expects "
                       f"{want}; use the config the run was trained with.")
  for key in sorted(stored, key=_layout_order):
    shape = stored[key]
    if key not in target:
      raise ValueError(f"{origin} holds `{key}` {shape}, which the model does not have; use the "
                       f"config the run was trained with ({_model_fix(key)}).")


def export_from_checkpoint(workdir: str, model: models.VisionTransformer, path: str,
                           format: str = "npz",  # pylint: disable=redefined-builtin
                           *, step: Optional[int] = None) -> str:
  """Exports the params of a workdir's latest (or `step`) Orbax checkpoint to `path`.

  Args:
    workdir: a training run's --workdir (checkpoints under `<workdir>/checkpoints/<step>`),
      written on any mesh; it is only read.
    model: the model the run trained (its shapes are checked against the checkpoint's).
    path: destination; an existing file is replaced only by a complete new one.
    format: "npz" (official layout) or "safetensors" (timm names).

  Returns:
    The absolute path written.
  """
  if format not in FORMATS:
    raise ValueError(f"export format {format!r} is unknown; use one of {FORMATS}.")
  _, params = read_checkpoint_params(workdir, model, step)
  return export({"params": params}, path, format)


def _write_atomically(path: str, write: Callable[[str], Any]) -> str:
  """Runs `write(temporary_path)` for a temporary file next to `path`, then renames it over
  `path`; on any failure the temporary file is removed and `path` is left as it was."""
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
    os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the new one
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return path
