"""iGPT weights in and out: Hugging Face `ImageGPT` directories and OpenAI's TensorFlow checkpoints.

    from igpt_jax import interop, quantize
    model, variables, clusters = interop.load_hf("imagegpt-small")  # a save_pretrained directory
    logits = model.apply(variables, quantize(images, clusters).reshape(len(images), -1))
    interop.export_hf(model, variables, "/tmp/igpt-hf", clusters)
    # ImageGPTForCausalImageModeling.from_pretrained("/tmp/igpt-hf") now loads it.
    interop.export_hf_from_checkpoint("workdirs/igpt", model, "/tmp/igpt-hf", clusters)
    model, variables, clusters = interop.load_openai(
        "model.ckpt-1000000", clusters_path="kmeans_centers.npy")  # needs TensorFlow

Layouts (K clusters, W width, M mlp_dim, n heads of d = W / n, L = image_size**2 positions):

  ours (OpenAI's names)      OpenAI checkpoint              Hugging Face ImageGPTForCausalImageModeling
  wte [K, W]                 model/wte                      transformer.wte.weight [K + 1, W]: rows < K,
  sos [W]                    model/sos                        and row K (the start-of-sequence token)
  wpe [L, W]                 model/wpe                      transformer.wpe.weight [L, W]
  h_{i}/ln_1/g [W]           model/h{i}/ln_1/g              transformer.h.{i}.ln_1.weight
  h_{i}/attn/{q,k,v}_proj    model/h{i}/attn/{q,k,v}_proj   transformer.h.{i}.attn.c_attn.weight [W, 3 W]:
    [n, d, W]                  [n, d, W]                      columns q | k | v, each proj.reshape(W, W).T
  h_{i}/attn/c_proj [n,d,W]  model/h{i}/attn/c_proj         transformer.h.{i}.attn.c_proj.weight [W, W]
                                                              = c_proj.reshape(W, W)
  h_{i}/ln_2/g               model/h{i}/ln_2/g              transformer.h.{i}.ln_2.weight
  h_{i}/mlp/c_fc [W, M]      model/h{i}/mlp/c_fc/w          transformer.h.{i}.mlp.c_fc.weight [W, M]
  h_{i}/mlp/c_proj [M, W]    model/h{i}/mlp/c_proj/w        transformer.h.{i}.mlp.c_proj.weight [M, W]
  ln_f/g                     model/ln_f/g                   transformer.ln_f.weight
  wtet [K, W]                model/wtet                     lm_head.weight [K, W]
  clf [C, W]                 model/clf/wclf                 score.weight (ImageGPTForImageClassification)

Hugging Face's Conv1D layers (c_attn, c_proj, c_fc) have biases that OpenAI's model and ours do
not: they are exported as zeros, and importing refuses a nonzero one (it would change outputs).
The Hugging Face model reads ids [K, x_0, .., x_{L-2}] (the start token K first) and its logits at
position t predict x_t: exactly our `model.apply(variables, x)` at t. OpenAI's conv1d weights may
carry a leading [1, ...] axis (GPT-2's layout); leading singleton axes are dropped on import.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from common_jax.trees import flatten, unflatten
from common_jax.trees import params_of as _params_of
from common_jax.trees import to_host as _to_host
from igpt_jax import models
from igpt_jax import palette as palette_lib

Params = Any
Flat = Dict[str, np.ndarray]
Shape = Tuple[int, ...]

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
HF_CONFIG = "config.json"
HF_PREPROCESSOR = "preprocessor_config.json"

# ImageGPTConfig's defaults (transformers 4.x and 5.x): what a config.json without the key means.
_HF_DEFAULTS = dict(
    vocab_size=513, n_positions=1024, n_embd=512, n_layer=24, n_head=8, n_inner=None,
    activation_function="quick_gelu", layer_norm_epsilon=1e-5, scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=False)
# Settings under which Hugging Face computes a function our model does not: (key, required value).
_HF_REQUIRED = (
    ("activation_function", "quick_gelu"),
    ("scale_attn_weights", True),
    ("scale_attn_by_inverse_layer_idx", False),
    ("add_cross_attention", False),
    ("tie_word_embeddings", False),
)
# Causal-mask buffers that older transformers versions saved with the weights; not parameters.
_HF_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
# TensorFlow bookkeeping next to the weights (optimiser slots, step counters): not parameters.
_TF_BOOKKEEPING = re.compile(r"(^|/)(Adam(_\d+)?|Momentum|ExponentialMovingAverage|beta[12]_power|"
                             r"global_step|_step)$")


# ------------------------------------------------------------------------------------------------
# Names and order


def _layout_order(key: str) -> Tuple[int, int, str]:
  """Forward-pass order (embeddings, blocks 0..n, final norm, heads) for "the first key that does
  not fit", whatever the naming scheme (ours, OpenAI's or Hugging Face's)."""
  block = re.search(r"(?:^|/|\.)h[._]?(\d+)[./]", key)
  if block:
    return (1, int(block.group(1)), key)
  late = ("ln_f" in key) or key.endswith(("wtet", "lm_head.weight", "clf", "wclf", "clf/w",
                                          "score.weight"))
  return (2 if late else 0, 0, key)


