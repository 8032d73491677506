"""Vision Transformer (Dosovitskiy et al., 2021) as pure Flax modules.

Parameter names and shapes follow the official checkpoints, so published `.npz` files load as
they are:

  embedding/{kernel,bias}                      patch projection, kernel [P, P, 3, width]
  cls                                          [1, 1, width] (classifier="token" only)
  Transformer/posembed_input/pos_embedding     [1, tokens (+1 for the class token), width]
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
                               LayerNorm_2, MlpBlock_3/Dense_{0,1}
  Transformer/encoder_norm
  pre_logits/{kernel,bias}                     only with representation_size
  head/{kernel,bias}                           zero-initialised
  conv_root, gn_root, block{s}/unit{j}/...     hybrids only: the ResNet stem (vit_jax.resnet)

With `scan_layers=True` the blocks are one `nn.scan`ned block whose parameters are stacked along a
leading axis (logical name "layers"): `Transformer/encoderblock/...` [depth, ...] instead of
`Transformer/encoderblock_{i}/...`. The weights layer converts between the two layouts
(`common_jax.trees.stack_layers`), so official files load into and export from either.
"""

import dataclasses
import re
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax import layers
# The ViT-only layers, named here too as `models.X` (the official code's module names).
from vit_jax import layers as vit_layers
from vit_jax import posemb as posemb_lib
from vit_jax import resnet
from vit_jax.encoder import Encoder, Encoder1DBlock  # pylint: disable=unused-import
from vit_jax.layers import (  # pylint: disable=unused-import
    AddPositionEmbs, MlpBlock, MultiHeadDotProductAttention, posemb_sincos_2d)

Dtype = Any

CLASSIFIERS = ("token", "gap")
POSEMBS, POSEMB_WHERE = posemb_lib.POSEMBS, posemb_lib.POSEMB_WHERE
# Masked patch prediction's targets: the 3-bit mean colour of a patch (8 levels per channel).
MPP_CLASSES = 512

# Widths, depths, MLP sizes and heads of the paper's Table 1 (plus Ti and S from DeiT/AugReg).
SIZES = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}
_VARIANT = re.compile(r"^(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")

# The official hybrids (vit_jax/configs/models.py upstream): the Transformer's size, the ResNet
# stem's units per stage (`vit_jax.resnet`; () = its root alone) and the patch size on the stem's
# feature map. The name's /P is the pixels per token side, except for R+Ti/16: its official
# config takes 8x8 patches of the root's /4 map, 32 pixels per token (7x7 tokens at 224).
HYBRIDS = {
    "R+Ti/16": dict(size="Ti", resnet_stages=(), patch_size=8),
    "R26+S/32": dict(size="S", resnet_stages=(2, 2, 2, 2), patch_size=1),
    "R26+B/32": dict(size="B", resnet_stages=(2, 2, 2, 2), patch_size=1),
    "R50+B/16": dict(size="B", resnet_stages=(3, 4, 9), patch_size=1),
    "R50+L/32": dict(size="L", resnet_stages=(3, 4, 6, 3), patch_size=1),
}


def parse_variant(variant: str) -> dict:
  """"B/16" -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16); a hybrid
  ("R50+B/16") also gives `resnet_stages` ((3, 4, 9)) and the patch size on its feature map."""
  if variant in HYBRIDS:
    hybrid = HYBRIDS[variant]
    return dict(SIZES[hybrid["size"]], patch_size=hybrid["patch_size"],
                resnet_stages=hybrid["resnet_stages"])
  match = _VARIANT.match(variant or "")
  if not match or match.group("size") not in SIZES:
    raise ValueError(
        f"model variant {variant!r} is unknown; use '<size>/<patch>' with size in "
        f"{', '.join(SIZES)} (e.g. 'B/16'), a hybrid ({', '.join(HYBRIDS)}), or 'custom' with "
        "explicit width/depth/mlp_dim/num_heads/patch_size.")
  return dict(SIZES[match.group("size")], patch_size=int(match.group("patch")))


