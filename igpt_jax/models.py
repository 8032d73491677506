"""Image GPT (Chen et al., 2020) as pure Flax modules, following OpenAI's `image-gpt/src/model.py`.

Architecture (exactly OpenAI's):
  * input: cluster ids [batch, length] (length = image_size**2, raster order);
  * autoregressive (`causal=True`): token embeddings shifted right by one with a learned
    start-of-image vector `sos` in front, so output position t predicts token t from tokens < t;
    BERT (`causal=False`): no shift and no `sos`; embeddings of `masked` positions are zeroed and
    attention sees the whole sequence (OpenAI's `hparams.bert`);
  * learned position embeddings `wpe` added in both cases;
  * pre-norm GPT-2 blocks: x + attn(norm(x)), then x + mlp(norm(x)); the norm divides by the RMS
    over features (no mean subtraction, gain `g` only, eps 1e-5); activation x * sigmoid(1.702 x);
    no biases anywhere;
  * a final norm `ln_f` and an untied output projection `wtet`: logits = ln_f(h) @ wtet.T.

Parameters, with OpenAI's names and layouts (their `h{i}` is Flax's `h_{i}`, their `.../w` is the
parameter itself) and initialisation:

  wte  [vocab, embed]  normal(0.02)        wpe   [length, embed]  normal(0.01)
  sos  [embed]         normal(0.02)        wtet  [vocab, embed]   zeros (OpenAI: stddev 0.0)
  h_{i}/ln_1/g, h_{i}/ln_2/g, ln_f/g  [embed]  ones
  h_{i}/attn/{q,k,v}_proj  [heads, head_dim, embed]  normal(1/sqrt(width))
  h_{i}/attn/c_proj        [heads, head_dim, embed]  normal(1/sqrt(width * depth))
  h_{i}/mlp/c_fc           [embed, mlp]              normal(0.02)
  h_{i}/mlp/c_proj         [mlp, embed]              normal(0.02)
  clf  [classes, embed]  zeros (only with num_classes > 0; OpenAI's clf/wclf, no bias)

Representations for linear probes are the mean over positions of the normalised input of a block
(`features`); the same module offers a KV-cache prefill and a single-token decode step for
`igpt_jax.sampling`.

With `scan_layers=True` the blocks are one scanned block (`igpt_jax.blocks.BlockStack`): their
parameters are stacked along a leading axis (logical name "layers") under `h/...` instead of
`h_{i}/...`, e.g. `h/attn/q_proj` [depth, heads, head_dim, embed]; the weights layer converts
between the two layouts (`common_jax.trees.stack_layers`). The training forward pass (`__call__`,
`classify`) scans; `features`, `prefill` and `decode_step` run the blocks one by one on slices
of the stacked parameters. `remat_policy` applies to the training forward pass only.
"""

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax import layers
from igpt_jax.blocks import Block, BlockStack, Cache, RMSNorm, to_cache_layout

Dtype = Any
# The paper's models (Table 1 / OpenAI's README). XL's head count is not published; 16 is ours.
SIZES = {
    "S": dict(width=512, depth=24, num_heads=8),
    "M": dict(width=1024, depth=36, num_heads=8),
    "L": dict(width=1536, depth=48, num_heads=16),
    "XL": dict(width=3072, depth=60, num_heads=16),
}


