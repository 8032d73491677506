"""The recipes give the official shapes and accept the shape of a custom run."""

import math

import pytest

import run
import vit_jax
from common_jax import trees
from configs import igpt_finetune
from configs import igpt_probe
from configs import vit_finetune
from configs import vit_pretrain
from vit_jax import models as vit_models


@pytest.mark.parametrize("size", sorted(vit_models.SIZES))
def test_pretraining_head_is_as_wide_as_the_model(size, tmp_path):
  """The paper's pre-training head: pre-logits [width, width], then the classes."""
  config = vit_pretrain.get_config(f"{size}/16,imagenet21k")
  family, prepared = run.prepare(config, str(tmp_path / "w"), "plan")
  shapes = trees.flat_shapes(family.abstract_params(prepared))
  width = vit_models.SIZES[size]["width"]
  assert shapes["pre_logits/kernel"] == (width, width)
  assert shapes["head/kernel"] == (width, 21843)


def test_vit_l16_imagenet21k_has_exactly_the_layers_of_the_official_checkpoint(tmp_path):
  # Counted layer by layer from the official ViT-L_16.npz layout: patch embedding, class token,
  # position embedding, 24 blocks (2 LayerNorms, q/k/v/out, 2 MLP layers), encoder norm,
  # pre-logits 1024 -> 1024 and the 21,843-class head.
  config = vit_pretrain.get_config("L/16,imagenet21k")
  family, prepared = run.prepare(config, str(tmp_path / "w"), "plan")
  shapes = trees.flat_shapes(family.abstract_params(prepared))
  patches, width, depth, mlp = 196, 1024, 24, 4096
  block = (4 * width + 4 * (width * width + width) + 2 * width * mlp + mlp + width)
  expected = (16 * 16 * 3 * width + width + width + (patches + 1) * width + depth * block
              + 2 * width + width * width + width + width * 21843 + 21843)
  assert sum(math.prod(shape) for shape in shapes.values()) == expected


@pytest.mark.parametrize("recipe", [
    lambda: igpt_finetune.get_config("cifar10"), lambda: igpt_probe.get_config("cifar10")])
def test_igpt_recipes_take_a_custom_shape(recipe, tmp_path):
  config = recipe()
  config.model.update(width=32, depth=2, num_heads=4, mlp_dim=64)
  family, prepared = run.prepare(config, str(tmp_path / "w"), "plan")
  model = family.model(prepared)
  assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (32, 2, 4, 64)


def test_vit_finetune_takes_a_custom_shape_and_zero_means_the_variant(tmp_path):
  config = vit_finetune.get_config()
  config.model.update(depth=2)
  family, prepared = run.prepare(config, str(tmp_path / "w"), "plan")
  model = family.model(prepared)
  named = vit_jax.create_model(config.model.variant)
  assert model.depth == 2 and model.width == named.width and model.patch_size == named.patch_size


def test_top5_accuracy_counts_the_label_among_the_five_best_logits():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.ClassificationTask(
      variant="custom", num_classes=10, image_size=8, top5=True,
      model_options=dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32),
           "mask": np.array([1.0] * 12 + [0.0] * 4, np.float32)}
  params = task.init_variables(jax.random.PRNGKey(0), batch)["params"]
  params = jax.tree_util.tree_map(  # a head of random values, so that the logits differ
      lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  logits = np.asarray(task.model.apply({"params": params}, batch["image"], train=False))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  expected = sum(batch["label"][i] in top5[i] for i in range(12))
  sums = task.eval_sums(params, batch)
  assert float(sums["top5_accuracy"]) == expected and 0 < expected < 12
  assert float(sums["top5_accuracy"]) >= float(sums["accuracy"])
  with pytest.raises(ValueError, match=r"config.eval_top5=True needs more than 5 classes"):
    tasks.ClassificationTask(variant="custom", num_classes=5, image_size=8, top5=True,
                             model_options=dict(width=16, depth=1, mlp_dim=32, num_heads=2,
                                                patch_size=4))