def _model_params(model: models.ImageGPT, variables: Any, origin: str, fix: str) -> Flat:
  """The model's parameters from `variables` as host float32 arrays, checked name by name.

  Raises ValueError naming the first parameter that is missing, extra, misshapen or not a float.
  """
  target = flatten(models.abstract_variables(model)["params"])
  given = flatten(_params_of(variables))
  for key in sorted(target, key=_layout_order):
    want = tuple(target[key].shape)
    if key not in given:
      raise ValueError(f"`{key}` {want}, which the model needs, is missing from {origin}; "
                       f"{fix}.")
    have = tuple(np.shape(given[key]))
    if have != want:
      raise ValueError(f"`{key}` has shape {have} in {origin} but the model expects {want}; "
                       f"{fix}.")
  for key in sorted(given, key=_layout_order):
    if key not in target:
      raise ValueError(f"`{key}` {tuple(np.shape(given[key]))} in {origin} is not a parameter "
                       f"of the model; {fix}.")
  flat = {}
  for key in target:
    array = _to_host(given[key])
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise ValueError(f"`{key}` in {origin} has dtype {array.dtype}, not a float; {fix}.")
    # float32 stays bit-identical; bfloat16/float16 widen exactly.
    flat[key] = np.ascontiguousarray(array.astype(np.float32))
  return flat


def _cast_params(flat: Flat, model: models.ImageGPT) -> Dict[str, Params]:
  """Flat float arrays -> {"params": numpy tree} in the model's param_dtype."""
  dtype = jnp.dtype(model.param_dtype)
  return {"params": unflatten({k: np.asarray(v).astype(dtype) for k, v in flat.items()})}


def _model_options(model_options: Dict[str, Any], derived: Sequence[str], origin: str
                   ) -> Dict[str, Any]:
  """`model_options` for create_model, minus the shape the weights already determine."""
  clash = sorted(set(model_options) & set(derived))
  if clash:
    raise ValueError(f"{clash} come from {origin} and cannot be passed as model options; pass "
                     "only dtype, param_dtype, dropout_rate or attention_implementation.")
  return dict(model_options)


def _square_side(positions: int, what: str, fix: str) -> int:
  side = math.isqrt(positions)
  if side * side != positions:
    raise ValueError(f"{what} has {positions} positions, which is not image_size**2 for a square "
                     f"image; {fix}.")
  return side


# ------------------------------------------------------------------------------------------------
# Named tensors in a file: shapes known up front, arrays read on demand


class _Tensors:
  """A file's tensors: `shapes` from its header, `read(name)` -> numpy array."""

  def __init__(self, origin: str, shapes: Dict[str, Shape], read: Callable[[str], np.ndarray]):
    self.origin = origin
    self.shapes = shapes
    self.read = read


def _detail(error: BaseException) -> str:
  return (str(error).splitlines() or [type(error).__name__])[0][:200]


def _safetensors_files(directory: str, files: Sequence[str]) -> _Tensors:
  """Tensors of one or more .safetensors files (a sharded checkpoint lists several)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  shapes, where = {}, {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise ValueError(f"{path} does not exist (listed by {HF_INDEX}); download the missing "
                       "shard or save the model again.")
    try:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          shapes[key] = tuple(f.get_slice(key).get_shape())
          where[key] = path
    except Exception as error:  # pylint: disable=broad-except  # SafetensorError is not exported
      raise ValueError(f"{path} cannot be read as .safetensors (truncated or corrupt: "
                       f"{_detail(error)}); export or download the file again.") from None

  def read(key: str) -> np.ndarray:
    try:
      with safe_open(where[key], framework="numpy") as f:
        return np.asarray(f.get_tensor(key))
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f"`{key}` in {where[key]} cannot be read (truncated or corrupt: "
                       f"{_detail(error)}); export or download the file again.") from None

  origin = os.path.join(directory, files[0] if len(files) == 1 else HF_INDEX)
  return _Tensors(origin, shapes, read)


def _torch_file(path: str) -> _Tensors:
  """Tensors of a `pytorch_model.bin` (needs torch; read with weights_only=True, no code run)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"{path} is a PyTorch file and torch is not installed; pip install torch, "
                     f"or save the model as {HF_WEIGHTS} (save_pretrained does by default)."
                     ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"{path} cannot be read by torch.load(weights_only=True) ({_detail(error)}); "
                     "save the model again, preferably as model.safetensors.") from None
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; save the model "
                     "with save_pretrained.")
  # numpy has no bfloat16: such tensors widen to float32 (exact).
  arrays = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
  return _Tensors(path, {k: tuple(v.shape) for k, v in arrays.items()}, arrays.__getitem__)


def _hf_tensors(directory: str) -> _Tensors:
  if os.path.isfile(os.path.join(directory, HF_WEIGHTS)):
    return _safetensors_files(directory, [HF_WEIGHTS])
  index = os.path.join(directory, HF_INDEX)
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
      raise ValueError(f"{index} has no `weight_map`; save the model again.")
    return _safetensors_files(directory, sorted(set(weight_map.values())))
  if os.path.isfile(os.path.join(directory, HF_TORCH_WEIGHTS)):
    return _torch_file(os.path.join(directory, HF_TORCH_WEIGHTS))
  raise ValueError(f"{directory} has no {HF_WEIGHTS}, {HF_INDEX} or {HF_TORCH_WEIGHTS}; pass a "
                   "directory written by save_pretrained or export_hf.")


