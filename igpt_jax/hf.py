"""iGPT weights as Hugging Face's `ImageGPT` names them: `save_pretrained` directories.

    from igpt_jax import hf, quantize
    model, variables, clusters = hf.load_hf("imagegpt-small")  # a save_pretrained directory
    logits = model.apply(variables, quantize(images, clusters).reshape(len(images), -1))
    hf.export_hf(model, variables, "/tmp/igpt-hf", clusters)
    # ImageGPTForCausalImageModeling.from_pretrained("/tmp/igpt-hf") now loads it.
    hf.export_hf_from_checkpoint("workdirs/igpt", model, "/tmp/igpt-hf", clusters)

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
The JSON files (config.json, preprocessor_config.json) are igpt_jax.hf_config's.
"""

import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from common_jax import trees
from common_jax import weights
from igpt_jax import hf_config
from igpt_jax import models
from igpt_jax import pretrained

Params = Any
Flat = Dict[str, np.ndarray]
Shape = Tuple[int, ...]
Names = Tuple[Tuple[str, str], ...]

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
# Our names -> Hugging Face's, outside the blocks (wte and sos share transformer.wte.weight).
_HF_NAMES = (("wpe", "transformer.wpe.weight"), ("ln_f/g", "transformer.ln_f.weight"),
             ("wtet", "lm_head.weight"), ("clf", "score.weight"))
_CLASSIFIER = ("clf", "score.weight")  # present only in a model with num_classes > 0
# Causal-mask buffers that older transformers versions saved with the weights; not parameters.
_HF_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def _hf_block_names(i: int) -> Names:
  """(our block-i name, Hugging Face name) of the parameters that map one to one."""
  return ((f"h_{i}/ln_1/g", f"transformer.h.{i}.ln_1.weight"),
          (f"h_{i}/ln_2/g", f"transformer.h.{i}.ln_2.weight"),
          (f"h_{i}/mlp/c_fc", f"transformer.h.{i}.mlp.c_fc.weight"),
          (f"h_{i}/mlp/c_proj", f"transformer.h.{i}.mlp.c_proj.weight"))


def _swapped(names: Names) -> Names:
  return tuple((theirs, ours) for ours, theirs in names)


def _move(source: Dict[str, Any], destination: Dict[str, Any], names: Names) -> None:
  """destination[new] = source.pop(old) for each (old, new); only a classifier may be absent."""
  for old, new in names:
    if old in source or old not in _CLASSIFIER:
      destination[new] = source.pop(old)


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


def _hf_tensors(directory: str) -> weights.Tensors:
  """The weights of a model directory: model.safetensors, its shards, or pytorch_model.bin."""
  if os.path.isfile(os.path.join(directory, HF_WEIGHTS)):
    return weights.read_safetensors([os.path.join(directory, HF_WEIGHTS)])
  index = os.path.join(directory, HF_INDEX)
  if os.path.isfile(index):
    weight_map = hf_config.read_json(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
      raise ValueError(f"{index} has no `weight_map`; save the model again.")
    paths = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    for path in paths:
      if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist (listed by {HF_INDEX}); download the missing "
                         "shard or save the model again.")
    return weights.read_safetensors(paths, origin=paths[0] if len(paths) == 1 else index)
  if os.path.isfile(os.path.join(directory, HF_TORCH_WEIGHTS)):
    return weights.read_torch(os.path.join(directory, HF_TORCH_WEIGHTS))
  raise ValueError(f"{directory} has no {HF_WEIGHTS}, {HF_INDEX} or {HF_TORCH_WEIGHTS}; pass a "
                   "directory written by save_pretrained or export_hf.")


def _plan_hf(tensors: weights.Tensors, config: Dict[str, Any]) -> Dict[str, Shape]:
  """Checks the file's tensor shapes against config.json (headers only); returns what to read."""
  origin, shapes = tensors.origin, tensors.shapes
  if "transformer.wte.weight" not in shapes and "wte.weight" in shapes:
    raise ValueError(f"{origin} holds an ImageGPTModel (no `transformer.` prefix, no lm_head); "
                     "save an ImageGPTForCausalImageModeling instead.")
  score = shapes.get("score.weight")
  expected = _hf_shapes(config, score[0] if score else 0)

  def expected_by(key: str) -> str:
    if key in expected:
      return f"{hf_config.HF_CONFIG} ({hf_config.fields_of(key, config)})"
    return f"an ImageGPT built from {hf_config.HF_CONFIG} (n_layer={config['n_layer']})"

  trees.check_names_and_shapes(
      {k: v for k, v in shapes.items() if not _HF_BUFFER.match(k)}, expected, origin,
      fix=f"fix {hf_config.HF_CONFIG} to describe these weights, or use the weights it was "
      "written with", expected_by=expected_by, order=pretrained.ORDER,
      # A missing Conv1D bias means zero, which is what iGPT computes.
      may_be_missing=lambda key: key.endswith(".bias"))
  return {k: v for k, v in expected.items() if k in shapes}