class ImageGPT(nn.Module):
  """iGPT over colour-cluster ids.

  `__call__(ids, masked=None, train=False)`: ids [batch, length] int (length <= image_size**2)
  -> logits [batch, length, num_clusters] float32. Other entry points (use with
  `apply(..., method=...)`): `features` (linear-probe representations), `classify` (fine-tuning),
  `prefill` and `decode_step` (KV-cache sampling).
  """
  num_clusters: int
  image_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_classes: int = 0
  causal: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None
  scan_layers: bool = False
  remat_policy: str = "none"

  @property
  def seq_len(self) -> int:
    """Number of positions: image_size**2."""
    return self.image_size * self.image_size

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def setup(self):
    def param(name, init, shape, axes):
      return self.param(name, layers.param_with_axes(init, axes), shape, self.param_dtype)

    normal = nn.initializers.normal
    self.wte = param("wte", normal(0.02), (self.num_clusters, self.width), ("vocab", "embed"))
    self.wpe = param("wpe", normal(0.01), (self.seq_len, self.width), (None, "embed"))
    if self.causal:
      self.sos = param("sos", normal(0.02), (self.width,), ("embed",))
    block = dict(width=self.width, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                 depth=self.depth, causal=self.causal, dropout_rate=self.dropout_rate,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 attention_implementation=self.attention_implementation)
    if self.scan_layers:  # one module `h`; indexing or iterating it gives per-block views
      self.h = BlockStack(remat_policy=self.remat_policy, **block)
    else:
      self.h = [Block(**block) for _ in range(self.depth)]
    self.ln_f = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype)
    self.wtet = param("wtet", nn.initializers.zeros, (self.num_clusters, self.width),
                      ("vocab", "embed"))
    if self.num_classes:
      self.clf = param("clf", nn.initializers.zeros, (self.num_classes, self.width),
                       ("classes", "embed"))
    self.dropout = layers.Dropout(rate=self.dropout_rate)

  # ---------------------------------------------------------------------------------------------
  # Pieces

  def _check_inputs(self, ids: jax.Array, masked: Optional[jax.Array]) -> None:
    if ids.ndim != 2:
      raise ValueError(f"iGPT takes cluster ids [batch, length], got shape {ids.shape}; quantize "
                       "images with igpt_jax.quantize and reshape to [batch, height * width].")
    if ids.shape[1] > self.seq_len:
      raise ValueError(
          f"a sequence of {ids.shape[1]} tokens is longer than the model's {self.seq_len} "
          f"positions (image_size={self.image_size}); build the model with the image_size of "
          "the data (create_model(..., image_size=...)).")
    if masked is not None:
      if self.causal:
        raise ValueError("`masked` is the BERT objective's input, but this model is "
                         "autoregressive; build it with create_model(..., causal=False).")
      if masked.shape != ids.shape:
        raise ValueError(f"masked has shape {masked.shape} but ids have {ids.shape}; pass one "
                         "boolean per token.")

  def _embed(self, ids: jax.Array, masked: Optional[jax.Array], deterministic: bool) -> jax.Array:
    """ids [batch, length] -> block-0 input [batch, length, embed] in `dtype`."""
    self._check_inputs(ids, masked)
    batch, length = ids.shape
    h = jnp.take(self.wte, ids, axis=0).astype(self.dtype)
    if self.causal:
      # Shift right: position t sees sos, x_0 .. x_{t-1}.
      sos = jnp.broadcast_to(self.sos.astype(self.dtype), (batch, 1, self.width))
      h = jnp.concatenate([sos, h[:, :-1]], axis=1)
    elif masked is not None:
      h = jnp.where(masked[..., None], jnp.zeros_like(h), h)
    h = h + self.wpe[:length].astype(self.dtype)
    h = self.dropout(h, deterministic=deterministic)
    return layers.constrain(h, ("act_batch", "act_length", "act_embed"))

  def _logits(self, h: jax.Array) -> jax.Array:
    """Final-norm output [batch, length, embed] -> logits [batch, length, vocab] float32."""
    logits = jnp.einsum("bsf,vf->bsv", h, self.wtet.astype(self.dtype))
    return layers.constrain(logits, ("act_batch", "act_length", "act_vocab")).astype(jnp.float32)

  def _trunk(self, ids, masked, train) -> jax.Array:
    h = self._embed(ids, masked, deterministic=not train)
    if self.scan_layers:
      h = self.h(h, deterministic=not train)
    else:
      for block in self.h:
        h = layers.call_block(block, h, not train, remat_policy=self.remat_policy)
    return self.ln_f(h)

  def check_layer(self, layer: int) -> None:
    """Raises for a probe layer outside [0, depth]."""
    if not 0 <= layer <= self.depth:
      raise ValueError(f"probe layer {layer} is out of range; use 0..{self.depth} (0 = block 0's "
                       f"normalised input, {self.depth} = the final norm's output).")

  # ---------------------------------------------------------------------------------------------
  # Entry points

  def __call__(self, ids: jax.Array, *, masked: Optional[jax.Array] = None, train: bool = False,
               features_layer: Optional[int] = None) -> jax.Array:
    """Logits, or one layer's pooled features.

    Args:
      ids: [batch, length] int cluster ids, length <= image_size**2.
      masked: [batch, length] bool, BERT models only: True = input embedding zeroed.
      train: enables dropout (needs a "dropout" rng when dropout_rate > 0).
      features_layer: if set, return `features(ids, layers=[features_layer])[0]` instead, running
        only the blocks below that layer.

    Returns:
      logits [batch, length, num_clusters] float32 (position t predicts token t), or features
      [batch, width] float32.
    """
    if features_layer is not None:
      return self.features(ids, layers=(features_layer,), masked=masked, train=train)[0]
    return self._logits(self._trunk(ids, masked, train))

  def features(self, ids: jax.Array, *, layers: Optional[Sequence[int]] = None,
               masked: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """Linear-probe representations of several layers in one forward pass.

    Layer l < depth is block l's normalised input, ln_1(h_l); layer `depth` is ln_f's output.
    Each is averaged over positions. Blocks above the highest requested layer are not run (with
    scan_layers too: the blocks then run one by one on slices of the stacked parameters).

    Args:
      ids: [batch, length] int cluster ids.
      layers: layer numbers in [0, depth]; None = all depth + 1 of them.

    Returns:
      [len(layers), batch, width] float32.
    """
    layers = tuple(range(self.depth + 1)) if layers is None else tuple(int(l) for l in layers)
    if not layers:
      raise ValueError("features needs at least one layer; pass layers=None for all.")
    for layer in layers:
      self.check_layer(layer)
    pooled = {}
    h = self._embed(ids, masked, deterministic=not train)
    for i, block in enumerate(self.h[:max(layers)]):
      if i in layers:
        pooled[i] = jnp.mean(block.ln_1(h).astype(jnp.float32), axis=1)
      h, _ = block(h, deterministic=not train)
    top = max(layers)
    norm = self.ln_f if top == self.depth else self.h[top].ln_1
    pooled[top] = jnp.mean(norm(h).astype(jnp.float32), axis=1)
    return jnp.stack([pooled[l] for l in layers])

  def classify(self, ids: jax.Array, *, masked: Optional[jax.Array] = None,
               train: bool = False) -> Tuple[jax.Array, jax.Array]:
    """Fine-tuning forward pass (needs num_classes > 0).

    Returns:
      (generative logits [batch, length, num_clusters] float32,
       class logits [batch, num_classes] float32 = mean over positions of ln_f(h) @ clf.T).
    """
    if not self.num_classes:
      raise ValueError("classify needs a classifier; build the model with "
                       "create_model(..., num_classes=<number of classes>).")
    h = self._trunk(ids, masked, train)
    pooled = jnp.mean(h.astype(jnp.float32), axis=1)
    class_logits = pooled @ self.clf.astype(jnp.float32).T
    return self._logits(h), class_logits

  def prefill(self, prompt: jax.Array, positions: Optional[int] = None) -> Cache:
    """Keys and values of a prompt in one causal forward pass (autoregressive models).

    Args:
      prompt: [batch, prompt_len] int ids of the first prompt_len pixels (prompt_len may be 0).
      positions: cache size, prompt_len <= positions <= image_size**2 (None = image_size**2).
        `decode_step` attends over all of it (unfilled positions masked), so a sampler that
        starts small and grows it (`igpt_jax.sampling`) reads less per step.

    Returns:
      per layer (key, value), each [batch * heads, positions, head_dim] in `dtype` (row
      b * heads + n is sample b's head n; see `igpt_jax.blocks.Cache`), filled at positions <
      prompt_len and zero elsewhere: the pre-allocated cache for `decode_step`.
    """
    batch, prompt_len = prompt.shape
    positions = self.seq_len if positions is None else positions
    if not prompt_len <= positions <= self.seq_len:
      raise ValueError(f"a cache of {positions} positions cannot hold a prompt of {prompt_len} "
                       f"tokens in a model of {self.seq_len}; pass prompt_len <= positions <= "
                       f"{self.seq_len}.")
    shape = (batch * self.num_heads, positions, self.head_dim)
    if prompt_len == 0:
      return tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                   for _ in range(self.depth))
    # Positions 0..prompt_len-1 see sos, x_0 .. x_{prompt_len-2}; their keys and values are all
    # the cache needs (the next position's input, x_{prompt_len-1}, is fed by decode_step).
    h = self._embed(prompt, None, deterministic=True)
    cache = []
    for block in self.h:
      h, (key, value) = block(h)
      cache.append(tuple(to_cache_layout(x.astype(self.dtype), positions) for x in (key, value)))
    return tuple(cache)

  def decode_step(self, previous: jax.Array, index: jax.Array,
                  cache: Cache) -> Tuple[jax.Array, Cache]:
    """One autoregressive step with the KV cache.

    Args:
      previous: [batch] int, the token at position index - 1 (ignored at index 0, where the input
        is `sos`).
      index: scalar int32, the position to predict.
      cache: from `prefill` or a previous step, more than `index` positions; positions < index
        are filled.

    Returns:
      (logits [batch, num_clusters] float32 for token `index`, cache with position `index` added).
    """
    if not self.causal:
      raise ValueError("decode_step needs an autoregressive model (causal=True).")
    batch = previous.shape[0]
    token = jnp.take(self.wte, previous, axis=0).astype(self.dtype)
    sos = jnp.broadcast_to(self.sos.astype(self.dtype), token.shape)
    h = jnp.where(index == 0, sos, token)
    h = h + jax.lax.dynamic_index_in_dim(self.wpe, index, axis=0, keepdims=False).astype(self.dtype)
    h = h.reshape(batch, 1, self.width)
    new_cache = []
    for block, layer_cache in zip(self.h, cache):
      h, layer_cache = block.decode(h, layer_cache, index)
      new_cache.append(layer_cache)
    return self._logits(self.ln_f(h))[:, 0], tuple(new_cache)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The numbers that define an iGPT's shape."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int


