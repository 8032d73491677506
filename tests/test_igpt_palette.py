"""The iGPT colour palette: k-means fit, palette files, quantize / dequantize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import igpt_jax
from igpt_jax import palette as palette_lib


def _random_palette(num_clusters=32, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (num_clusters, 3)).astype(np.float32)


def test_quantize_dequantize_round_trip_on_palette_colours():
  palette = _random_palette()
  ids = np.random.default_rng(1).integers(0, len(palette), (4, 8, 8))
  images = palette[ids]
  quantized = igpt_jax.quantize(images, palette)
  assert quantized.shape == (4, 8, 8) and quantized.dtype == jnp.int32
  np.testing.assert_array_equal(quantized, ids)
  np.testing.assert_array_equal(igpt_jax.dequantize(quantized, palette), images)


def test_quantize_picks_the_nearest_centre_like_numpy():
  palette = _random_palette(64)
  pixels = np.random.default_rng(2).uniform(-1, 1, (3, 5, 7, 3)).astype(np.float32)
  expected = np.argmin(((pixels[..., None, :] - palette) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(igpt_jax.quantize(pixels, palette), expected)
  # Inside a user's jit as well (the tasks quantize on device).
  jitted = jax.jit(lambda x: igpt_jax.quantize(x, jnp.asarray(palette)) + 0)
  np.testing.assert_array_equal(jitted(pixels), expected)


def test_quantize_in_position_chunks_equals_one_shot(monkeypatch):
  # Large batches are quantized a chunk of positions at a time to bound the distance matrix.
  palette = _random_palette(16)
  pixels = np.random.default_rng(3).uniform(-1, 1, (6, 12, 12, 3)).astype(np.float32)
  expected = np.asarray(igpt_jax.quantize(pixels, palette))
  monkeypatch.setattr(palette_lib, "_MAX_DISTANCES", 6 * 16 * 16)
  jax.clear_caches()  # quantize is jitted: retrace under the small cap
  assert palette_lib._position_chunks(6, 144, 16) == 9
  assert "scan" in str(jax.make_jaxpr(palette_lib.quantize)(pixels, palette))
  chunked = palette_lib.quantize(pixels, palette)
  np.testing.assert_array_equal(chunked, expected)


def test_kmeans_recovers_well_separated_clusters():
  rng = np.random.default_rng(0)
  # 8 centres at the corners of a cube: pairwise distance >= 1.2, noise 0.03.
  true = np.array([[x, y, z] for x in (-0.6, 0.6) for y in (-0.6, 0.6) for z in (-0.6, 0.6)],
                  np.float32)
  pixels = true[rng.integers(0, 8, 4000)] + 0.03 * rng.standard_normal((4000, 3))
  pixels = pixels.astype(np.float32).reshape(40, 10, 10, 3)
  centres = igpt_jax.fit_palette(pixels, 8, iterations=10, seed=0)
  assert centres.shape == (8, 3) and centres.dtype == np.float32
  distances = np.sqrt(((true[:, None] - centres[None]) ** 2).sum(-1))
  # Every true centre has a fitted centre within 0.02, and the matching is one to one.
  assert distances.min(axis=1).max() < 0.02
  assert len(set(distances.argmin(axis=1))) == 8
  # Deterministic for a seed, and the same from an iterator of {"image": ...} batches.
  np.testing.assert_array_equal(igpt_jax.fit_palette(pixels, 8, iterations=10, seed=0), centres)
  from_batches = igpt_jax.fit_palette(({"image": b} for b in np.split(pixels, 4)), 8,
                                      iterations=10, seed=0)
  np.testing.assert_array_equal(from_batches, centres)


def test_kmeans_refills_empty_clusters():
  # Three distinct colours, five clusters: no centre may be NaN or far from the data.
  colours = np.array([[-1, -1, -1], [0, 0, 0], [1, 1, 1]], np.float32)
  pixels = np.repeat(colours, [300, 20, 5], axis=0)
  centres = igpt_jax.fit_palette(pixels, 5, iterations=5, seed=1)
  assert np.isfinite(centres).all()
  assert np.abs(centres[:, None] - colours[None]).sum(-1).min(axis=1).max() < 1e-6
  assert {tuple(c) for c in centres} == {tuple(c) for c in colours}


def test_palette_file_round_trip(tmp_path):
  palette = _random_palette(16)
  path = str(tmp_path / "sub" / "palette.npy")
  igpt_jax.save_palette(path, palette)
  loaded = igpt_jax.load_palette(path, num_clusters=16)
  assert loaded.dtype == np.float32
  np.testing.assert_array_equal(loaded, palette)


def test_palette_file_errors_name_the_path_and_the_fix(tmp_path):
  missing = str(tmp_path / "missing.npy")
  with pytest.raises(ValueError, match="missing.npy.*palette"):
    igpt_jax.load_palette(missing)
  wrong_shape = str(tmp_path / "wrong_shape.npy")
  np.save(wrong_shape, np.zeros((16, 4), np.float32))
  with pytest.raises(ValueError, match="wrong_shape.npy.*not float \\[num_clusters, 3\\]"):
    igpt_jax.load_palette(wrong_shape)
  wrong_dtype = str(tmp_path / "wrong_dtype.npy")
  np.save(wrong_dtype, np.zeros((16, 3), np.int32))
  with pytest.raises(ValueError, match="wrong_dtype.npy"):
    igpt_jax.load_palette(wrong_dtype)
  not_npy = tmp_path / "garbage.npy"
  not_npy.write_bytes(b"not a numpy file")
  with pytest.raises(ValueError, match="garbage.npy.*not a readable"):
    igpt_jax.load_palette(str(not_npy))
  good = str(tmp_path / "good.npy")
  igpt_jax.save_palette(good, _random_palette(16))
  with pytest.raises(ValueError, match="good.npy.*16 colours.*num_clusters=512"):
    igpt_jax.load_palette(good, num_clusters=512)
  with pytest.raises(ValueError, match=r"\[num_clusters, 3\]"):
    igpt_jax.save_palette(good, np.zeros((16, 2)))
