"""The JSON files of a Hugging Face ImageGPT directory: config.json (the model's shape and the
settings iGPT must match) and preprocessor_config.json (the colour clusters), read and written.

The weights themselves are igpt_jax.hf's.
"""

import json
import math
import os
from typing import Any, Dict, Mapping

import numpy as np

from common_jax import weights
from igpt_jax import blocks
from igpt_jax import models

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


def read_json(path: str) -> Dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      content = json.load(f)
  except (OSError, ValueError) as error:
    raise ValueError(f"{path} is not readable JSON ({weights.error_detail(error)}); save the "
                     "model again.") from None
  if not isinstance(content, dict):
    raise ValueError(f"{path} holds a JSON {type(content).__name__}, not an object; save the "
                     "model again.")
  return content


def read_config(directory: str) -> Dict[str, Any]:
  """config.json with ImageGPTConfig's defaults filled in, checked against what iGPT computes."""
  path = os.path.join(directory, HF_CONFIG)
  if not os.path.isfile(path):
    raise ValueError(f"{directory} has no {HF_CONFIG}; pass a directory written by "
                     "save_pretrained or export_hf.")
  stored = read_json(path)
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
      or not math.isclose(epsilon, blocks.NORM_EPSILON, rel_tol=1e-6)):
    raise ValueError(f"{path} has layer_norm_epsilon={config['layer_norm_epsilon']!r} but iGPT's "
                     f"norm uses {blocks.NORM_EPSILON}; only OpenAI-architecture ImageGPT models "
                     "can be loaded.")
  return config


def fields_of(key: str, config: Dict[str, Any]) -> str:
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


def read_clusters(directory: str, num_clusters: int, image_size: int) -> np.ndarray:
  """preprocessor_config.json's `clusters` -> [num_clusters, 3] float32, checked."""
  path = os.path.join(directory, HF_PREPROCESSOR)
  fix = (f"write the model's colour palette there as `clusters` ([{num_clusters}, 3] in [-1, 1], "
         "e.g. with export_hf)")
  if not os.path.isfile(path):
    raise ValueError(f"{directory} has no {HF_PREPROCESSOR}, which holds the colour clusters; "
                     f"{fix}.")
  stored = read_json(path)
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


def config_of(model: models.ImageGPT) -> Dict[str, Any]:
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
      "layer_norm_epsilon": blocks.NORM_EPSILON,
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


def preprocessor_of(clusters: np.ndarray, image_size: int) -> Dict[str, Any]:
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


def write_json(path: str, content: Dict[str, Any]) -> None:
  """Writes `content` as indented JSON with sorted keys, as save_pretrained does."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(content, f, indent=2, sort_keys=True)
    f.write("\n")
