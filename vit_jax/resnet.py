"""The BiT-style ResNet stem of the paper's hybrid models (R50+ViT-B/16, R26+ViT-S/32, ...).

Hybrids feed the Transformer with a ResNet's feature map instead of image patches. The ResNet is
the one of Big Transfer (Kolesnikov et al., 2020) in its post-activation form: every convolution
is weight-standardised and followed by GroupNorm (32 groups), and no convolution has a bias.

  conv_root        7x7 stride 2 -> gn_root -> relu -> max-pool 3x3 stride 2     (/4)
  block1           `stages[0]` bottleneck units of width 64, stride 1
  block{s+1}       `stages[s]` units of width 64 * 2**s, the first one strided   (/2 each)
  block{s}/unit{j} conv1 1x1 -> gn1 -> relu -> conv2 3x3 (the stride) -> gn2 -> relu
                   -> conv3 1x1 (4x the width) -> gn3; relu(that + the shortcut). The first unit
                   of a stage projects the shortcut (conv_proj 1x1 strided -> gn_proj).

The names and shapes are the official checkpoints' (google-research/vision_transformer), so their
hybrid `.npz` files load as they are: the parameters sit at the top of the model's tree, beside
`embedding` (`conv_root/kernel`, `gn_root/{scale,bias}`, `block1/unit1/conv_proj/kernel`, ...).
What the official code does and is kept here: "SAME" padding everywhere (the max-pool's pads
with -inf), weight standardisation over the kernel's spatial and input axes with
w / (std + 1e-5), GroupNorm's epsilon 1e-6, `gn3`'s scale zero-initialised so that every unit
starts as the identity of its shortcut, kernels lecun-normal.

Parameters carry the logical name "embed" on their output-channel axis, so FSDP shards the stem
like the rest of the model (channels are multiples of 64: any power-of-two fsdp size up to 64
divides them); tensor parallelism leaves the stem whole.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from common_jax import layers

Dtype = Any

ROOT_WIDTH = 64
GROUPS = 32
STANDARDIZE_EPSILON = 1e-5
NORM_EPSILON = 1e-6


def reduction(stages: Optional[Sequence[int]]) -> int:
  """How many image pixels one feature-map cell spans per side: 1 without a stem (None), 4 for
  the root alone (()), and 2 more per stage after the first."""
  if stages is None:
    return 1
  return 4 * 2**max(len(stages) - 1, 0)


def standardize(kernel: jax.Array) -> jax.Array:
  """Weight standardisation: each output channel's kernel [h, w, in] to mean 0, std 1."""
  mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  std = jnp.std(kernel, axis=(0, 1, 2), keepdims=True)
  return (kernel - mean) / (std + STANDARDIZE_EPSILON)


class StdConv(nn.Module):
  """Bias-free convolution with a weight-standardised kernel [h, w, in, out], "SAME" padding."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, height, width, in] -> [batch, ceil(height / stride), ..., features]."""
    kernel = self.param(
        "kernel", layers.param_with_axes(nn.initializers.lecun_normal(),
                                         (None, None, None, "embed")),
        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    # Standardised in the parameters' precision, then cast: the statistics stay float32.
    kernel = standardize(kernel).astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=self.strides, padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def group_norm(name: str, dtype: Dtype, param_dtype: Dtype, zero_scale: bool = False
               ) -> nn.GroupNorm:
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(
      num_groups=GROUPS, epsilon=NORM_EPSILON, dtype=dtype, param_dtype=param_dtype,
      scale_init=layers.param_with_axes(scale_init, ("embed",)),
      bias_init=layers.param_with_axes(nn.initializers.zeros, ("embed",)), name=name)


class BottleneckUnit(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 to 4 * `features`, plus the (projected) shortcut."""
  features: int
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, height, width, in] -> [batch, height / stride, width / stride, 4 features]."""
    conv = lambda features, size, name, strides=(1, 1): StdConv(  # pylint: disable=g-long-lambda
        features, (size, size), strides, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    norm = lambda name, zero_scale=False: group_norm(name, self.dtype, self.param_dtype,
                                                     zero_scale)
    residual = x
    if x.shape[-1] != 4 * self.features or self.strides != (1, 1):
      residual = conv(4 * self.features, 1, "conv_proj", self.strides)(residual)
      residual = norm("gn_proj")(residual)
    y = nn.relu(norm("gn1")(conv(self.features, 1, "conv1")(x)))
    y = nn.relu(norm("gn2")(conv(self.features, 3, "conv2", self.strides)(y)))
    # Zero scale: the unit starts as its shortcut, which keeps a deep stem trainable.
    y = norm("gn3", zero_scale=True)(conv(4 * self.features, 1, "conv3")(y))
    return nn.relu(residual + y)


class Stage(nn.Module):
  """`units` bottleneck units `unit1`, `unit2`, ...; the first one strides and projects."""
  units: int
  features: int
  strides: Tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.units):
      x = BottleneckUnit(self.features, self.strides if j == 0 else (1, 1), dtype=self.dtype,
                         param_dtype=self.param_dtype, name=f"unit{j + 1}")(x)
    return x


def stem(x: jax.Array, stages: Sequence[int], *, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32) -> jax.Array:
  """The root and `stages` of bottleneck units, built in the calling module's scope.

  Call it inside a compact `__call__`: its parameters then sit beside the caller's own
  (`conv_root`, `gn_root`, `block{s}/unit{j}/...`), as in the official checkpoints.

  Args:
    x: images [batch, height, width, channels], any float dtype.
    stages: the number of units of each stage; () is the root alone.
    dtype: computation dtype (GroupNorm statistics are float32 whatever it is).
    param_dtype: parameter dtype.

  Returns:
    [batch, height / r, width / r, 64 (root only) or 256 * 2**(len(stages) - 1)] in `dtype`,
    r = `reduction(stages)` (sizes rounded up where r does not divide them).
  """
  x = StdConv(ROOT_WIDTH, (7, 7), (2, 2), dtype=dtype, param_dtype=param_dtype,
              name="conv_root")(x)
  x = nn.relu(group_norm("gn_root", dtype, param_dtype)(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
  for s, units in enumerate(stages):
    # The max-pool already halved the map for the first stage; later stages halve it again.
    x = Stage(units, ROOT_WIDTH * 2**s, (1, 1) if s == 0 else (2, 2), dtype=dtype,
              param_dtype=param_dtype, name=f"block{s + 1}")(x)
  return x