def to_hf(params: Params) -> Flat:
  """Our params (an autoregressive model's) -> Hugging Face ImageGPT state dict.

  Args:
    params: the params tree (nested or flat "/"-keys, boxed or not) of a causal ImageGPT, with
      or without scan_layers.

  Returns:
    {Hugging Face name: float32 contiguous numpy array}, Conv1D biases as zeros and `score.weight`
    when the model has a classifier (see the module docstring for the layout).
  """
  flat = {k: np.asarray(trees.to_host(v), np.float32)
          for k, v in trees.flatten(trees.params_of(params)).items()}
  flat = trees.unstack_layers(flat, pretrained.BLOCKS)  # a scan_layers model's stacked blocks
  if "sos" not in flat:
    raise ValueError("the params have no `sos`: Hugging Face's ImageGPT is autoregressive, so "
                     "only causal=True models can be exported.")
  width = flat["wte"].shape[1]
  out = {"transformer.wte.weight": np.concatenate([flat.pop("wte"), flat.pop("sos")[None]])}
  _move(flat, out, _HF_NAMES)
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
    _move(flat, out, _hf_block_names(i))
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
  out = {"wte": wte[:-1], "sos": wte[-1]}
  _move(tensors, out, _swapped(_HF_NAMES))
  depth = len({k.split(".")[2] for k in tensors if k.startswith("transformer.h.")})
  for i in range(depth):
    prefix = f"transformer.h.{i}."
    c_attn = np.asarray(tensors.pop(prefix + "attn.c_attn.weight"))
    for name, columns in zip(("q_proj", "k_proj", "v_proj"), np.split(c_attn, 3, axis=1)):
      out[f"h_{i}/attn/{name}"] = columns.T.reshape(num_heads, head_dim, width)
    out[f"h_{i}/attn/c_proj"] = np.asarray(tensors.pop(prefix + "attn.c_proj.weight")).reshape(
        num_heads, head_dim, width)
    _move(tensors, out, _swapped(_hf_block_names(i)))
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
      attention_implementation, scan_layers, remat_policy); the shape comes from config.json.

  Returns:
    (model, {"params": numpy tree in param_dtype, float32 by default: bit-identical to the file's
    float32 tensors}, clusters [num_clusters, 3] float32 in [-1, 1]). `model` is autoregressive,
    with num_classes > 0 when the file has ImageGPTForImageClassification's `score.weight`.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise ValueError(f"no directory at {directory}; pass a directory written by save_pretrained "
                     "or export_hf.")
  config = hf_config.read_config(directory)
  tensors = _hf_tensors(directory)
  to_read = _plan_hf(tensors, config)
  image_size = pretrained.square_side(
      config["n_positions"], os.path.join(directory, hf_config.HF_CONFIG),
      "iGPT models square images, so n_positions must be a square")
  num_clusters = config["vocab_size"] - 1
  clusters = hf_config.read_clusters(directory, num_clusters, image_size)
  options = pretrained.model_options(
      model_options, ("width", "depth", "num_heads", "mlp_dim", "image_size", "num_clusters",
                      "num_classes", "causal"), hf_config.HF_CONFIG)
  model = models.create_model(
      "custom", width=config["n_embd"], depth=config["n_layer"], num_heads=config["n_head"],
      mlp_dim=config["n_inner"] or 4 * config["n_embd"], image_size=image_size,
      num_clusters=num_clusters, num_classes=tensors.shapes.get("score.weight", (0,))[0],
      causal=True, **options)
  arrays = {}
  for key in sorted(to_read, key=pretrained.ORDER):
    array = tensors.read(key)
    if key.endswith(".bias"):
      if np.any(array != 0):
        raise ValueError(f"`{key}` in {tensors.origin} is not zero (max |bias| "
                         f"{float(np.max(np.abs(array))):.3g}), but iGPT has no biases, so these "
                         "weights cannot be loaded without changing the model's outputs.")
      continue
    arrays[key] = array
  flat = from_hf(arrays, config["n_head"])
  return model, pretrained.cast_params(flat, model), clusters


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
  clusters = pretrained.checked_clusters(clusters, model.num_clusters)
  flat = pretrained.model_params(model, variables, "the variables",
                                 "pass the variables of this model (model.init or load_hf)")
  tensors = to_hf(flat)
  config = hf_config.config_of(model)
  preprocessor = hf_config.preprocessor_of(clusters, model.image_size)

  def write(temporary: str) -> None:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    # "format": "pt" tells Hugging Face loaders the tensors are laid out for PyTorch modules.
    safetensors_numpy.save_file(tensors, os.path.join(temporary, HF_WEIGHTS),
                                metadata={"format": "pt"})
    hf_config.write_json(os.path.join(temporary, hf_config.HF_CONFIG), config)
    hf_config.write_json(os.path.join(temporary, hf_config.HF_PREPROCESSOR), preprocessor)

  return weights.write_directory(directory, write, overwrite=overwrite)


def export_hf_from_checkpoint(workdir: str, model: models.ImageGPT, directory: str,
                              clusters: Any, *, step: Optional[int] = None,
                              overwrite: bool = False) -> str:
  """`export_hf` of the params in a workdir's Orbax checkpoint (latest, or `step`).

  Args:
    workdir: a training run's --workdir (checkpoints under `<workdir>/checkpoints/<step>`),
      written on any mesh; it is only read, and only its parameters.
    model: the model the run trained; its shapes are checked against the checkpoint's before any
      array is read.
    directory, clusters, overwrite: as for `export_hf`.

  Returns:
    The absolute directory path written.
  """
  _export_checks(model)
  pretrained.checked_clusters(clusters, model.num_clusters)
  params = pretrained.read_checkpoint_params(workdir, model, step)
  return export_hf(model, {"params": params}, directory, clusters, overwrite=overwrite)
