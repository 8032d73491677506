"""iGPT models, tasks and linear probes: sizes, OpenAI's maths, causality, objectives, probes."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import igpt_jax
from common_jax.layers import count_params
from igpt_jax import blocks, models, probe

TINY = dict(width=16, depth=2, num_heads=2)


def tiny_model(image_size=4, num_clusters=16, **options):
  return igpt_jax.create_model("custom", image_size=image_size, num_clusters=num_clusters,
                               **dict(TINY, **options))


def random_variables(model, seed=0, scale=0.3):
  """Random parameters of the model's shapes (gains near 1), none trivial like wtet's zero init.

  Drawn with numpy from the abstract shapes: no init to compile.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    value = scale * rng.standard_normal(leaf.shape)
    return (value + (path[-1].key == "g")).astype(np.float32)

  return jax.tree_util.tree_map_with_path(
      draw, nn.meta.unbox(igpt_jax.abstract_variables(model)))


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, method, static):
  return jax.jit(lambda variables, *args, **kwargs: model.apply(
      variables, *args, method=method, **dict(static), **kwargs))


def apply(model, variables, *args, method=None, **static):
  """model.apply, compiled once per (model, method, static keyword arguments)."""
  static = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(static.items()))
  masked = dict(static).get("masked")
  if masked is not None:  # arrays are not static
    static = tuple((k, v) for k, v in static if k != "masked")
    return _jitted_apply(model, method, static)(variables, *args, masked=masked)
  return _jitted_apply(model, method, static)(variables, *args)


def random_ids(model, batch=2, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, model.seq_len), 0,
                            model.num_clusters)


# ------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("variant, expected", [
    ("S", 76_571_648),        # OpenAI's iGPT-S: 76M
    ("M", 455_157_760),       # iGPT-M: 455M
    ("L", 1_362_250_752),     # iGPT-L: 1362M
    ("XL", 6_801_438_720),    # iGPT-XL (60 x 3072) at 32x32: 6.8B
])
def test_parameter_counts_match_openai(variant, expected):
  model = igpt_jax.create_model(variant, image_size=32, num_clusters=512)
  assert count_params(igpt_jax.abstract_variables(model)) == expected


def test_every_parameter_has_logical_axis_names():
  shapes = igpt_jax.abstract_variables(tiny_model(num_classes=3))
  boxed = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
  assert all(len(x.names) == len(x.value.shape) for x in boxed)
  params = nn.meta.unbox(shapes)["params"]
  assert params["h_0"]["attn"]["q_proj"].shape == (2, 8, 16)  # [heads, head_dim, embed]
  assert params["wte"].shape == params["wtet"].shape == (16, 16)
  assert params["wpe"].shape == (16, 16) and params["sos"].shape == (16,)
  assert params["clf"].shape == (3, 16)


def test_logits_shape_and_dtype():
  model = tiny_model()
  variables = random_variables(model)
  assert apply(model, variables, random_ids(model)).shape == (2, 16, 16)
  bf16 = tiny_model(dtype=jnp.bfloat16)
  logits = bf16.apply(variables, random_ids(model))
  assert logits.shape == (2, 16, 16) and logits.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# OpenAI's maths, in numpy