def _read_json(path: str) -> Dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      content = json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(f"{path} is not readable JSON ({_detail(error)}); save the model again."
                     ) from None
  if not isinstance(content, dict):
    raise ValueError(f"{path} holds a JSON {type(content).__name__}, not an object; save the "
                     "model again.")
  return content


# ------------------------------------------------------------------------------------------------
# Hugging Face layout


def _hf_block_names(i: int) -> Dict[str, str]:
  """Our block-i names -> Hugging Face names, for the parameters that map one to one."""
  return {
      f"h_{i}/ln_1/g": f"transformer.h.{i}.ln_1.weight",
      f"h_{i}/ln_2/g": f"transformer.h.{i}.ln_2.weight",
      f"h_{i}/mlp/c_fc": f"transformer.h.{i}.mlp.c_fc.weight",
      f"h_{i}/mlp/c_proj": f"transformer.h.{i}.mlp.c_proj.weight",
  }


def _hf_shapes(config: Dict[str, Any], num_classes: int) -> Dict[str, Shape]:
  """Every tensor a Hugging Face ImageGPT with `config` has (biases included) -> its shape."""
  vocab, width = config["vocab_size"], config["n_embd"]
  inner = config["n_inner"] or 4 * width
  shapes = {"transformer.wte.weight": (vocab, width),
            "transformer.wpe.weight": (config["n_positions"], width)}
  for i in range(config["n_layer"]):
    prefix = f"transformer.h.{i}."
    shapes.update({
        prefix + "ln_1.weight": (width,),
        prefix + "attn.c_attn.weight": (width, 3 * width),
        prefix + "attn.c_attn.bias": (3 * width,),
        prefix + "attn.c_proj.weight": (width, width),
        prefix + "attn.c_proj.bias": (width,),
        prefix + "ln_2.weight": (width,),
        prefix + "mlp.c_fc.weight": (width, inner),
        prefix + "mlp.c_fc.bias": (inner,),
        prefix + "mlp.c_proj.weight": (inner, width),
        prefix + "mlp.c_proj.bias": (width,),
    })
  shapes["transformer.ln_f.weight"] = (width,)
  shapes["lm_head.weight"] = (vocab - 1, width)
  if num_classes:
    shapes["score.weight"] = (num_classes, width)
  return shapes


def _hf_fields(key: str, config: Dict[str, Any]) -> str:
  """The config.json fields that decide the shape of `key`, with their values."""
  if key == "transformer.wpe.weight":
    names = ("n_positions", "n_embd")
  elif key in ("transformer.wte.weight", "lm_head.weight"):
    names = ("vocab_size", "n_embd")
  elif ".mlp." in key:
    names = ("n_embd", "n_inner")
  elif key.startswith("transformer.h."):
    names = ("n_layer", "n_embd")
  else:
    names = ("n_embd",)
  return ", ".join(f"{name}={config[name]}" for name in names)


def _read_hf_config(directory: str) -> Dict[str, Any]:
  """config.json with ImageGPTConfig's defaults filled in, checked against what iGPT computes."""
  path = os.path.join(directory, HF_CONFIG)
  if not os.path.isfile(path):
    raise ValueError(f"{directory} has no {HF_CONFIG}; pass a directory written by "
                     "save_pretrained or export_hf.")
  stored = _read_json(path)
  if stored.get("model_type", "imagegpt") != "imagegpt":
    raise ValueError(f"{path} has model_type={stored['model_type']!r}, not 'imagegpt'; pass an "
                     "ImageGPT model directory.")
  config = dict(_HF_DEFAULTS)
  config.update({k: stored[k] for k in _HF_DEFAULTS if k in stored})
  for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{path} has {key}={value!r}; it must be a positive integer.")
  if config["vocab_size"] < 2:
    raise ValueError(f"{path} has vocab_size={config['vocab_size']}, but ImageGPT's vocabulary is "
                     "the clusters plus one start token; set vocab_size to num_clusters + 1.")
  inner = config["n_inner"]
  if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or inner < 1):
    raise ValueError(f"{path} has n_inner={inner!r}; it must be a positive integer or null.")
  if config["n_embd"] % config["n_head"]:
    raise ValueError(f"{path} has n_embd={config['n_embd']} not divisible by "
                     f"n_head={config['n_head']}; fix n_head.")
  for key, required in _HF_REQUIRED:
    if config[key] != required:
      raise ValueError(f"{path} has {key}={config[key]!r}, which iGPT does not compute (it needs "
                       f"{required!r}); only OpenAI-architecture ImageGPT models can be loaded.")
  epsilon = config["layer_norm_epsilon"]
  if (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float))
      or not math.isclose(epsilon, models.NORM_EPSILON, rel_tol=1e-6)):
    raise ValueError(f"{path} has layer_norm_epsilon={config['layer_norm_epsilon']!r} but iGPT's "
                     f"norm uses {models.NORM_EPSILON}; only OpenAI-architecture ImageGPT models "
                     "can be loaded.")
  return config