class VisionTransformer(nn.Module):
  """ViT classifier.

  `__call__(images, train=False)`: images [batch, height, width, 3] float in [-1, 1] ->
  logits [batch, num_classes] float32. With `num_classes=0` it returns the pre-head
  representation [batch, width or representation_size].
  """
  num_classes: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  image_size: int = 224
  classifier: str = "token"
  posemb: str = "learn"
  posemb_where: str = "first"
  stoch_depth: float = 0.0  # stochastic depth of the last block (see vit_jax.encoder.Encoder)
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  gelu_approximate: bool = True
  attention_implementation: Optional[str] = None
  scan_layers: bool = False
  remat_policy: str = "none"
  # Hybrids: the ResNet stem's units per stage (`vit_jax.resnet`; () = its root alone) in front
  # of the patch embedding, whose `patch_size` then counts cells of the stem's feature map.
  resnet_stages: Optional[Tuple[int, ...]] = None

  @property
  def effective_patch_size(self) -> int:
    """Image pixels per token side: `patch_size` times the ResNet stem's reduction, if any."""
    return self.patch_size * resnet.reduction(self.resnet_stages)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               corrupt: Optional[Tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    """images [batch, height, width, 3] -> logits [batch, num_classes] (or the representation).

    corrupt: masked patch prediction (`vit_jax.mpp`): (how [batch, patches] int32, source
      [batch, patches] int32). Patch embeddings with how == 1 are replaced by the learned
      `mask_token`, with how == 2 by the embedding of patch `source` of the same image; 0 and 3
      stay. The output is then the `mpp_head` logits [batch, patches, MPP_CLASSES] of every
      patch token, not the classifier's.
    """
    deterministic = not train
    x = images.astype(self.dtype)
    if self.resnet_stages is not None:  # its parameters sit beside `embedding`, as upstream
      x = resnet.stem(x, self.resnet_stages, dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Conv(
        features=self.width,
        kernel_size=(self.patch_size, self.patch_size),
        strides=(self.patch_size, self.patch_size),
        padding="VALID",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=layers.param_with_axes(nn.initializers.lecun_normal(),
                                           (None, None, None, "embed")),
        bias_init=layers.param_with_axes(nn.initializers.zeros, ("embed",)),
        name="embedding")(x)
    batch, grid_h, grid_w, channels = x.shape
    x = jnp.reshape(x, (batch, grid_h * grid_w, channels))
    if corrupt is not None:
      how, source = corrupt
      mask_token = self.param("mask_token", layers.param_with_axes(
          nn.initializers.normal(stddev=0.02), (None, None, "embed")), (1, 1, channels),
                              self.param_dtype)
      other = jnp.take_along_axis(x, source[..., None], axis=1)
      x = jnp.where((how == 1)[..., None], mask_token.astype(x.dtype),
                    jnp.where((how == 2)[..., None], other, x))
    if self.classifier == "token":
      cls = self.param("cls", layers.param_with_axes(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, channels), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)
    x = layers.constrain(x, vit_layers.TOKENS)
    x = Encoder(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
        param_dtype=self.param_dtype, dropout_rate=self.dropout_rate,
        posemb=self.posemb, posemb_where=self.posemb_where, width=channels,
        grid=(grid_h, grid_w), num_prefix=int(self.classifier == "token"),
        gelu_approximate=self.gelu_approximate,
        attention_implementation=self.attention_implementation,
        scan_layers=self.scan_layers, remat_policy=self.remat_policy,
        stoch_depth=self.stoch_depth, name="Transformer")(x, deterministic=deterministic)
    if corrupt is not None:
      patches = x[:, int(self.classifier == "token"):]
      return nn.Dense(MPP_CLASSES, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=layers.param_with_axes(nn.initializers.zeros,
                                                         ("embed", "classes")),
                      bias_init=layers.param_with_axes(nn.initializers.zeros, ("classes",)),
                      name="mpp_head")(patches).astype(jnp.float32)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=layers.param_with_axes(nn.initializers.lecun_normal(),
                                                      ("embed", None)),
                   bias_init=layers.param_with_axes(nn.initializers.zeros, (None,)),
                   name="pre_logits")(x)
      x = jnp.tanh(x)
    if not self.num_classes:
      return x
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 # "embed": FSDP shards the head too (ViT-H/14's 21,843-class head is 28M).
                 kernel_init=layers.param_with_axes(nn.initializers.zeros, ("embed", "classes")),
                 bias_init=layers.param_with_axes(nn.initializers.zeros, ("classes",)),
                 name="head")(x)
    return x.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The numbers that define a ViT's shape."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  resnet_stages: Optional[Tuple[int, ...]] = None  # hybrids (HYBRIDS): the ResNet stem's stages


def resolve_spec(variant: str, **overrides: Any) -> ModelSpec:
  """Variant name plus explicit overrides (None or 0 = the variant's number) -> ModelSpec.

  `variant="custom"` takes all five numbers from `overrides`.
  """
  fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"resnet_stages"}  # the numbers
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown model shape option(s) {sorted(unknown)}; use {sorted(fields)}.")
  if variant == "custom":
    base = {}
  else:
    base = parse_variant(variant)
  base.update({k: v for k, v in overrides.items() if v not in (None, 0)})
  missing = fields - set(base)
  if missing:
    raise ValueError(f"variant='custom' needs {sorted(missing)} set in the model config.")
  spec = ModelSpec(**{k: int(base[k]) for k in fields},
                   resnet_stages=base.get("resnet_stages"))
  if spec.width % spec.num_heads:
    raise ValueError(f"model width {spec.width} is not divisible by num_heads "
                     f"{spec.num_heads}; change one of them.")
  return spec


