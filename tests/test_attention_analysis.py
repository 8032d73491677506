"""Mean attention distance and attention rollout, on attention maps with known answers."""

import numpy as np
import pytest

from vit_jax import attention_analysis as analysis


def test_uniform_attention_over_a_2x2_grid_has_the_analytic_distance():
  # Each patch attends equally to the 4 patches of a 2x2 grid of 4-pixel patches: distances
  # 0, 4, 4 and 4 * sqrt(2) pixels, whose mean is 2 + sqrt(2).
  uniform = np.full((3, 2, 5, 5), 0.2)  # batch 3, 2 heads, class token + 4 patches
  distances = analysis.mean_attention_distance([uniform, uniform], (2, 2), patch_size=4)
  assert distances.shape == (2, 2)
  np.testing.assert_allclose(distances, 2 + np.sqrt(2), rtol=1e-12)


def test_attention_to_itself_has_distance_zero_and_neighbours_one_patch():
  eye = np.eye(10)[None, None]  # a class token and a 3x3 grid of patches
  distances = analysis.mean_attention_distance([eye], (3, 3), patch_size=16)
  np.testing.assert_allclose(distances, 0.0)
  # Every patch of a 1x4 row attending only to its right neighbour (the last to its left).
  shift = np.zeros((1, 1, 4, 4))
  for i in range(4):
    shift[0, 0, i, i + 1 if i < 3 else 2] = 1.0
  np.testing.assert_allclose(
      analysis.mean_attention_distance([shift], (1, 4), patch_size=8, num_prefix=0), 8.0)


def test_rollout_of_attention_to_self_is_the_identity_and_maps_are_normalised():
  eye = np.tile(np.eye(5)[None, None], (2, 3, 1, 1))
  np.testing.assert_allclose(analysis.rollout([eye, eye]), np.tile(np.eye(5), (2, 1, 1)))
  rng = np.random.default_rng(0)
  weights = [rng.dirichlet(np.ones(5), size=(2, 3, 5)) for _ in range(3)]
  joint = analysis.rollout(weights)
  np.testing.assert_allclose(joint.sum(-1), 1.0)  # still a distribution per token
  maps = analysis.rollout_maps(weights, (2, 2))
  assert maps.shape == (2, 2, 2) and maps.min() == 0.0 and maps.max() == pytest.approx(1.0)


def test_pictures_have_the_expected_size():
  images = np.zeros((2, 8, 8, 3), np.float32)
  sheet = analysis.overlay(images, np.ones((2, 2, 2)), scale=4)
  assert sheet.size == ((2 * 8 + 3 * 2) * 4, (2 * (8 + 2) + 2) * 4)
  plot = analysis.distance_plot(np.ones((4, 3)) * 5, patch_size=2, image_size=8)
  assert plot.size == (480, 360)


@pytest.mark.slow
def test_attention_mode_writes_the_plot_the_numbers_and_the_rollout(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import run  # pylint: disable=g-import-not-at-top
  from configs import vit_digits  # pylint: disable=g-import-not-at-top
  config = vit_digits.get_config()
  config.update(total_steps=4, log_every=2, data_dir=str(tmp_path / "data"))
  config.optimizer.warmup_steps = 0
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2, classifier="token")
  workdir = tmp_path / "w"
  assert run.dispatch(config, str(workdir), "attention") == 2  # nothing trained yet
  assert run.dispatch(config, str(workdir)) == 0
  assert run.dispatch(config, str(workdir), "attention") == 0
  report = json.load(open(workdir / "attention_distance.json"))
  distances = np.array(report["distance_pixels"])
  assert distances.shape == (2, 2) and report["images"] == 256 and report["step"] == 4
  assert (0 < distances).all() and (distances < np.hypot(8, 8)).all()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(workdir / "attention_distance.png").size == (480, 360)
  assert Image.open(workdir / "attention_rollout.png").size[1] > Image.open(
      workdir / "attention_rollout.png").size[0]
