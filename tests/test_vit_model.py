"""The ViT family: parameter counts, official parameter names, options, errors."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit_jax
from common_jax import layers
from vit_jax import models


@pytest.mark.parametrize("variant, expected", [
    ("B/16", 86_567_656),
    ("L/16", 304_326_632),
    ("H/14", 632_045_800),
])
def test_parameter_counts_match_the_paper(variant, expected):
  model = vit_jax.create_model(variant, num_classes=1000)
  assert layers.count_params(models.abstract_variables(model)["params"]) == expected


def test_parameter_names_follow_the_official_checkpoints():
  model = vit_jax.create_model("Ti/16", num_classes=10, image_size=32, representation_size=12)
  params = flax.traverse_util.flatten_dict(
      flax.linen.meta.unbox(models.abstract_variables(model)["params"]), sep="/")
  names = set(params)
  expected = {
      "embedding/kernel", "embedding/bias", "cls",
      "Transformer/posembed_input/pos_embedding",
      "Transformer/encoderblock_0/LayerNorm_0/scale",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/bias",
      "Transformer/encoderblock_11/LayerNorm_2/bias",
      "Transformer/encoderblock_11/MlpBlock_3/Dense_1/kernel",
      "Transformer/encoder_norm/scale", "pre_logits/kernel", "head/kernel", "head/bias",
  }
  assert expected <= names
  assert params["Transformer/posembed_input/pos_embedding"].shape == (1, 4 + 1, 192)
  assert params["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape \
      == (192, 3, 64)
  assert params["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape \
      == (3, 64, 192)
  assert params["embedding/kernel"].shape == (16, 16, 3, 192)


def test_every_parameter_carries_logical_axis_names():
  model = vit_jax.create_model("custom", num_classes=10, image_size=8, width=16, depth=1,
                               mlp_dim=32, num_heads=2, patch_size=2)
  boxed = models.abstract_variables(model)["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(
      x, flax.linen.LogicallyPartitioned))
  assert leaves and all(isinstance(x, flax.linen.LogicallyPartitioned) for x in leaves)


@pytest.mark.parametrize("classifier", ["token", "gap"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d", "none"])
def test_forward_shapes_and_zero_head(classifier, posemb):
  model = vit_jax.create_model("custom", num_classes=7, image_size=8, width=16, depth=2,
                               mlp_dim=32, num_heads=2, patch_size=4, classifier=classifier,
                               posemb=posemb)
  images = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.PRNGKey(1), images)
  logits = model.apply(variables, images)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  # The head is zero-initialised: every class starts equally likely.
  np.testing.assert_array_equal(np.asarray(logits), 0.0)
  params = flax.linen.meta.unbox(variables["params"])
  assert ("cls" in params) == (classifier == "token")
  assert ("posembed_input" in params["Transformer"]) == (posemb == "learn")


def test_dropout_only_in_training():
  model = vit_jax.create_model("custom", num_classes=0, image_size=8, width=16, depth=2,
                               mlp_dim=32, num_heads=2, patch_size=2, dropout_rate=0.5)
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  a = model.apply(variables, images)
  b = model.apply(variables, images)
  np.testing.assert_array_equal(a, b)
  c = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(a, c)


def test_gelu_option_changes_the_activation():
  kwargs = dict(num_classes=0, image_size=8, width=16, depth=1, mlp_dim=32, num_heads=2,
                patch_size=2)
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
  tanh = vit_jax.create_model("custom", gelu_approximate=True, **kwargs)
  exact = vit_jax.create_model("custom", gelu_approximate=False, **kwargs)
  variables = tanh.init(jax.random.PRNGKey(1), images)
  difference = np.abs(tanh.apply(variables, images) - exact.apply(variables, images)).max()
  assert 0 < difference < 1e-2


@pytest.mark.parametrize("variant, message", [
    ("Q/16", "unknown"),
    ("B16", "unknown"),
])
def test_unknown_variants_are_refused(variant, message):
  with pytest.raises(ValueError, match=message):
    vit_jax.create_model(variant)


def test_patch_size_must_divide_image_size():
  with pytest.raises(ValueError, match="does not divide image_size 30"):
    vit_jax.create_model("B/16", image_size=30)


def test_variant_overrides():
  model = vit_jax.create_model("Ti/4", depth=3, image_size=8)
  assert (model.width, model.depth, model.patch_size, model.num_heads) == (192, 3, 4, 3)