def check_options(*, image_size: int, patch_size: int, classifier: str, posemb: str,
                  num_classes: int = 1, dropout_rate: float = 0.0,
                  representation_size: Optional[int] = None, posemb_where: str = "first",
                  scan_layers: bool = False, stoch_depth: float = 0.0) -> None:
  """Raises one clear ValueError for option combinations that cannot work."""
  if image_size < 1:
    raise ValueError(f"image_size={image_size} must be positive.")
  if num_classes < 0:
    raise ValueError(f"num_classes={num_classes} must be >= 0 (0: no head).")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate={dropout_rate} must lie in [0, 1).")
  if representation_size is not None and representation_size < 1:
    raise ValueError(f"representation_size={representation_size} must be positive, or None "
                     "(config: 0) for no pre-logits layer.")
  if classifier not in CLASSIFIERS:
    raise ValueError(f"classifier={classifier!r} is unknown; use one of {CLASSIFIERS}.")
  if posemb not in POSEMBS:
    raise ValueError(f"posemb={posemb!r} is unknown; use one of {POSEMBS}.")
  if not 0.0 <= stoch_depth < 1.0:
    raise ValueError(f"stoch_depth={stoch_depth} must lie in [0, 1).")
  if stoch_depth and scan_layers:
    raise ValueError("stoch_depth gives every block its own rate, which scan_layers=True runs "
                     "as one block; set scan_layers=False.")
  if posemb_where not in POSEMB_WHERE:
    raise ValueError(f"posemb_where={posemb_where!r} is unknown; use one of {POSEMB_WHERE}.")
  if posemb_where != "first" and posemb in ("none", "relative"):
    raise ValueError(f"posemb_where={posemb_where!r} places an absolute position embedding, and "
                     f"posemb={posemb!r} has none; set posemb_where='first'.")
  if posemb_where != "first" and scan_layers:
    raise ValueError(f"posemb_where={posemb_where!r} adds embeddings between blocks, which "
                     "scan_layers=True runs as one; set scan_layers=False.")
  if patch_size <= 0 or image_size % patch_size:
    raise ValueError(f"patch size {patch_size} does not divide image_size {image_size}; choose "
                     "an image_size that is a multiple of the patch size.")


def create_model(variant: str = "B/16", *, num_classes: int = 1000, image_size: int = 224,
                 classifier: str = "token", posemb: str = "learn", posemb_where: str = "first",
                 stoch_depth: float = 0.0,
                 representation_size: Optional[int] = None, dropout_rate: float = 0.0,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 gelu_approximate: bool = True, attention_implementation: Optional[str] = None,
                 scan_layers: bool = False, remat_policy: str = "none",
                 **shape_overrides: Any) -> VisionTransformer:
  """Builds a ViT by variant name ("B/16", "Ti/4", a hybrid "R50+B/16", ...) or "custom" with
  explicit shape.

  Shape overrides (`width`, `depth`, `mlp_dim`, `num_heads`, `patch_size`) replace the
  variant's numbers, e.g. `create_model("Ti/4", depth=4)`.

  Switches that change how the model runs, never what it computes:
    scan_layers: one block compiled once and run `depth` times (`nn.scan`); its parameters are
      stacked [depth, ...] under `Transformer/encoderblock` (see the module docstring).
    remat_policy: "none", "dots_saveable" or "full": what each block keeps for the backward pass
      (`common_jax.layers.REMAT_POLICIES`); the rest is recomputed.
  """
  layers.check_remat_policy(remat_policy)
  spec = resolve_spec(variant, **shape_overrides)
  check_options(image_size=image_size,
                patch_size=spec.patch_size * resnet.reduction(spec.resnet_stages),
                classifier=classifier, posemb=posemb, num_classes=num_classes,
                dropout_rate=dropout_rate, representation_size=representation_size,
                posemb_where=posemb_where, scan_layers=scan_layers, stoch_depth=stoch_depth)
  return VisionTransformer(
      num_classes=num_classes, patch_size=spec.patch_size, width=spec.width, depth=spec.depth,
      mlp_dim=spec.mlp_dim, num_heads=spec.num_heads, image_size=image_size,
      classifier=classifier, posemb=posemb, posemb_where=posemb_where, stoch_depth=stoch_depth,
      representation_size=representation_size,
      dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype,
      gelu_approximate=gelu_approximate, attention_implementation=attention_implementation,
      scan_layers=bool(scan_layers), remat_policy=remat_policy,
      resnet_stages=spec.resnet_stages)


def abstract_variables(model: VisionTransformer, batch_size: int = 1) -> Any:
  """Parameter shapes via `jax.eval_shape` (no memory spent)."""
  images = jax.ShapeDtypeStruct((batch_size, model.image_size, model.image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)