def numpy_reference(params, ids, num_heads, causal=True, masked=None):
  """OpenAI's image-gpt model.py, line by line, in float64: (logits, features per layer)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

  def norm(x, g):
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-5) * g

  def gelu2(x):
    return x / (1.0 + np.exp(-1.702 * x))

  ids = np.asarray(ids)
  batch, length = ids.shape
  h = p["wte"][ids]
  if causal:
    h = np.concatenate([np.broadcast_to(p["sos"], (batch, 1, h.shape[-1])), h[:, :-1]], axis=1)
  elif masked is not None:
    h = h * (1.0 - np.asarray(masked, np.float64))[..., None]
  h = h + p["wpe"][:length]
  features = []
  depth = len([k for k in p if k.startswith("h_")])
  for i in range(depth):
    block = p[f"h_{i}"]
    x = norm(h, block["ln_1"]["g"])
    features.append(x.mean(axis=1))
    attn = block["attn"]
    q, k, v = (np.einsum("bsf,hef->bhse", x, attn[n]) for n in ("q_proj", "k_proj", "v_proj"))
    w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if causal:
      keep = np.tril(np.ones((length, length)))
      w = w * keep - 1e10 * (1 - keep)
    w = np.exp(w - w.max(axis=-1, keepdims=True))
    w = w / w.sum(axis=-1, keepdims=True)
    h = h + np.einsum("bhse,hef->bsf", w @ v, attn["c_proj"])
    x = norm(h, block["ln_2"]["g"])
    h = h + gelu2(x @ block["mlp"]["c_fc"]) @ block["mlp"]["c_proj"]
  h = norm(h, p["ln_f"]["g"])
  features.append(h.mean(axis=1))
  return h @ p["wtet"].T, np.stack(features)


@pytest.mark.parametrize("causal", [True, False])
def test_logits_and_features_match_numpy_reference(causal):
  model = tiny_model(causal=causal)
  variables = random_variables(model)
  ids = random_ids(model)
  masked = None if causal else jax.random.bernoulli(jax.random.PRNGKey(5), 0.3, ids.shape)
  expected_logits, expected_features = numpy_reference(variables["params"], ids, 2, causal,
                                                       masked)
  logits = apply(model, variables, ids, masked=masked)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
  features = apply(model, variables, ids, masked=masked, method=models.ImageGPT.features)
  assert features.shape == (3, 2, 16)
  np.testing.assert_allclose(features, expected_features, rtol=1e-4, atol=1e-4)
  # One layer alone (the blocks above it are not run).
  np.testing.assert_allclose(apply(model, variables, ids, masked=masked, features_layer=1),
                             expected_features[1], rtol=1e-4, atol=1e-4)


def test_norm_and_activation_formulas():
  x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32) * 3
  norm = blocks.RMSNorm()
  variables = norm.init(jax.random.PRNGKey(0), x)
  gain = np.linspace(0.5, 2.0, 8).astype(np.float32)
  y = norm.apply({"params": {"g": gain}}, x)
  # No mean subtraction: the norm divides by the root mean square, eps 1e-5, times the gain.
  np.testing.assert_allclose(y, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * gain,
                             rtol=1e-6)
  assert set(nn.meta.unbox(variables)["params"]) == {"g"}  # gain only, no bias
  np.testing.assert_allclose(blocks.quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)


def test_initialisation_follows_openai():
  # Through FineTuneTask.init_variables, so the zero-initialised head is covered as well.
  task = igpt_jax.FineTuneTask(_palette(64), num_classes=5, variant="custom", image_size=8,
                               model_options=dict(width=64, depth=4, num_heads=4))
  model = task.model
  init_variables = jax.jit(task.init_variables)
  params = nn.meta.unbox(init_variables(jax.random.PRNGKey(0), task.dummy_batch(1)))
  params = params["params"]
  np.testing.assert_allclose(params["wte"].std(), 0.02, rtol=0.05)
  np.testing.assert_allclose(params["wpe"].std(), 0.01, rtol=0.05)
  np.testing.assert_allclose(params["sos"].std(), 0.02, rtol=0.3)
  attn = params["h_0"]["attn"]
  np.testing.assert_allclose(attn["q_proj"].std(), 64**-0.5, rtol=0.05)
  np.testing.assert_allclose(attn["c_proj"].std(), (64 * 4)**-0.5, rtol=0.05)
  np.testing.assert_allclose(params["h_0"]["mlp"]["c_fc"].std(), 0.02, rtol=0.05)
  np.testing.assert_array_equal(params["ln_f"]["g"], 1.0)
  np.testing.assert_array_equal(params["wtet"], 0.0)
  np.testing.assert_array_equal(params["clf"], 0.0)


# ------------------------------------------------------------------------------------------------
# Objectives


def test_autoregressive_model_is_causal_and_shifted():
  model = tiny_model()
  variables = random_variables(model)
  ids = random_ids(model)
  logits = apply(model, variables, ids)
  for t in (0, 5, 15):
    changed = ids.at[:, t].set((ids[:, t] + 1) % model.num_clusters)
    new = apply(model, variables, changed)
    # Output t predicts token t from tokens < t: positions <= t cannot see token t ...
    np.testing.assert_array_equal(new[:, :t + 1], logits[:, :t + 1])
    # ... and position t + 1 does.
    if t + 1 < model.seq_len:
      assert np.abs(new[:, t + 1] - logits[:, t + 1]).min() > 1e-4


def test_bert_model_sees_everything_except_masked_tokens():
  model = tiny_model(causal=False)
  variables = random_variables(model)
  assert "sos" not in variables["params"]  # no start token, no shift
  ids = random_ids(model)
  masked = jnp.zeros(ids.shape, bool).at[:, 3].set(True)
  logits = apply(model, variables, ids, masked=masked)
  changed = ids.at[:, 3].add(1) % model.num_clusters
  # A masked token's value is invisible (its input embedding is zero) ...
  np.testing.assert_array_equal(apply(model, variables, changed, masked=masked), logits)
  # ... while an unmasked token is seen by every position, earlier ones included.
  unmasked = apply(model, variables, changed)
  assert np.abs(unmasked[:, 0] - apply(model, variables, ids)[:, 0]).min() > 1e-4


def test_bad_inputs_raise_one_clear_error():
  model = tiny_model()
  variables = random_variables(model)
  with pytest.raises(ValueError, match="longer than the model's 16 positions.*image_size"):
    apply(model, variables, jnp.zeros((1, 25), jnp.int32))
  with pytest.raises(ValueError, match="probe layer 3 is out of range; use 0..2"):
    apply(model, variables, random_ids(model), features_layer=3)
  with pytest.raises(ValueError, match="probe layer -1"):
    apply(model, variables, random_ids(model), method=models.ImageGPT.features, layers=[-1])
  with pytest.raises(ValueError, match="variant 'XXL' is unknown"):
    igpt_jax.create_model("XXL")
  with pytest.raises(ValueError, match="needs \\['depth'\\]"):
    igpt_jax.create_model("custom", width=16, num_heads=2)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    igpt_jax.create_model("S", num_heads=7)
  with pytest.raises(ValueError, match="autoregressive.*causal=False"):
    apply(model, variables, random_ids(model), masked=jnp.zeros((2, 16), bool))


# ------------------------------------------------------------------------------------------------
# Tasks


def _palette(num_clusters=16):
  return np.random.default_rng(0).uniform(-1, 1, (num_clusters, 3)).astype(np.float32)


def compiled(task):
  """The task's init_variables, loss_and_metrics and eval_sums, jitted as the loop does."""
  return (jax.jit(task.init_variables),
          jax.jit(task.loss_and_metrics, static_argnames="train"),
          jax.jit(task.eval_sums))


