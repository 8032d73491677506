"""iGPT sampling: the KV-cache decoder equals the no-cache reference; prompts, top-k, PNG grids."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import igpt_jax
from igpt_jax import sampling

NUM_CLUSTERS = 16


def tiny_model(**options):
  return igpt_jax.create_model("custom", width=16, depth=2, num_heads=2, image_size=6,
                               num_clusters=NUM_CLUSTERS, **options)


def random_variables(model, seed=0, scale=0.5):
  """Random parameters (gains near 1) from numpy, so the logits are far from uniform."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    return (scale * rng.standard_normal(leaf.shape) + (path[-1].key == "g")).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
      draw, nn.meta.unbox(igpt_jax.abstract_variables(model)))


MODEL = tiny_model()
VARIABLES = random_variables(MODEL)
PROMPT = np.random.default_rng(1).integers(0, NUM_CLUSTERS, (3, 14)).astype(np.int32)


@pytest.mark.parametrize("prompt, num_samples, temperature, top_k", [
    (None, 3, 1.0, None),
    (PROMPT, None, 0.7, 5),
    (None, 8, 1.3, 7),
])
def test_cache_decoder_equals_no_cache_reference(prompt, num_samples, temperature, top_k):
  rng = jax.random.PRNGKey(42)
  kwargs = dict(num_samples=num_samples, prompt=prompt, temperature=temperature, top_k=top_k,
                return_logits=True)
  ids, logits = igpt_jax.sample(MODEL, VARIABLES, rng, **kwargs)
  reference_ids, reference_logits = sampling.sample_without_cache(MODEL, VARIABLES, rng, **kwargs)
  assert ids.shape == (num_samples or len(prompt), 36) and ids.dtype == jnp.int32
  # Same logits at every sampled position (float rounding only) and exactly the same tokens.
  np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ids, reference_ids)
  assert len(np.unique(np.asarray(ids))) > 4  # really sampled, not a constant image
  if prompt is not None:
    np.testing.assert_array_equal(ids[:, :14], prompt)
    np.testing.assert_array_equal(logits[:, :14], 0.0)
  if top_k is not None:
    # Each sampled token is one of the top_k most likely under the model.
    ranks = (np.asarray(reference_logits) > np.take_along_axis(
        np.asarray(reference_logits), np.asarray(ids)[..., None], axis=-1)).sum(-1)
    assert ranks[:, 0 if prompt is None else 14:].max() < top_k


def test_top_1_is_greedy_and_the_seed_decides_the_rest():
  ids, logits = igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0), prompt=PROMPT, top_k=1,
                                return_logits=True)
  np.testing.assert_array_equal(ids[:, 14:], np.argmax(logits[:, 14:], axis=-1))
  a = igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0), prompt=PROMPT)
  b = igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0), prompt=PROMPT)
  c = igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(1), prompt=PROMPT)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_zero_is_a_colour_not_a_missing_prompt():
  # A prompt of colour 0 is kept as a prompt; "no prompt" is prompt_len = 0.
  zeros = np.zeros((3, 14), np.int32)
  prompted = igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0), prompt=zeros)
  unprompted = igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0), num_samples=3)
  np.testing.assert_array_equal(prompted[:, :14], 0)
  assert not np.array_equal(prompted[:, 14:], unprompted[:, 14:])


def test_one_compiled_step_per_cache_segment():
  assert sampling.segment_ends(0, 1024) == [256, 512, 768, 1024]
  assert sampling.segment_ends(300, 1024) == [512, 768, 1024]
  assert sampling.segment_ends(0, 36) == [9, 18, 27, 36]
  assert sampling.segment_ends(0, 3) == [1, 2, 3]
  assert sampling.segment_ends(36, 36) == []
  decoder = sampling.make_decoder(MODEL, use_cache=True)
  jaxpr = jax.make_jaxpr(decoder)(VARIABLES, jax.random.PRNGKey(0), PROMPT, jnp.float32(1.0))
  text = str(jaxpr)
  # One loop per segment with positions to sample (fori_loop lowers to a while loop or a scan),
  # no per-position code: prompt 14 of 36 leaves the segments ending at 18, 27 and 36.
  assert text.count("while[") + text.count("scan[") == 3
  assert len(text) < 600_000


