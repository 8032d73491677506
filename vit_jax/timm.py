"""ViT weights as timm names them, in `.safetensors` files (timm's VisionTransformer state dict).

    from vit_jax import create_model, timm
    model = create_model("B/16", num_classes=10, image_size=384)
    variables = timm.load_safetensors("vit_base.safetensors", model)  # adapted as vit_jax.adapt
    timm.export_safetensors(variables, "/tmp/mine.safetensors")      # timm names, float32

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

import re
from typing import Any, Dict, Iterable, Optional, Sequence

import jax
import numpy as np

from common_jax import weights
from vit_jax import adapt
from vit_jax import models

Flat = Dict[str, np.ndarray]

_ATTENTION = "MultiHeadDotProductAttention_1"
# Official key (with {i} for the block) -> timm key, for the parameters that map one to one.
_TIMM_NAMES = (
    ("embedding/kernel", "patch_embed.proj.weight"),
    ("embedding/bias", "patch_embed.proj.bias"),
    ("cls", "cls_token"),
    (adapt.POSEMB, "pos_embed"),
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
  tensors = to_timm(adapt.export_flat(variables))
  # "format": "pt" tells Hugging Face loaders the tensors are laid out for PyTorch modules.
  return weights.write_atomically(
      path, lambda temporary: safetensors_numpy.save_file(tensors, temporary,
                                                          metadata={"format": "pt"}))


def open_safetensors(path: str, num_heads: int) -> weights.Tensors:
  """A timm-named .safetensors under the official names: header read now, tensors on demand
  (the fused qkv rows split with `num_heads`)."""
  stored = weights.read_safetensors([path])
  # Zero-stride stand-ins give the official names and shapes without reading or allocating.
  stand_ins = {k: np.broadcast_to(np.float32(0), s) for k, s in stored.shapes.items()}
  try:
    shapes = {k: v.shape for k, v in from_timm(stand_ins, num_heads).items()}
  except ValueError as error:
    raise ValueError(f"{stored.origin}: {error}") from None
  converted = {}

  def read(key: str) -> np.ndarray:
    if not converted:
      converted.update(from_timm({k: stored.read(k) for k in stored.shapes}, num_heads))
    return converted[key]

  return weights.Tensors(stored.origin, shapes, read)


def load_safetensors(path: str, model: models.VisionTransformer, *,
                     rng: Optional[jax.Array] = None, variables: Any = None) -> Dict[str, Any]:
  """Loads a timm-named ViT `.safetensors` (e.g. from `export_safetensors`) onto `model`.

  Same adaptation, arguments and errors as `load_npz` (the names in errors are the official
  ones); the fused `qkv` rows are split with `model.num_heads`.

  Returns:
    {"params": tree of numpy arrays} matching `model.init(...)["params"]` unboxed.
  """
  with open_safetensors(path, model.num_heads) as tensors:
    return adapt.adapt(tensors, model, variables, rng)