def _images(palette, batch=4, size=4, seed=0):
  ids = np.random.default_rng(seed).integers(0, len(palette), (batch, size, size))
  return palette[ids], ids.reshape(batch, -1)


def test_autoregressive_task_loss_metrics_and_eval_weights():
  palette = _palette()
  task = igpt_jax.AutoregressiveTask(palette, variant="custom", image_size=4, model_options=TINY)
  model = task.model
  _, loss_and_metrics, eval_sums = compiled(task)
  assert task.headline_metric == "bits_per_token"
  params = random_variables(model)["params"]
  images, ids = _images(palette, batch=3)
  loss, metrics = loss_and_metrics(params, {"image": images}, jax.random.PRNGKey(1),
                                   train=True)
  # Next-pixel cross-entropy of the quantized image, in nats and in bits.
  logits = apply(model, {"params": params}, ids)
  expected = np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["bits_per_token"], expected / math.log(2), rtol=1e-5)
  # Eval sums weight rows by batch["mask"]: a padding row changes nothing.
  full = eval_sums(params, {"image": images[:2], "mask": np.ones(2, np.float32)})
  padded = eval_sums(params, {"image": images, "mask": np.array([1, 1, 0], np.float32)})
  assert float(padded["count"]) == 2.0
  np.testing.assert_allclose(padded["bits_per_token"], full["bits_per_token"], rtol=1e-6)
  with pytest.raises(ValueError, match="image_size=4"):
    loss_and_metrics(params, {"image": np.zeros((1, 8, 8, 3), np.float32)},
                     jax.random.PRNGKey(0), train=False)


def test_autoregressive_task_loss_decreases():
  palette = _palette()
  task = igpt_jax.AutoregressiveTask(palette, variant="custom", image_size=4, model_options=TINY)
  model = task.model
  params = random_variables(model, scale=0.05)["params"]
  batch = {"image": _images(palette, batch=8)[0]}
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    (loss, _), grads = jax.value_and_grad(task.loss_and_metrics, has_aux=True)(
        params, batch, jax.random.PRNGKey(0), True)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0]