def _read_hf_clusters(directory: str, num_clusters: int, image_size: int) -> np.ndarray:
  """preprocessor_config.json's `clusters` -> [num_clusters, 3] float32, checked."""
  path = os.path.join(directory, HF_PREPROCESSOR)
  fix = (f"write the model's colour palette there as `clusters` ([{num_clusters}, 3] in [-1, 1], "
         "e.g. with export_hf)")
  if not os.path.isfile(path):
    raise ValueError(f"{directory} has no {HF_PREPROCESSOR}, which holds the colour clusters; "
                     f"{fix}.")
  stored = _read_json(path)
  if stored.get("clusters") is None:
    raise ValueError(f"{path} has no `clusters`; {fix}.")
  try:
    clusters = np.asarray(stored["clusters"], np.float32)
  except (TypeError, ValueError):
    raise ValueError(f"{path} has `clusters` that are not a numeric array; {fix}.") from None
  if clusters.shape != (num_clusters, 3) or not np.all(np.isfinite(clusters)):
    raise ValueError(f"{path} has `clusters` of shape {clusters.shape} but config.json's "
                     f"vocab_size={num_clusters + 1} needs finite [{num_clusters}, 3]; {fix}.")
  size = stored.get("size")
  if isinstance(size, Mapping) and "height" in size and "width" in size:
    if (size["height"], size["width"]) != (image_size, image_size):
      raise ValueError(f"{path} has size={dict(size)} but config.json's n_positions="
                       f"{image_size * image_size} means {image_size}x{image_size} images; set "
                       f"`size` to {{'height': {image_size}, 'width': {image_size}}}.")
  return clusters


def _plan_hf(tensors: _Tensors, config: Dict[str, Any]) -> Dict[str, Shape]:
  """Checks the file's tensor shapes against config.json (headers only); returns what to read."""
  origin, shapes = tensors.origin, tensors.shapes
  if "transformer.wte.weight" not in shapes and "wte.weight" in shapes:
    raise ValueError(f"{origin} holds an ImageGPTModel (no `transformer.` prefix, no lm_head); "
                     "save an ImageGPTForCausalImageModeling instead.")
  score = shapes.get("score.weight")
  num_classes = score[0] if score else 0
  expected = _hf_shapes(config, num_classes)
  fix = (f"fix {HF_CONFIG} to describe these weights, or use the weights it was written with")
  for key in sorted(expected, key=_layout_order):
    if key.endswith(".bias") and key not in shapes:
      continue  # a missing Conv1D bias means zero, which is what iGPT computes
    if key not in shapes:
      raise ValueError(f"{origin} has no `{key}` {expected[key]}, which {HF_CONFIG} "
                       f"({_hf_fields(key, config)}) needs; {fix}.")
    if shapes[key] != expected[key]:
      raise ValueError(f"`{key}` has shape {shapes[key]} in {origin} but {HF_CONFIG} "
                       f"({_hf_fields(key, config)}) means {expected[key]}; {fix}.")
  for key in sorted(shapes, key=_layout_order):
    if key not in expected and not _HF_BUFFER.match(key):
      raise ValueError(f"{origin} holds `{key}` {shapes[key]}, which an ImageGPT built from "
                       f"{HF_CONFIG} (n_layer={config['n_layer']}) does not have; {fix}.")
  return {k: v for k, v in expected.items() if k in shapes}


