"""iGPT weights from OpenAI's image-gpt TensorFlow checkpoints (github.com/openai/image-gpt).

    from igpt_jax import openai
    model, variables, clusters = openai.load_openai(
        "model.ckpt-1000000", clusters_path="kmeans_centers.npy")  # needs TensorFlow

Our parameter names are OpenAI's, under their `model/` scope: `h_{i}/...` is `model/h{i}/...`,
the MLP weights carry a `/w` leaf, `clf` is `model/clf/wclf`. OpenAI's conv1d weights may carry a
leading [1, ...] axis (GPT-2's layout); leading singleton axes are dropped on import. Optimiser
slots and counters are skipped; a GPT-2-style conv1d bias is accepted only when it is zero.
"""

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from common_jax import trees
from common_jax import weights
from igpt_jax import models
from igpt_jax import palette as palette_lib
from igpt_jax import pretrained

Params = Any
Shape = Tuple[int, ...]

# TensorFlow bookkeeping next to the weights (optimiser slots, step counters): not parameters.
_TF_BOOKKEEPING = re.compile(r"(^|/)(Adam(_\d+)?|Momentum|ExponentialMovingAverage|beta[12]_power|"
                             r"global_step|_step)$")


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


def _openai_shape(source: weights.Tensors, name: str, ndim: int) -> Shape:
  """A variable's shape with conv1d's leading singleton axes dropped."""
  return _drop_leading_ones(tuple(source.shapes[name]), ndim)


def _find(source: weights.Tensors, key: str) -> Optional[str]:
  for name in _openai_candidates(key):
    if name in source.shapes:
      return name
  return None


def _load_openai_source(source: weights.Tensors, variant: Optional[str], image_size: Optional[int],
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
  side = pretrained.square_side(positions, f"`model/wpe` in {origin}",
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
  options = pretrained.model_options(
      model_options, ("image_size", "num_clusters", "num_classes", "causal"), origin)
  model = models.create_model(
      "custom", image_size=side, num_clusters=num_clusters,
      num_classes=_openai_shape(source, clf, 2)[0] if clf else 0,
      # OpenAI's BERT models have no start-of-image vector.
      causal="model/sos" in source.shapes, **inferred, **options)

  # Per block, as OpenAI stores them (cast_params stacks them for a scan_layers model).
  target = trees.unstack_shapes(trees.flat_shapes(models.abstract_variables(model)["params"]),
                                pretrained.BLOCKS)
  # The check runs under OpenAI's names: ours -> the checkpoint's name for it.
  names = {key: _find(source, key) or _openai_candidates(key)[0] for key in target}
  expected = {names[key]: shape for key, shape in target.items()}
  stored, biases = {}, []
  for name, shape in source.shapes.items():
    if not name.startswith("model/") or _TF_BOOKKEEPING.search(name):
      continue
    if name.endswith("/b") and name not in expected:
      biases.append(name)  # GPT-2-style conv1d bias: allowed only when zero (checked below)
    elif name in expected:
      stored[name] = _drop_leading_ones(tuple(shape), len(expected[name]))
    else:
      stored[name] = tuple(shape)
  trees.check_names_and_shapes(
      stored, expected, origin, order=pretrained.ORDER,
      fix="pass a complete, unmodified checkpoint of OpenAI's image-gpt model",
      expected_by=lambda name: f"a {depth}-layer model" if name in expected else "iGPT")
  for name in sorted(biases, key=pretrained.ORDER):
    if np.any(source.read(name) != 0):
      raise ValueError(f"`{name}` in {origin} is not zero, but iGPT has no biases, so this "
                       "checkpoint cannot be loaded without changing the model's outputs.")
  flat = {key: np.asarray(source.read(name)).reshape(target[key]) for key, name in names.items()}
  return model, pretrained.cast_params(flat, model)


def load_openai_arrays(arrays: Mapping[str, Any], variant: Optional[str] = None, *,
                       image_size: Optional[int] = None, clusters: Any = None,
                       origin: str = "the arrays", **model_options: Any
                       ) -> Tuple[models.ImageGPT, Dict[str, Params], Optional[np.ndarray]]:
  """`load_openai` from {OpenAI variable name: array} already in memory (e.g. an `.npz` of them).

  Same arguments, checks and result as `load_openai`; `clusters` is the palette itself
  ([num_clusters, 3]) or None.
  """
  source = weights.Tensors.from_arrays(arrays, origin)
  model, variables = _load_openai_source(source, variant, image_size, dict(model_options))
  if clusters is not None:
    clusters = pretrained.checked_clusters(clusters, model.num_clusters)
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
    **model_options: dtype, param_dtype, dropout_rate, attention_implementation, scan_layers,
      remat_policy.

  Returns:
    (model, {"params": numpy tree in param_dtype}, clusters [num_clusters, 3] float32 or None).
  """
  source = weights.read_tf_checkpoint(checkpoint_prefix)
  model, variables = _load_openai_source(source, variant, image_size, dict(model_options))
  clusters = None
  if clusters_path is not None:
    clusters = palette_lib.load_palette(clusters_path, model.num_clusters)
  return model, variables, clusters