def test_bert_task_masks_15_percent_and_scores_only_masked_positions(monkeypatch):
  palette = _palette()
  task = igpt_jax.BertTask(palette, variant="custom", image_size=4, model_options=TINY)
  model = task.model
  assert not model.causal
  ids = jnp.zeros((256, 1024), jnp.int32)
  rate = float(jnp.mean(jax.jit(task.bert_mask)(jax.random.PRNGKey(0), ids)))
  assert abs(rate - 0.15) < 0.005
  assert not np.array_equal(task.bert_mask(jax.random.PRNGKey(0), ids[:4]),
                            task.bert_mask(jax.random.PRNGKey(1), ids[:4]))
  # The loss is the mean cross-entropy over masked positions only (per image, then over images).
  params = random_variables(model)["params"]
  images, ids = _images(palette, batch=3)
  masked = np.zeros(ids.shape, bool)
  masked[0, [1, 4]] = masked[1, [0]] = masked[2, [2, 3, 15]] = True
  monkeypatch.setattr(task, "bert_mask", lambda rng, ids: jnp.asarray(masked))
  _, loss_and_metrics, _ = compiled(task)
  loss, metrics = loss_and_metrics(params, {"image": images}, jax.random.PRNGKey(0),
                                   train=True)
  logits = apply(model, {"params": params}, ids, masked=masked)
  nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, ids))
  expected = np.mean([nll[i][masked[i]].mean() for i in range(3)])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["bits_per_token"], expected / math.log(2), rtol=1e-5)
  # Unmasked positions' losses do not enter: inflating them changes nothing.
  from igpt_jax.tasks import masked_token_loss
  inflated = np.where(masked, nll, 1e6)
  np.testing.assert_allclose(masked_token_loss(inflated, masked).mean(), expected, rtol=1e-5)


def test_fine_tune_task_adds_generative_and_classification_losses():
  palette = _palette()
  task = igpt_jax.FineTuneTask(palette, num_classes=5, variant="custom", image_size=4,
                               model_options=TINY)
  model = task.model
  _, loss_and_metrics, eval_sums = compiled(task)
  assert task.headline_metric == "accuracy"
  params = random_variables(model)["params"]
  # With OpenAI's zero-initialised wtet and clf: L_GEN = ln 16 and L_CLF = ln 5.
  params = dict(params, wtet=np.zeros_like(params["wtet"]), clf=np.zeros_like(params["clf"]))
  images, _ = _images(palette, batch=4)
  batch = {"image": images, "label": np.array([0, 1, 2, 3], np.int32)}
  loss, metrics = loss_and_metrics(params, batch, jax.random.PRNGKey(0), train=True)
  np.testing.assert_allclose(metrics["gen_loss"], math.log(16), rtol=1e-6)
  np.testing.assert_allclose(metrics["clf_loss"], math.log(5), rtol=1e-6)
  np.testing.assert_allclose(loss, math.log(16) + math.log(5), rtol=1e-6)
  # Accuracy against labels, weighted by the eval mask.
  params = random_variables(model)["params"]
  _, class_logits = apply(model, {"params": params}, _images(palette, batch=4)[1],
                                method=models.ImageGPT.classify)
  predicted = np.asarray(jnp.argmax(class_logits, -1))
  batch["label"] = predicted.astype(np.int32)
  batch["label"][0] = (predicted[0] + 1) % 5
  sums = eval_sums(params, dict(batch, mask=np.array([1, 1, 1, 0], np.float32)))
  assert float(sums["accuracy"]) == 2.0 and float(sums["count"]) == 3.0


# ------------------------------------------------------------------------------------------------
# Linear probes


