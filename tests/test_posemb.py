"""Position-embedding ablation switches (vit_jax.posemb) and the classifier choice."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import vit_jax
from common_jax import trees
from vit_jax import posemb

SHAPE = dict(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=2)


def _model(**options):
  return vit_jax.create_model("custom", num_classes=5, image_size=8, **dict(SHAPE, **options))


def _init(model):
  """Parameters (with a random head: the zero-initialised one makes every logit 0), images."""
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  params = jax.tree_util.tree_map(
      np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(0), images)["params"]))
  params["head"]["kernel"] = np.random.default_rng(1).normal(
      size=params["head"]["kernel"].shape).astype(np.float32)
  return params, images


def _shapes(model):
  return trees.flat_shapes(_init(model)[0])


def test_learn2d_concatenates_a_row_and_a_column_table_of_half_the_width():
  shapes = _shapes(_model(posemb="learn2d"))
  assert shapes["Transformer/posembed_input/row_embedding"] == (4, 8)
  assert shapes["Transformer/posembed_input/column_embedding"] == (4, 8)
  table = posemb.Learned2D((2, 3), 5).apply(
      {"params": {"row_embedding": np.arange(4.0).reshape(2, 2),
                  "column_embedding": 10 + np.arange(9.0).reshape(3, 3)}})
  assert table.shape == (1, 6, 5)
  # Patch (1, 2): row 1's table, then column 2's.
  np.testing.assert_array_equal(table[0, 1 * 3 + 2], [2, 3, 16, 17, 18])


def test_relative_index_is_the_offset_and_the_class_token_has_its_own_rows():
  index = posemb.relative_index((2, 2), num_prefix=1)
  assert index.shape == (5, 5)
  patches = index[1:, 1:]
  # Same offset, same row: (0,0)->(0,1) and (1,0)->(1,1) are both one column to the right.
  assert patches[0, 1] == patches[2, 3] and patches[0, 1] != patches[1, 0]
  assert len(np.unique(patches)) == 9  # (2 * 2 - 1)**2 offsets
  assert set(index[0, 1:]) == {9} and set(index[1:, 0]) == {10} and index[0, 0] == 11


def test_relative_bias_is_per_layer_per_head_and_changes_the_logits():
  model = _model(posemb="relative")
  params, images = _init(model)
  shapes = trees.flat_shapes(params)
  # A 4x4 grid: (2 * 4 - 1)**2 offsets, and the class token's three.
  assert shapes["Transformer/encoderblock_0/relative_posemb/relative_bias"] == (49 + 3, 2)
  assert not any("posembed" in key for key in shapes)
  head = params
  before = model.apply({"params": head}, images)
  head["Transformer"]["encoderblock_1"]["relative_posemb"]["relative_bias"] = (
      np.random.default_rng(2).normal(size=(52, 2)).astype(np.float32))
  after = model.apply({"params": head}, images)
  assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-3


@pytest.mark.parametrize("kind", ["learn", "learn2d", "sincos2d"])
def test_where_the_embedding_enters(kind):
  first, every, shared = (_model(posemb=kind, posemb_where=where)
                          for where in posemb.POSEMB_WHERE)
  names = lambda model: sorted({k.split("/")[1] for k in _shapes(model) if "posembed" in k})
  if kind == "sincos2d":  # fixed: no parameters wherever it enters
    assert names(first) == names(every) == names(shared) == []
  else:
    assert names(first) == names(shared) == ["posembed_input"]
    assert names(every) == [f"posembed_{i}" for i in range(3)]
  params, images = _init(first)
  # The same parameters, added once or before every block: different outputs.
  assert np.abs(np.asarray(first.apply({"params": params}, images, train=False))
                - np.asarray(shared.apply({"params": params}, images, train=False))).max() > 1e-6


def test_impossible_combinations_are_one_sentence():
  with pytest.raises(ValueError, match="posemb='relative' has none; set posemb_where='first'"):
    _model(posemb="relative", posemb_where="every_layer")
  with pytest.raises(ValueError, match="set scan_layers=False"):
    _model(posemb="learn", posemb_where="every_layer", scan_layers=True)
  with pytest.raises(ValueError, match="posemb_where='middle' is unknown"):
    _model(posemb_where="middle")


def test_attention_weights_are_sown_on_request_only():
  model = _model(posemb="relative", classifier="token")
  params, images = _init(model)
  logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
  weights = jax.tree_util.tree_leaves(state["intermediates"])
  assert len(weights) == 3 and weights[0].shape == (2, 2, 17, 17)
  np.testing.assert_allclose(np.asarray(weights[0]).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(logits, model.apply({"params": params}, images), rtol=1e-6)