def to_hf(params: Params) -> Flat:
  """Our params (an autoregressive model's) -> Hugging Face ImageGPT state dict.

  Args:
    params: the params tree (nested or flat "/"-keys, boxed or not) of a causal ImageGPT.

  Returns:
    {Hugging Face name: float32 contiguous numpy array}, Conv1D biases as zeros and `score.weight`
    when the model has a classifier (see the module docstring for the layout).
  """
  flat = {k: np.asarray(_to_host(v), np.float32) for k, v in flatten(_params_of(params)).items()}
  if "sos" not in flat:
    raise ValueError("the params have no `sos`: Hugging Face's ImageGPT is autoregressive, so "
                     "only causal=True models can be exported.")
  width = flat["wte"].shape[1]
  out = {"transformer.wte.weight": np.concatenate([flat.pop("wte"), flat.pop("sos")[None]]),
         "transformer.wpe.weight": flat.pop("wpe"),
         "transformer.ln_f.weight": flat.pop("ln_f/g"),
         "lm_head.weight": flat.pop("wtet")}
  if "clf" in flat:
    out["score.weight"] = flat.pop("clf")
  depth = len({k.split("/")[0] for k in flat if k.startswith("h_")})
  for i in range(depth):
    prefix = f"transformer.h.{i}."
    q, k, v, c = (flat.pop(f"h_{i}/attn/{n}") for n in ("q_proj", "k_proj", "v_proj", "c_proj"))
    # [heads, head_dim, W] is the [out, in] matrix of a projection; Conv1D stores [in, out].
    out[prefix + "attn.c_attn.weight"] = np.concatenate(
        [w.reshape(width, width).T for w in (q, k, v)], axis=1)
    out[prefix + "attn.c_attn.bias"] = np.zeros((3 * width,), np.float32)
    out[prefix + "attn.c_proj.weight"] = c.reshape(width, width)  # already [in, out]
    out[prefix + "attn.c_proj.bias"] = np.zeros((width,), np.float32)
    for ours, theirs in _hf_block_names(i).items():
      out[theirs] = flat.pop(ours)
    out[prefix + "mlp.c_fc.bias"] = np.zeros((out[prefix + "mlp.c_fc.weight"].shape[1],),
                                             np.float32)
    out[prefix + "mlp.c_proj.bias"] = np.zeros((width,), np.float32)
  if flat:
    raise ValueError(f"parameter `{sorted(flat)[0]}` has no Hugging Face name; pass the params "
                     "of an igpt_jax ImageGPT.")
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def from_hf(tensors: Mapping[str, np.ndarray], num_heads: int) -> Flat:
  """Hugging Face ImageGPT state dict -> our flat params (inverse of `to_hf`).

  Args:
    tensors: {Hugging Face name: array}; biases, if present, are ignored here (`load_hf` checks
      that they are zero); causal-mask buffers are skipped.
    num_heads: config.json's n_head, to split the fused c_attn columns into [heads, head_dim, W].

  Returns:
    {"h_0/attn/q_proj": array, ...} in the arrays' own dtypes.
  """
  tensors = {k: v for k, v in tensors.items()
             if not k.endswith(".bias") and not _HF_BUFFER.match(k)}
  wte = np.asarray(tensors.pop("transformer.wte.weight"))
  width = wte.shape[1]
  head_dim = width // num_heads
  out = {"wte": wte[:-1], "sos": wte[-1],
         "wpe": tensors.pop("transformer.wpe.weight"),
         "ln_f/g": tensors.pop("transformer.ln_f.weight"),
         "wtet": tensors.pop("lm_head.weight")}
  if "score.weight" in tensors:
    out["clf"] = tensors.pop("score.weight")
  depth = len({k.split(".")[2] for k in tensors if k.startswith("transformer.h.")})
  for i in range(depth):
    prefix = f"transformer.h.{i}."
    c_attn = np.asarray(tensors.pop(prefix + "attn.c_attn.weight"))
    for name, columns in zip(("q_proj", "k_proj", "v_proj"), np.split(c_attn, 3, axis=1)):
      out[f"h_{i}/attn/{name}"] = columns.T.reshape(num_heads, head_dim, width)
    out[f"h_{i}/attn/c_proj"] = np.asarray(tensors.pop(prefix + "attn.c_proj.weight")).reshape(
        num_heads, head_dim, width)
    for ours, theirs in _hf_block_names(i).items():
      out[ours] = tensors.pop(theirs)
  if tensors:
    raise ValueError(f"tensor `{sorted(tensors)[0]}` has no counterpart in igpt_jax's ImageGPT; "
                     "pass an ImageGPTForCausalImageModeling state dict.")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def load_hf(directory: str, **model_options: Any
            ) -> Tuple[models.ImageGPT, Dict[str, Params], np.ndarray]:
  """Loads a Hugging Face ImageGPT directory (`save_pretrained`, the Hub, or `export_hf`).

  Reads config.json, the weights (model.safetensors, a sharded model.safetensors.index.json, or
  pytorch_model.bin when torch is installed) and preprocessor_config.json's colour clusters.
  Everything is checked before any array is read: a file that does not fit (a config that does
  not describe the weights, a missing or extra tensor, a truncated file, no clusters, a nonzero
  Conv1D bias, a setting iGPT does not compute) raises ValueError with one sentence naming the key
  or file.

  Args:
    directory: the model directory.
    **model_options: other arguments of `igpt_jax.create_model` (dtype, param_dtype, dropout_rate,
      attention_implementation); the shape comes from config.json.

  Returns:
    (model, {"params": numpy tree in param_dtype, float32 by default: bit-identical to the file's
    float32 tensors}, clusters [num_clusters, 3] float32 in [-1, 1]). `model` is autoregressive,
    with num_classes > 0 when the file has ImageGPTForImageClassification's `score.weight`.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise ValueError(f"no directory at {directory}; pass a directory written by save_pretrained "
                     "or export_hf.")
  config = _read_hf_config(directory)
  tensors = _hf_tensors(directory)
  to_read = _plan_hf(tensors, config)
  image_size = _square_side(config["n_positions"], f"{os.path.join(directory, HF_CONFIG)}",
                            "iGPT models square images, so n_positions must be a square")
  num_clusters = config["vocab_size"] - 1
  clusters = _read_hf_clusters(directory, num_clusters, image_size)
  options = _model_options(model_options, ("width", "depth", "num_heads", "mlp_dim", "image_size",
                                           "num_clusters", "num_classes", "causal"), HF_CONFIG)
  model = models.create_model(
      "custom", width=config["n_embd"], depth=config["n_layer"], num_heads=config["n_head"],
      mlp_dim=config["n_inner"] or 4 * config["n_embd"], image_size=image_size,
      num_clusters=num_clusters, num_classes=tensors.shapes.get("score.weight", (0,))[0],
      causal=True, **options)
  arrays = {}
  for key in sorted(to_read, key=_layout_order):
    array = tensors.read(key)
    if key.endswith(".bias"):
      if np.any(array != 0):
        raise ValueError(f"`{key}` in {tensors.origin} is not zero (max |bias| "
                         f"{float(np.max(np.abs(array))):.3g}), but iGPT has no biases, so these "
                         "weights cannot be loaded without changing the model's outputs.")
      continue
    arrays[key] = array
  flat = from_hf(arrays, config["n_head"])
  return model, _cast_params(flat, model), clusters


# ------------------------------------------------------------------------------------------------
# Export


def _hf_config(model: models.ImageGPT) -> Dict[str, Any]:
  """The ImageGPTConfig of `model`: what ImageGPTForCausalImageModeling.from_pretrained reads."""
  config = {
      "architectures": ["ImageGPTForCausalImageModeling"],
      "model_type": "imagegpt",
      "vocab_size": model.num_clusters + 1,  # the last id is the start-of-sequence token
      "n_positions": model.seq_len,
      "n_embd": model.width,
      "n_layer": model.depth,
      "n_head": model.num_heads,
      "n_inner": model.mlp_dim,
      "activation_function": "quick_gelu",  # x * sigmoid(1.702 x), OpenAI's gelu2
      "layer_norm_epsilon": models.NORM_EPSILON,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False,
      "add_cross_attention": False,
      "tie_word_embeddings": False,  # wte has the start token's row, lm_head does not
      # Our dropout acts on embeddings and residual branches, never on attention weights.
      "embd_pdrop": model.dropout_rate,
      "resid_pdrop": model.dropout_rate,
      "attn_pdrop": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
  }
  if model.num_classes:
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(model.num_classes)}
  return config


def _hf_preprocessor(clusters: np.ndarray, image_size: int) -> Dict[str, Any]:
  """ImageGPTImageProcessor settings: resize, scale uint8 to [-1, 1], nearest cluster id."""
  return {
      "image_processor_type": "ImageGPTImageProcessor",
      # The shortest decimal that reads back as the same float32: exact and readable.
      "clusters": [[float(str(np.float32(c))) for c in row] for row in clusters],
      "do_color_quantize": True,
      "do_resize": True,
      "size": {"height": image_size, "width": image_size},
      "resample": 2,  # bilinear
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,  # (x / 255 - 0.5) / 0.5: the [-1, 1] range of the clusters
      "image_mean": [0.5, 0.5, 0.5],
      "image_std": [0.5, 0.5, 0.5],
  }


def _checked_clusters(clusters: Any, num_clusters: int) -> np.ndarray:
  clusters = np.asarray(clusters)
  if (clusters.shape != (num_clusters, 3) or not np.issubdtype(clusters.dtype, np.floating)
      or not np.all(np.isfinite(clusters))):
    raise ValueError(f"clusters must be the model's palette, finite float [{num_clusters}, 3], "
                     f"got {clusters.dtype} {clusters.shape}; pass igpt_jax.load_palette(...).")
  return clusters.astype(np.float32)


def _export_checks(model: models.ImageGPT) -> None:
  if not model.causal:
    raise ValueError("Hugging Face's ImageGPT is autoregressive only, so a BERT model "
                     "(causal=False) cannot be exported to it; export an autoregressive model.")


def export_hf(model: models.ImageGPT, variables: Any, directory: str, clusters: Any, *,
              overwrite: bool = False) -> str:
  """Writes an ImageGPTForCausalImageModeling directory: config.json, model.safetensors (float32,
  torch layout) and preprocessor_config.json with the clusters.

  Args:
    model: the (autoregressive) model the variables belong to.
    variables: {"params": ...} or the params tree (boxed or not, sharded or not; bfloat16 params
      widen exactly to float32).
    directory: destination. Everything is written to a temporary sibling directory that is renamed
      into place only when complete, so a failure never leaves a partial export.
    clusters: [num_clusters, 3] float in [-1, 1], the palette the model was trained with.
    overwrite: replace an existing non-empty directory (its old contents are removed only after
      the new directory is in place); without it such a directory is refused.

  Returns:
    The absolute directory path. `from_pretrained(directory)` loads it; a model with a classifier
    also loads into ImageGPTForImageClassification (`score.weight`). In a multi-process run every
    process must call this (sharded arrays are gathered); process 0 writes.
  """
  _export_checks(model)
  clusters = _checked_clusters(clusters, model.num_clusters)
  flat = _model_params(model, variables, "the variables",
                       "pass the variables of this model (model.init or load_hf)")
  tensors = to_hf(flat)
  config = _hf_config(model)
  preprocessor = _hf_preprocessor(clusters, model.image_size)

  def write(temporary: str) -> None:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    # "format": "pt" tells Hugging Face loaders the tensors are laid out for PyTorch modules.
    safetensors_numpy.save_file(tensors, os.path.join(temporary, HF_WEIGHTS),
                                metadata={"format": "pt"})
    for name, content in ((HF_CONFIG, config), (HF_PREPROCESSOR, preprocessor)):
      with open(os.path.join(temporary, name), "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write("\n")

  return _write_directory(directory, write, overwrite)


def export_hf_from_checkpoint(workdir: str, model: models.ImageGPT, directory: str,
                              clusters: Any, *, step: Optional[int] = None,
                              overwrite: bool = False) -> str:
  """`export_hf` of the params in a workdir's Orbax checkpoint (latest, or `step`).

  Args:
    workdir: a training run's --workdir (checkpoints under `<workdir>/checkpoints/<step>`),
      written on any mesh; it is only read.
    model: the model the run trained; its shapes are checked against the checkpoint's.
    directory, clusters, overwrite: as for `export_hf`.

  Returns:
    The absolute directory path written.
  """
  from common_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  _export_checks(model)
  _checked_clusters(clusters, model.num_clusters)
  if not os.path.isdir(os.path.join(os.fspath(workdir), "checkpoints")):
    raise ValueError(f"--workdir {workdir} holds no checkpoints directory; train first or point "
                     "--workdir at a training run.")
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"--workdir {workdir} holds no checkpoint yet; train first or point "
                       "--workdir at a training run that saved one.")
    params = checkpointer.read_numpy(step)["params"]
  finally:
    checkpointer.close()
  origin = f"the checkpoint at step {step} in {workdir}"
  flat = _model_params(model, params, origin, "build the model with the config the run was "
                       "trained with")
  return export_hf(model, {"params": unflatten(flat)}, directory, clusters, overwrite=overwrite)


def _write_directory(directory: str, write: Callable[[str], None], overwrite: bool) -> str:
  """Runs `write(temporary_directory)` next to `directory`, then renames the result into place.

  On any failure the temporary directory is removed and `directory` is left as it was.
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
# OpenAI's TensorFlow checkpoints