def resolve_spec(variant: str, **overrides: Any) -> ModelSpec:
  """Variant name ("S", "M", "L", "XL" or "custom") plus overrides (None or 0 = the variant's
  number) -> ModelSpec.

  `mlp_dim` defaults to 4 * width; "custom" needs width, depth and num_heads.
  """
  fields = {f.name for f in dataclasses.fields(ModelSpec)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown iGPT shape option(s) {sorted(unknown)}; use {sorted(fields)}.")
  if variant == "custom":
    base = {}
  elif variant in SIZES:
    base = dict(SIZES[variant])
  else:
    raise ValueError(f"iGPT variant {variant!r} is unknown; use one of {', '.join(SIZES)} or "
                     "'custom' with explicit width/depth/num_heads.")
  base.update({k: v for k, v in overrides.items() if v not in (None, 0)})
  missing = {"width", "depth", "num_heads"} - set(base)
  if missing:
    raise ValueError(f"iGPT variant='custom' needs {sorted(missing)} set in the model config.")
  base.setdefault("mlp_dim", 4 * base["width"])
  spec = ModelSpec(**{k: int(base[k]) for k in fields})
  if min(spec.width, spec.depth, spec.num_heads, spec.mlp_dim) < 1:
    raise ValueError(f"iGPT shape {spec} has a non-positive size; all four must be >= 1.")
  if spec.width % spec.num_heads:
    raise ValueError(f"iGPT width {spec.width} is not divisible by num_heads {spec.num_heads}; "
                     "change one of them.")
  return spec


def create_model(variant: str = "S", *, image_size: int = 32, num_clusters: int = 512,
                 num_classes: int = 0, causal: bool = True, dropout_rate: float = 0.0,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 attention_implementation: Optional[str] = None, scan_layers: bool = False,
                 remat_policy: str = "none", **shape_overrides: Any) -> ImageGPT:
  """Builds an iGPT by variant name ("S", "M", "L", "XL") or "custom" with explicit shape.

  Args:
    variant: size name; shape overrides (`width`, `depth`, `num_heads`, `mlp_dim`) replace its
      numbers, e.g. `create_model("S", depth=2)`.
    image_size: images are image_size x image_size; the sequence has image_size**2 positions.
    num_clusters: palette size (vocabulary).
    num_classes: > 0 adds the zero-initialised classifier `clf` used by `ImageGPT.classify`.
    causal: True for the autoregressive objective, False for BERT.
    dropout_rate: on embeddings and residual branches (OpenAI used none).
    dtype, param_dtype: computation and parameter dtypes; logits are always float32.
    attention_implementation: None, "xla" or "cudnn" (flash attention on NVIDIA GPUs).
    scan_layers: one block compiled once and run `depth` times (`nn.scan`), parameters stacked
      [depth, ...] under `h` (see the module docstring); the outputs do not change.
    remat_policy: "none", "dots_saveable" or "full": what each block keeps for the backward pass
      (`common_jax.layers.REMAT_POLICIES`); the rest is recomputed. The outputs do not change.
  """
  layers.check_remat_policy(remat_policy)
  spec = resolve_spec(variant, **shape_overrides)
  if image_size < 1 or num_clusters < 1 or num_classes < 0:
    raise ValueError(f"iGPT needs image_size >= 1, num_clusters >= 1 and num_classes >= 0, got "
                     f"{image_size}, {num_clusters}, {num_classes}.")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate={dropout_rate} must be in [0, 1).")
  if attention_implementation not in layers.ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention_implementation={attention_implementation!r} is not supported; "
                     f"use one of {layers.ATTENTION_IMPLEMENTATIONS}.")
  return ImageGPT(
      num_clusters=num_clusters, image_size=image_size, width=spec.width, depth=spec.depth,
      num_heads=spec.num_heads, mlp_dim=spec.mlp_dim, num_classes=num_classes, causal=causal,
      dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype,
      attention_implementation=attention_implementation, scan_layers=bool(scan_layers),
      remat_policy=remat_policy)


def abstract_variables(model: ImageGPT, batch_size: int = 1) -> Any:
  """Parameter shapes via `jax.eval_shape` (no memory spent)."""
  ids = jax.ShapeDtypeStruct((batch_size, model.seq_len), jnp.int32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), ids)