def _large_copies_in_loops(hlo: str, min_elements: int):
  """Transposes and copies of arrays with >= min_elements inside any computation but the entry
  one (loop bodies and what they call), as (op, shape) pairs."""
  found, in_entry = [], False
  for line in hlo.splitlines():
    if line and not line.startswith(" "):
      in_entry = line.startswith("ENTRY")
    match = re.search(r"= f32\[([\d,]*)\]\{[\d,]*\} (transpose|copy)\(", line)
    if match and not in_entry:
      if np.prod([int(d) for d in match.group(1).split(",") if d]) >= min_elements:
        found.append((match.group(2), match.group(1)))
  return found


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_steps_update_the_cache_in_place(batch):
  # The cost of a step at batch 8 and more was XLA transposing every layer's whole key and value
  # cache at every step ([batch, positions, heads, head_dim] layout), and at batch 1 copying it
  # ([batch, heads, positions, head_dim]); the compiled loops must do neither.
  decoder = sampling.make_decoder(MODEL, use_cache=True)
  hlo = decoder.lower(VARIABLES, jax.random.PRNGKey(0), np.zeros((batch, 0), np.int32),
                      jnp.float32(1.0)).compile().as_text()
  smallest_cache = batch * MODEL.num_heads * sampling.segment_ends(0, 36)[0] * MODEL.head_dim
  assert hlo.count(" while(") >= 4
  assert _large_copies_in_loops(hlo, smallest_cache) == []


def test_kth_largest_is_top_k_without_the_sort():
  rng = np.random.default_rng(0)
  values = rng.standard_normal((6, 50)).astype(np.float32) * 10
  values[0] = np.round(values[0])  # many ties
  values[1, :5] = [-np.inf, np.inf, 0.0, -0.0, -np.inf]
  values[2] = -np.abs(values[2])  # all negative
  values[3] = 7.0  # all equal
  for k in (1, 2, 5, 17, 49, 50):
    expected = np.asarray(jax.lax.top_k(values, k)[0][:, -1:])
    actual = np.asarray(sampling.kth_largest(jnp.asarray(values), k))
    np.testing.assert_array_equal(actual.view(np.int32), expected.view(np.int32))


def test_a_whole_image_prompt_comes_back_unchanged():
  prompt = np.random.default_rng(3).integers(0, NUM_CLUSTERS, (2, 36)).astype(np.int32)
  np.testing.assert_array_equal(igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0),
                                                prompt=prompt), prompt)


def test_bad_sampling_requests_raise():
  with pytest.raises(ValueError, match="autoregressive"):
    igpt_jax.sample(tiny_model(causal=False), VARIABLES, jax.random.PRNGKey(0), num_samples=1)
  with pytest.raises(ValueError, match="temperature"):
    igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0), num_samples=1, temperature=0.0)
  with pytest.raises(ValueError, match="num_samples"):
    igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="np.repeat"):
    igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0), num_samples=2, prompt=PROMPT)
  with pytest.raises(ValueError, match="prompt_len <= 36"):
    igpt_jax.sample(MODEL, VARIABLES, jax.random.PRNGKey(0), prompt=np.zeros((1, 40), np.int32))


def test_sample_grid_png(tmp_path):
  palette = np.random.default_rng(0).uniform(-1, 1, (NUM_CLUSTERS, 3)).astype(np.float32)
  originals = np.random.default_rng(1).integers(0, NUM_CLUSTERS, (2, 36))
  samples = np.random.default_rng(2).integers(0, NUM_CLUSTERS, (2, 3, 36))
  path = str(tmp_path / "grid.png")
  igpt_jax.save_sample_grid(path, palette, samples, originals=originals, prompt_len=18, scale=4,
                            separator=2)
  grid = np.asarray(Image.open(path))
  # Rows: 2 images; columns: prompt | 3 samples | original; 6x6 images at 4x, 2-pixel lines.
  assert grid.shape == (2 * 24 + 3 * 2, 5 * 24 + 6 * 2, 3)
  to_rgb = lambda ids: np.rint(127.5 * (palette[ids] + 1)).astype(np.uint8)
  cell = lambda i, j: grid[2 + i * 26:2 + i * 26 + 24, 2 + j * 26:2 + j * 26 + 24]
  np.testing.assert_array_equal(cell(1, 2)[::4, ::4], to_rgb(samples[1, 1]).reshape(6, 6, 3))
  np.testing.assert_array_equal(cell(0, 4)[::4, ::4], to_rgb(originals[0]).reshape(6, 6, 3))
  prompt = cell(0, 0)[::4, ::4].reshape(36, 3)
  np.testing.assert_array_equal(prompt[:18], to_rgb(originals[0, :18]))
  np.testing.assert_array_equal(prompt[18:], 128)  # the part to complete is grey
  assert (grid[:2] == 255).all() and (grid[:, 26:28] == 255).all()  # separator lines