def _openai_candidates(key: str) -> Tuple[str, ...]:
  """Our flat name -> the checkpoint names it may have (OpenAI's scopes; `/w` where conv1d)."""
  if key == "clf":
    return ("model/clf/wclf", "model/clf/w")
  name = "model/" + re.sub(r"^h_(\d+)/", r"h\1/", key)
  if "/mlp/" in name:
    return (name + "/w", name)
  return (name, name + "/w")


def _drop_leading_ones(shape: Shape, ndim: int) -> Shape:
  while len(shape) > ndim and shape[0] == 1:
    shape = shape[1:]
  return shape


def _openai_shape(source: _Tensors, name: str, ndim: int) -> Shape:
  """A variable's shape with conv1d's leading singleton axes dropped."""
  return _drop_leading_ones(tuple(source.shapes[name]), ndim)


def _find(source: _Tensors, key: str) -> Optional[str]:
  for name in _openai_candidates(key):
    if name in source.shapes:
      return name
  return None


def _load_openai_source(source: _Tensors, variant: Optional[str], image_size: Optional[int],
                        model_options: Dict[str, Any]) -> Tuple[models.ImageGPT, Dict[str, Params]]:
  """Infers the shape from the checkpoint, checks it, and reads every variable into the model."""
  origin = source.origin
  for key in ("wte", "wpe", "h_0/attn/q_proj", "h_0/mlp/c_fc"):
    if _find(source, key) is None:
      raise ValueError(f"{origin} has no `{_openai_candidates(key)[0]}`; pass a checkpoint of "
                       "OpenAI's image-gpt model (variables under the `model/` scope).")
  num_clusters, width = _openai_shape(source, _find(source, "wte"), 2)
  positions = _openai_shape(source, _find(source, "wpe"), 2)[0]
  heads_shape = _openai_shape(source, _find(source, "h_0/attn/q_proj"), 3)
  if len(heads_shape) != 3:
    raise ValueError(f"`model/h0/attn/q_proj` has shape {heads_shape} in {origin}, not OpenAI's "
                     "[heads, head_dim, width]; pass a checkpoint of OpenAI's image-gpt model.")
  blocks = {int(m.group(1)) for name in source.shapes for m in [re.match(r"model/h(\d+)/", name)]
            if m}
  depth = max(blocks) + 1
  inferred = dict(width=width, depth=depth, num_heads=heads_shape[0],
                  mlp_dim=_openai_shape(source, _find(source, "h_0/mlp/c_fc"), 2)[-1])
  side = _square_side(positions, f"`model/wpe` in {origin}",
                      "pass a checkpoint of a square-image model")
  if image_size is not None and image_size != side:
    raise ValueError(f"image_size={image_size} but `model/wpe` in {origin} has {positions} rows "
                     f"({side}x{side} images); pass image_size={side} or leave it out.")
  overrides = {k: model_options.pop(k) for k in list(model_options) if k in inferred}
  if variant is None:
    expected, asked = dict(inferred, **overrides), "the model options"
  else:
    expected = dataclasses.asdict(models.resolve_spec(variant, **overrides))
    asked = f"variant {variant!r}" + (f" with {overrides}" if overrides else "")
  for field, value in inferred.items():
    if expected[field] != value:
      raise ValueError(f"{asked} means {field}={expected[field]} but {origin} hold(s) "
                       f"{field}={value}; pass the variant the checkpoint was trained as, or "
                       "none (the shape is read from the checkpoint).")
  clf = _find(source, "clf")
  options = _model_options(model_options, ("image_size", "num_clusters", "num_classes", "causal"),
                           origin)
  model = models.create_model(
      "custom", image_size=side, num_clusters=num_clusters,
      num_classes=_openai_shape(source, clf, 2)[0] if clf else 0,
      # OpenAI's BERT models have no start-of-image vector.
      causal="model/sos" in source.shapes, **inferred, **options)

  target = flatten(models.abstract_variables(model)["params"])
  names = {}
  for key in sorted(target, key=_layout_order):
    want = tuple(target[key].shape)
    name = _find(source, key)
    if name is None:
      raise ValueError(f"{origin} has no `{_openai_candidates(key)[0]}` {want}, which a "
                       f"{depth}-layer model needs; pass a complete checkpoint.")
    have = _openai_shape(source, name, len(want))
    if have != want:
      raise ValueError(f"`{name}` has shape {tuple(source.shapes[name])} in {origin} but the "
                       f"model it describes (wte, wpe, h0) expects {want}; pass an unmodified "
                       "checkpoint.")
    names[key] = name
  used = set(names.values())
  biases = []
  for name in sorted(source.shapes, key=_layout_order):
    if name in used or not name.startswith("model/") or _TF_BOOKKEEPING.search(name):
      continue
    if name.endswith("/b"):
      biases.append(name)  # GPT-2-style conv1d bias: allowed only when zero (checked below)
      continue
    raise ValueError(f"{origin} holds `{name}` {tuple(source.shapes[name])}, which iGPT does not "
                     "have; pass a checkpoint of OpenAI's image-gpt model.")
  for name in biases:
    array = source.read(name)
    if np.any(array != 0):
      raise ValueError(f"`{name}` in {origin} is not zero, but iGPT has no biases, so this "
                       "checkpoint cannot be loaded without changing the model's outputs.")
  flat = {key: np.asarray(source.read(name)).reshape(target[key].shape)
          for key, name in names.items()}
  return model, _cast_params(flat, model)