def _two_class_colour_problem(n, seed):
  """Class 0 images use ids 0..7, class 1 ids 8..15 (a bag-of-colours problem)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  ids = rng.integers(0, 8, (n, 16)) + 8 * labels[:, None]
  return ids.astype(np.int32), labels


def test_linear_probe_beats_chance_on_an_easy_problem():
  model = tiny_model()
  variables = random_variables(model, scale=0.1)
  train_ids, train_labels = _two_class_colour_problem(200, 0)
  test_ids, test_labels = _two_class_colour_problem(100, 1)
  train_features = probe.extract_features(model, variables, train_ids, batch_size=64)
  test_features = probe.extract_features(model, variables, iter(np.split(test_ids, 4)))
  assert train_features.shape == (3, 200, 16) and test_features.shape == (3, 100, 16)
  # Same features in batches as in one call (the padded last batch is trimmed).
  np.testing.assert_allclose(
      train_features[:, :10],
      apply(model, variables, train_ids[:10], method=models.ImageGPT.features), atol=1e-6)
  report = probe.probe_layers(train_features, train_labels, test_features, test_labels)
  assert [r["layer"] for r in report] == [0, 1, 2]
  assert all(r["test_accuracy"] > 0.9 for r in report), report
  again = probe.probe_layers(train_features, train_labels, test_features, test_labels)
  assert again == report  # deterministic
  palette = np.concatenate([np.full((8, 3), -0.5), np.full((8, 3), 0.5)]).astype(np.float32)
  palette += np.random.default_rng(2).uniform(-0.3, 0.3, palette.shape).astype(np.float32)
  pixels = probe.pixel_probe(train_ids, train_labels, test_ids, test_labels, palette)
  assert pixels["test_accuracy"] > 0.9
  # Labels the features cannot predict stay near chance on the test set.
  shuffled = probe.linear_probe(train_features[0], np.random.default_rng(3).permutation(
      train_labels), test_features[0], test_labels)
  assert shuffled["test_accuracy"] < 0.75


def test_cross_validation_matches_refitting_each_fold():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 90)
  for dim in (6, 120):  # the primal (shared Gram matrix) and the dual solves
    features = rng.normal(size=(90, dim)) + labels[:, None] * rng.normal(size=dim)
    penalties = (1e-3, 1e-1, 10.0)
    fast = probe.cross_validate(features, labels, l2=penalties, folds=3, seed=4)
    # Reference: fit a probe on each fold's complement from scratch.
    x = features
    held_out = np.array_split(np.random.default_rng(4).permutation(90), 3)
    for i, l2 in enumerate(penalties):
      correct = 0
      for held in held_out:
        keep = np.setdiff1d(np.arange(90), held)
        fit = probe.linear_probe(x[keep], labels[keep], x[held], labels[held], l2=l2, folds=0,
                                 num_classes=3)
        correct += round(fit["test_accuracy"] * len(held))
      assert fast[i] == pytest.approx(correct / 90)
  # linear_probe keeps the penalty with the best cross-validated accuracy.
  result = probe.linear_probe(features, labels, features[:10], labels[:10], l2=penalties,
                              folds=3, seed=4)
  best = int(np.argmax(probe.cross_validate(features, labels, l2=penalties, folds=3, seed=4)))
  assert result["l2"] == penalties[best]
  # The returned standardisation, weights and bias reproduce its predictions.
  scores = ((features[:10] - result["feature_mean"]) / result["feature_scale"] @ result["weights"]
            + result["bias"])
  assert np.mean(np.argmax(scores, 1) == labels[:10]) == pytest.approx(
      result["test_accuracy"], abs=0.1)


@pytest.mark.parametrize("l2, folds, message", [
    ((), 5, "must be one or more positive numbers"),
    ((1e-3, -1.0), 5, "must be one or more positive numbers"),
    ((1e-3,), 1, "probe folds=1 is invalid"),
    ((1e-3, 1e-2), 0, "needs cross-validation"),
])
def test_probe_settings_are_checked(l2, folds, message):
  with pytest.raises(ValueError, match=message):
    probe.check_probe_settings(l2, folds)


def test_sharded_loss_equals_unsharded():
  from common_jax import sharding  # pylint: disable=g-import-not-at-top
  palette = _palette()
  task = igpt_jax.AutoregressiveTask(palette, variant="custom", image_size=4, model_options=TINY)
  model = task.model
  params = random_variables(model)["params"]
  batch = {"image": _images(palette, batch=8)[0]}
  loss_fn = lambda p, b: task.loss_and_metrics(p, b, jax.random.PRNGKey(0), True)[0]
  expected = jax.jit(loss_fn)(params, batch)
  # data x fsdp x tensor = 2 x 2 x 2: batch, embed and heads/mlp/vocab all split.
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  rules = list(sharding.DEFAULT_RULES)
  shardings = sharding.logical_shardings(igpt_jax.abstract_variables(model), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded_params = jax.device_put(params, nn.meta.unbox(shardings)["params"])
    assert sharded_params["h_0"]["mlp"]["c_fc"].sharding.spec == jax.P("fsdp", "tensor")
    loss = jax.jit(loss_fn)(sharded_params, sharding.global_batch(batch, mesh))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