def load_openai_arrays(arrays: Mapping[str, Any], variant: Optional[str] = None, *,
                       image_size: Optional[int] = None, clusters: Any = None,
                       origin: str = "the arrays", **model_options: Any
                       ) -> Tuple[models.ImageGPT, Dict[str, Params], Optional[np.ndarray]]:
  """`load_openai` from {OpenAI variable name: array} already in memory (e.g. an `.npz` of them).

  Same arguments, checks and result as `load_openai`; `clusters` is the palette itself
  ([num_clusters, 3]) or None.
  """
  shapes = {name: tuple(np.shape(value)) for name, value in arrays.items()}
  source = _Tensors(origin, shapes, lambda name: np.asarray(arrays[name]))
  model, variables = _load_openai_source(source, variant, image_size, dict(model_options))
  if clusters is not None:
    clusters = _checked_clusters(clusters, model.num_clusters)
  return model, variables, clusters


def load_openai(checkpoint_prefix: str, variant: Optional[str] = None, *,
                image_size: Optional[int] = None, clusters_path: Optional[str] = None,
                **model_options: Any
                ) -> Tuple[models.ImageGPT, Dict[str, Params], Optional[np.ndarray]]:
  """Loads one of OpenAI's image-gpt TensorFlow checkpoints (needs `pip install tensorflow`).

  The variables are read with `tf.train.load_checkpoint(checkpoint_prefix).get_tensor(name)`:
  `model/wte`, `model/wpe`, `model/sos` (absent in BERT models, which load as causal=False),
  `model/h{i}/{ln_1,ln_2}/g`, `model/h{i}/attn/{q,k,v,c}_proj` [heads, head_dim, width],
  `model/h{i}/mlp/{c_fc,c_proj}/w`, `model/ln_f/g`, `model/wtet` and, when fine-tuned,
  `model/clf/wclf`. Optimiser slots (Adam, Adam_1, ...) and counters are skipped; any other
  variable, or a nonzero `.../b` bias, is refused with its name.

  Args:
    checkpoint_prefix: e.g. ".../model.ckpt-1000000" (the prefix of .index/.data-* files).
    variant: optional "S", "M", "L" or "XL"; the shape is read from the checkpoint (width from
      wte, heads from q_proj, depth from h{i}, mlp_dim from c_fc) and must then agree with it.
      Shape overrides (`width`, `depth`, `num_heads`, `mlp_dim`) in model_options are checked
      the same way.
    image_size: optional; read from `model/wpe` (image_size**2 rows) and checked when given.
    clusters_path: OpenAI's `kmeans_centers.npy` (or any palette .npy); None returns no clusters.
    **model_options: dtype, param_dtype, dropout_rate, attention_implementation.

  Returns:
    (model, {"params": numpy tree in param_dtype}, clusters [num_clusters, 3] float32 or None).
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("load_openai reads TensorFlow checkpoints and TensorFlow is not installed; "
                      "pip install tensorflow (the CPU build is enough).") from None
  checkpoint_prefix = os.fspath(checkpoint_prefix)
  try:
    reader = tf.train.load_checkpoint(checkpoint_prefix)
    shapes = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
  except Exception as error:  # pylint: disable=broad-except  # TF raises several error types
    raise ValueError(f"{checkpoint_prefix} cannot be read as a TensorFlow checkpoint "
                     f"({_detail(error)}); pass the prefix of its .index and .data files."
                     ) from None
  source = _Tensors(checkpoint_prefix, shapes, reader.get_tensor)
  model, variables = _load_openai_source(source, variant, image_size, dict(model_options))
  clusters = None
  if clusters_path is not None:
    clusters = palette_lib.load_palette(clusters_path, model.num_clusters)
  return model, variables, clusters
