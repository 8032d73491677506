"""Model switches (scan_layers, remat_policy, bfloat16 activations, moment_dtype) change how a
model runs, never what it computes: equal outputs and gradients, equal train steps on a sharded
mesh, unchanged parameter counts, and weights that load and export bit-identically in either
block layout."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import igpt_jax
import run
import vit_jax
from common_jax import checkpoint as checkpoint_lib
from common_jax import layers
from common_jax import optim
from common_jax import sharding
from common_jax import train
from common_jax import trees
from common_jax import weights
from configs import vit_digits
from igpt_jax import hf as igpt_hf
from igpt_jax import openai as igpt_openai
from igpt_jax import models as igpt_models
from igpt_jax import pretrained as igpt_pretrained
from vit_jax import adapt
from vit_jax import models as vit_models
from vit_jax import npz as vit_npz
from vit_jax import pretrained as vit_pretrained
from vit_jax import timm as vit_timm
from vit_jax.tasks import ClassificationTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_SHAPE = dict(width=32, depth=3, mlp_dim=64, num_heads=4, patch_size=2)
IGPT_SHAPE = dict(width=32, depth=3, num_heads=4, mlp_dim=64)
BLOCKS = {"vit": adapt.BLOCKS, "igpt": igpt_pretrained.BLOCKS}
SWITCHES = [(False, "dots_saveable"), (False, "full"), (True, "none"), (True, "dots_saveable"),
            (True, "full")]


def _model(family, **options):
  if family == "vit":
    return vit_jax.create_model("custom", num_classes=10, image_size=8,
                                **dict(VIT_SHAPE, **options))
  return igpt_jax.create_model("custom", image_size=4, num_clusters=16,
                               **dict(IGPT_SHAPE, **options))


def _abstract(model):
  abstract = (vit_models.abstract_variables if isinstance(model, vit_models.VisionTransformer)
              else igpt_models.abstract_variables)
  return abstract(model)["params"]


def _random_params(model, seed=0, scale=0.3):
  """Every parameter random and non-trivial (no zero head; norm gains near 1), per block, as a
  numpy tree."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    gain = path[-1].key in ("scale", "g")
    return (scale * rng.standard_normal(leaf.shape) + gain).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(_abstract(model)))


def _in_layout(params, family, scanned):
  return trees.unflatten(trees.in_layout(trees.flatten(params), BLOCKS[family], scanned))


def _inputs(family):
  if family == "vit":
    return jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3), minval=-1, maxval=1)
  return jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 16)


def _logits_and_grads(model, params, inputs):
  """Eval-mode logits, and gradients of a train-mode scalar loss (no dropout), jitted."""

  def loss(params):
    out = model.apply({"params": params}, inputs, train=True)
    return jnp.mean(jnp.sin(out.astype(jnp.float32)))  # every logit matters

  return jax.jit(lambda p: (model.apply({"params": p}, inputs), jax.grad(loss)(p)))(params)


def _assert_trees_close(actual, expected, rtol, atol):
  actual, expected = trees.flatten(actual), trees.flatten(expected)
  assert sorted(actual) == sorted(expected)
  for key in expected:
    np.testing.assert_allclose(np.asarray(actual[key], np.float32),
                               np.asarray(expected[key], np.float32), rtol=rtol, atol=atol,
                               err_msg=key)


def _assert_bit_identical(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    got, want = np.asarray(actual[key]), np.asarray(value)
    assert got.dtype == want.dtype and got.shape == want.shape, key
    assert got.tobytes() == want.tobytes(), f"{key} differs"


# ------------------------------------------------------------------------------------------------
# The converter


def test_converter_stacks_blocks_and_back_bit_identically():
  rng = np.random.default_rng(0)
  flat = {f"h_{i}/attn/q_proj": rng.standard_normal((2, 3)).astype(np.float32) for i in range(3)}
  flat.update({f"h_{i}/ln_1/g": rng.standard_normal(3).astype(np.float32) for i in range(3)})
  flat["wte"] = rng.standard_normal((4, 3)).astype(np.float32)
  stacked = trees.stack_layers(flat, "h")
  assert sorted(stacked) == ["h/attn/q_proj", "h/ln_1/g", "wte"]
  assert stacked["h/attn/q_proj"].shape == (3, 2, 3)
  np.testing.assert_array_equal(stacked["h/ln_1/g"][2], flat["h_2/ln_1/g"])
  _assert_bit_identical(trees.unstack_layers(stacked, "h"), flat)
  # Already in the requested layout: unchanged.
  assert trees.stack_layers(stacked, "h").keys() == stacked.keys()
  assert trees.unstack_layers(flat, "h").keys() == flat.keys()
  assert trees.stack_shapes(trees.flat_shapes(flat), "h") == trees.flat_shapes(stacked)
  assert trees.unstack_shapes(trees.flat_shapes(stacked), "h") == trees.flat_shapes(flat)
  # Blocks that cannot be stacked are refused with one sentence naming the key.
  incomplete = {k: v for k, v in flat.items() if k != "h_1/ln_1/g"}
  with pytest.raises(ValueError, match=r"^`h_1/ln_1/g` is missing from the parameters \(block 0 "
                                       r"has `h_0/ln_1/g`\), so the 3 blocks cannot be stacked"):
    trees.stack_layers(incomplete, "h")
  misshapen = dict(trees.flat_shapes(flat), **{"h_2/ln_1/g": (4,)})
  with pytest.raises(ValueError, match=r"`h_2/ln_1/g` has shape \(4,\) in the parameters but "
                                       r"`h_0/ln_1/g` has \(3,\)"):
    trees.stack_shapes(misshapen, "h")


def test_stored_tensors_are_read_in_the_model_layout():
  rng = np.random.default_rng(1)
  flat = {f"Transformer/encoderblock_{i}/Dense_0/kernel": rng.standard_normal((2, 2))
          for i in range(2)}
  flat["head/kernel"] = rng.standard_normal((2, 5))
  reads = []
  stored = weights.Tensors("a file", trees.flat_shapes(flat),
                           lambda key: reads.append(key) or flat[key])
  assert weights.in_layout(stored, adapt.BLOCKS, False) is stored  # nothing to convert
  scanned = weights.in_layout(stored, adapt.BLOCKS, True)
  assert scanned.shapes == {"Transformer/encoderblock/Dense_0/kernel": (2, 2, 2),
                            "head/kernel": (2, 5)}
  assert not reads  # shapes only until an array is asked for
  np.testing.assert_array_equal(scanned.read("Transformer/encoderblock/Dense_0/kernel")[1],
                                flat["Transformer/encoderblock_1/Dense_0/kernel"])
  back = weights.in_layout(
      weights.Tensors.from_arrays({k: scanned.read(k) for k in scanned.shapes}, "stacked"),
      adapt.BLOCKS, False)
  _assert_bit_identical({k: back.read(k) for k in back.shapes}, flat)


# ------------------------------------------------------------------------------------------------
# Same model, same numbers


@pytest.mark.parametrize("family, variant, expected", [
    ("vit", "B/16", 86_567_656), ("igpt", "S", 76_571_648)])
def test_parameter_counts_and_names_do_not_change(family, variant, expected):
  create = vit_jax.create_model if family == "vit" else igpt_jax.create_model
  options = dict(num_classes=1000) if family == "vit" else dict(image_size=32, num_clusters=512)
  plain = _abstract(create(variant, **options))
  scanned = _abstract(create(variant, scan_layers=True, remat_policy="full", **options))
  assert layers.count_params(scanned) == layers.count_params(plain) == expected
  plain_shapes, scanned_shapes = trees.flat_shapes(plain), trees.flat_shapes(scanned)
  assert trees.unstack_shapes(scanned_shapes, BLOCKS[family]) == plain_shapes
  # Stacked parameters carry the "layers" logical axis first, which the default rules keep
  # unsharded; the others carry exactly the per-block names.
  boxed = jax.tree_util.tree_leaves_with_path(
      scanned, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  stacked = [names for path, names in (
      ("/".join(k.key for k in path), leaf.names) for path, leaf in boxed)
             if path.startswith(BLOCKS[family] + "/")]
  assert stacked and all(names[0] == layers.LAYERS for names in stacked)
  assert (layers.LAYERS, None) in sharding.DEFAULT_RULES
  assert all(any(k.startswith(stack + "/") for stack in trees.LAYER_STACKS)
             for k in scanned_shapes if k not in plain_shapes)


@pytest.mark.parametrize("family", ["vit", "igpt"])
def test_outputs_and_gradients_equal_across_switches(family):
  reference_model = _model(family)
  params = _random_params(reference_model)
  inputs = _inputs(family)
  expected_logits, expected_grads = _logits_and_grads(reference_model, params, inputs)
  assert float(jnp.std(expected_logits)) > 0.1  # a test of something
  for scan_layers, remat_policy in SWITCHES:
    model = _model(family, scan_layers=scan_layers, remat_policy=remat_policy)
    logits, grads = _logits_and_grads(model, _in_layout(params, family, scan_layers), inputs)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5,
                               err_msg=f"{scan_layers}, {remat_policy}")
    _assert_trees_close(_in_layout(grads, family, False), expected_grads, 1e-5, 1e-5)


def _relative_error(actual, expected):
  """||actual - expected|| / ||expected|| over all leaves of two trees (or two arrays)."""
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(leaf, np.float32))
                                      for _, leaf in sorted(trees.flatten(tree).items())]
                                     if isinstance(tree, dict) else [np.ravel(tree)])
  actual, expected = flat(actual), flat(expected)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("family", ["vit", "igpt"])
def test_bfloat16_activations_with_float32_master_weights(family):
  params = _random_params(_model(family))
  inputs = _inputs(family)
  fp32_logits, fp32_grads = _logits_and_grads(_model(family), params, inputs)
  reference, reference_grads = _logits_and_grads(_model(family, dtype=jnp.bfloat16), params,
                                                 inputs)
  # Logits come out in float32 and gradients in the parameters' float32; the bfloat16 model
  # computes what the float32 one does, to bfloat16's precision (8 bits of mantissa).
  assert reference.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(reference_grads))
  logits_tolerance = _relative_error(reference, fp32_logits)
  grads_tolerance = _relative_error(reference_grads, fp32_grads)
  assert 0 < logits_tolerance < 0.05 and 0 < grads_tolerance < 0.05
  # A switch moves the bfloat16 results (XLA rounds scanned and rematerialised code in other
  # places) by no more than bfloat16 itself does: at most twice the bf16-vs-fp32 distance.
  for scan_layers, remat_policy in [(True, "none"), (True, "full"), (False, "dots_saveable")]:
    model = _model(family, dtype=jnp.bfloat16, scan_layers=scan_layers,
                   remat_policy=remat_policy)
    logits, grads = _logits_and_grads(model, _in_layout(params, family, scan_layers), inputs)
    assert _relative_error(logits, reference) <= 2 * logits_tolerance
    assert _relative_error(_in_layout(grads, family, False), reference_grads) <= (
        2 * grads_tolerance)


def _primitives(jaxpr) -> dict:
  """{primitive name: [its equations' params]} over a closed jaxpr and every jaxpr inside it."""
  found = {}

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.setdefault(eqn.primitive.name, []).append(eqn.params)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jaxpr.jaxpr)
  return found


@pytest.mark.parametrize("family", ["vit", "igpt"])
def test_switches_really_change_the_program(family):
  """scan_layers: one scan of `depth` steps instead of `depth` blocks; remat: a checkpoint with
  the policy asked for, around each block."""
  params = _random_params(_model(family))
  inputs = _inputs(family)

  def program(**options):
    model = _model(family, **options)
    scanned = _in_layout(params, family, options.get("scan_layers", False))
    return _primitives(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply(
        {"params": p}, inputs, train=True))))(scanned))

  # The name jax.checkpoint's primitive has in this JAX version ("remat2" in 0.10).
  remat = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name
  plain, scanned = program(), program(scan_layers=True)
  assert "scan" not in plain and remat not in plain
  assert [params["length"] for params in scanned["scan"]] == [3, 3]  # forward and backward
  assert remat not in scanned
  for options, policy in [(dict(scan_layers=True, remat_policy="full"),
                           jax.checkpoint_policies.nothing_saveable),
                          (dict(remat_policy="dots_saveable"),
                           jax.checkpoint_policies.dots_saveable)]:
    checkpoints = program(**options)[remat]
    assert checkpoints and all(params["policy"] is policy for params in checkpoints)


def test_unknown_remat_policy_and_moment_dtype_are_refused_in_one_sentence():
  for family in ("vit", "igpt"):
    with pytest.raises(ValueError, match=r"^config.model.remat_policy='half' is unknown; use one "
                                         r"of none, dots_saveable, full\.$"):
      _model(family, remat_policy="half")
  with pytest.raises(ValueError, match=r"^config.optimizer.moment_dtype='float16' is unknown; "
                                       r"use one of float32, bfloat16\.$"):
    optim.make_optimizer(optim.OptimizerConfig(moment_dtype="float16"), 10)


def test_igpt_sampling_features_and_classify_work_scanned():
  """The block-by-block passes (probe features, KV-cache sampling) give the same numbers."""
  plain = _model("igpt", num_classes=3)
  params = _random_params(plain)
  scanned = _model("igpt", num_classes=3, scan_layers=True, remat_policy="full")
  stacked = _in_layout(params, "igpt", True)
  ids = _inputs("igpt")
  features = lambda model, p: model.apply({"params": p}, ids, layers=(0, 2, 3),
                                          method=igpt_models.ImageGPT.features)
  np.testing.assert_allclose(features(scanned, stacked), features(plain, params), atol=1e-5)
  classify = lambda model, p: model.apply({"params": p}, ids,
                                          method=igpt_models.ImageGPT.classify)[1]
  np.testing.assert_allclose(classify(scanned, stacked), classify(plain, params), atol=1e-5)
  sample = lambda model, p: igpt_jax.sample(model, {"params": p}, jax.random.PRNGKey(3),
                                            prompt=ids[:, :5], temperature=1.0)
  np.testing.assert_array_equal(sample(scanned, stacked), sample(plain, params))


# ------------------------------------------------------------------------------------------------
# The engine on a mesh


def _task(family, **options):
  if family == "vit":
    return ClassificationTask("custom", num_classes=10, image_size=8,
                              model_options=dict(VIT_SHAPE, **options))
  palette = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
  return igpt_jax.AutoregressiveTask(palette, variant="custom", image_size=4,
                                     model_options=dict(IGPT_SHAPE, **options))


def _batch(family, size=16):
  rng = np.random.default_rng(7)
  image_size = 8 if family == "vit" else 4
  batch = {"image": rng.uniform(-1, 1, (size, image_size, image_size, 3)).astype(np.float32)}
  if family == "vit":
    batch["label"] = rng.integers(0, 10, size).astype(np.int32)
  return batch


def _one_step(family, task, mesh, tx, params):
  """One train step of the engine from `params` (host, in the task model's layout; None: the
  trainer's own initial parameters) -> (initial params, state, loss)."""
  trainer = train.Trainer(task=task, mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx)
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    if params is None:
      params = jax.device_get(state.params)
    placed = jax.device_put(params, trainer.state_shardings.params)
    state = state.replace(params=placed, opt_state=jax.device_put(
        tx.init(placed), trainer.state_shardings.opt_state))
    state, metrics = trainer.train_step(state, sharding.global_batch(_batch(family), mesh))
  return params, state, float(metrics["loss"])


@pytest.mark.parametrize("family", ["vit", "igpt"])
def test_scanned_step_on_data_fsdp_tensor_equals_unscanned_single_device(family):
  # SGD, as in test_sharding: Adam would amplify float noise in near-zero gradients.
  tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=0.1), 10)
  single = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
  initial, reference, reference_loss = _one_step(family, _task(family), single, tx, None)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  assert len(jax.devices()) == 8
  _, state, loss = _one_step(family, _task(family, scan_layers=True,
                                            remat_policy="dots_saveable"),
                             mesh, tx, _in_layout(initial, family, True))
  kernel = (state.params["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]["kernel"]
            if family == "vit" else state.params["h"]["mlp"]["c_fc"])
  assert kernel.sharding.spec == jax.P(None, "fsdp", "tensor")  # layers whole, the rest split
  assert kernel.addressable_shards[0].data.shape == (3, 32 // 2, 64 // 2)
  np.testing.assert_allclose(loss, reference_loss, rtol=1e-5)
  _assert_trees_close(_in_layout(jax.device_get(state.params), family, False),
                      jax.device_get(reference.params), rtol=1e-4, atol=1e-6)


def test_bfloat16_train_step_with_bfloat16_first_moment():
  tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=1e-2,
                                                  weight_decay=0.1, moment_dtype="bfloat16"), 10)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
  task = _task("vit", dtype=jnp.bfloat16, scan_layers=True)
  _, state, loss = _one_step("vit", task, mesh, tx, None)
  assert np.isfinite(loss)
  dtypes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
    names = [getattr(k, "name", None) for k in path]
    for moment in ("mu", "nu"):
      if moment in names:
        dtypes.setdefault(moment, set()).add(leaf.dtype)
  assert dtypes == {"mu": {jnp.dtype(jnp.bfloat16)}, "nu": {jnp.dtype(jnp.float32)}}
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(state.params)} == {
      jnp.dtype(jnp.float32)}


def test_weight_decay_reaches_the_same_parameters_in_both_layouts():
  params = _random_params(_model("vit"))
  tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=0.1,
                                                  weight_decay=0.5, grad_clip_norm=None), 10)
  zeros = jax.tree_util.tree_map(np.zeros_like, params)

  def decayed(params, grads):
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return {k: bool(np.any(v != 0)) for k, v in trees.flatten(updates).items()}

  stacked = _in_layout(params, "vit", True)
  plain_mask = decayed(params, zeros)
  scanned_mask = trees.unstack_layers(decayed(stacked, _in_layout(zeros, "vit", True)),
                                      adapt.BLOCKS, unstack=lambda v: [v] * 3)
  assert plain_mask == scanned_mask
  assert not plain_mask["Transformer/encoderblock_0/LayerNorm_0/scale"]
  assert plain_mask["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]


# ------------------------------------------------------------------------------------------------
# Weights in and out


def test_official_npz_and_timm_through_a_scanned_model_are_bit_identical(tmp_path):
  plain = _model("vit", representation_size=16)
  official = {"params": _random_params(plain)}
  vit_npz.export_npz(official, tmp_path / "official.npz")
  scanned = _model("vit", representation_size=16, scan_layers=True)
  loaded = vit_npz.load_npz(tmp_path / "official.npz", scanned)
  assert trees.flat_shapes(loaded) == trees.flat_shapes({"params": nn.meta.unbox(
      _abstract(scanned))})
  np.testing.assert_allclose(scanned.apply(loaded, _inputs("vit")),
                             plain.apply(official, _inputs("vit")), rtol=1e-5, atol=1e-5)
  vit_npz.export_npz(loaded, tmp_path / "again.npz")
  with np.load(tmp_path / "official.npz") as a, np.load(tmp_path / "again.npz") as b:
    _assert_bit_identical(dict(b), dict(a))
  # timm's names: the same, through the scanned model.
  vit_timm.export_safetensors(official, tmp_path / "timm.safetensors")
  loaded = vit_timm.load_safetensors(tmp_path / "timm.safetensors", scanned)
  vit_timm.export_safetensors(loaded, tmp_path / "again.safetensors")
  read = lambda path: (lambda t: {k: t.read(k) for k in t.shapes})(
      weights.read_safetensors([path]))
  _assert_bit_identical(read(tmp_path / "again.safetensors"), read(tmp_path / "timm.safetensors"))


def test_hf_through_a_scanned_model_is_bit_identical(tmp_path):
  plain = _model("igpt", num_classes=3)
  clusters = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
  igpt_hf.export_hf(plain, {"params": _random_params(plain)}, tmp_path / "hf", clusters)
  model, variables, loaded_clusters = igpt_hf.load_hf(tmp_path / "hf", scan_layers=True,
                                                      remat_policy="full")
  assert model.scan_layers and variables["params"]["h"]["attn"]["q_proj"].shape == (3, 4, 8, 32)
  igpt_hf.export_hf(model, variables, tmp_path / "again", loaded_clusters)
  for name in sorted(os.listdir(tmp_path / "hf")):
    with open(tmp_path / "hf" / name, "rb") as a, open(tmp_path / "again" / name, "rb") as b:
      assert a.read() == b.read(), name
  # OpenAI's per-block names load into a scanned model too.
  per_block = trees.flatten(_in_layout(variables["params"], "igpt", False))
  openai_arrays = {("model/" + k.replace("h_", "h", 1) + ("/w" if "/mlp/" in k else "")
                    if k != "clf" else "model/clf/wclf"): v for k, v in per_block.items()}
  openai_model, loaded, _ = igpt_openai.load_openai_arrays(openai_arrays, scan_layers=True,
                                                          remat_policy="full")
  assert openai_model == model
  _assert_bit_identical(trees.flatten(loaded), trees.flatten(variables))


def _save_workdir(workdir, params):
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), asynchronous=False)
  checkpointer.save(1, {"params": params})
  checkpointer.close()
  return str(workdir)


def test_init_from_and_export_of_a_workdir_in_the_other_layout(tmp_path):
  # ViT: a scanned run's workdir initialises a per-block model and the other way round, and
  # exports in the official layout.
  plain, scanned = _model("vit"), _model("vit", scan_layers=True)
  params = _random_params(plain)
  stacked_run = _save_workdir(tmp_path / "vit_scanned", _in_layout(params, "vit", True))
  plain_run = _save_workdir(tmp_path / "vit_plain", params)
  fresh = lambda model: jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype),
                                               nn.meta.unbox(_abstract(model)))
  _assert_bit_identical(trees.flatten(vit_pretrained.pretrained_initializer(
      stacked_run, plain)(fresh(plain))), trees.flatten(params))
  _assert_bit_identical(trees.flatten(vit_pretrained.pretrained_initializer(
      plain_run, scanned)(fresh(scanned))), trees.flatten(_in_layout(params, "vit", True)))
  vit_pretrained.export_from_checkpoint(stacked_run, scanned, tmp_path / "run.npz")
  with np.load(tmp_path / "run.npz") as exported:
    _assert_bit_identical(dict(exported), trees.flatten(params))
  # iGPT: fine-tuning from a pre-training run of the other layout (clf is new).
  pretrain = _model("igpt")
  params = _random_params(pretrain)
  igpt_run = _save_workdir(tmp_path / "igpt_scanned", _in_layout(params, "igpt", True))
  finetune = _model("igpt", num_classes=3)
  initialized = trees.flatten(igpt_pretrained.pretrained_initializer(igpt_run, finetune)(
      fresh(finetune)))
  assert not np.any(initialized.pop("clf"))
  _assert_bit_identical(initialized, trees.flatten(params))
  back = igpt_pretrained.read_checkpoint_params(igpt_run, _model("igpt", scan_layers=True))
  _assert_bit_identical(trees.flatten(back), trees.flatten(_in_layout(params, "igpt", True)))
  # A scanned model of another depth is refused with one sentence naming the stacked key.
  with pytest.raises(ValueError, match=r"^`h/attn/c_proj` has shape \(3, 4, 8, 32\) in the "
                                       r"checkpoint .* expects \(2, 4, 8, 32\)") as error:
    igpt_pretrained.pretrained_initializer(
        igpt_run, _model("igpt", depth=2, num_classes=3, scan_layers=True))
  assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("recipe", sorted(
    name[:-3] for name in os.listdir(os.path.join(ROOT, "configs"))
    if name.endswith(".py") and name not in ("__init__.py", "common.py")))
def test_every_recipe_has_the_switches_with_their_defaults(recipe):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{recipe}").get_config()
  assert (config.model.scan_layers, config.model.remat_policy) == (False, "none")
  assert config.optimizer.moment_dtype == "float32"
  config.model.scan_layers, config.model.remat_policy = True, "full"
  family, prepared = run.read(config, "/nonexistent/workdir")
  model = family.model(prepared)
  assert (model.scan_layers, model.remat_policy) == (True, "full")
  assert prepared.optimizer.moment_dtype == "float32"


def test_switches_from_the_command_line(tmp_path):
  """`--config.model.scan_layers=true` and friends reach the model; a bad value is one sentence."""
  command = [sys.executable, "run.py", "--mode", "plan", f"--workdir={tmp_path / 'w'}",
             "--config.model.scan_layers=true", "--config.model.dtype=bfloat16",
             "--config.optimizer.moment_dtype=bfloat16"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command + ["--config.model.remat_policy=dots_saveable"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  config = vit_digits.get_config()
  family, prepared = run.read(config, str(tmp_path / "w"))
  expected = layers.count_params(family.abstract_params(prepared))
  assert f"VisionTransformer with {expected:,} parameters" in result.stdout  # the same model
  bad = subprocess.run(command + ["--config.model.remat_policy=some"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
  assert bad.returncode == 2, bad.stdout + bad.stderr
  assert ("config.model.remat_policy='some' is unknown; use one of none, dots_saveable, full."
          in bad.stderr)


@pytest.mark.parametrize("case", ["plain", "bias", "causal", "mask", "key mask", "even kv"])
def test_even_length_attention_equals_unpadded(case):
  """The one-position padding that lets cuDNN train on ViT's odd token counts changes nothing:
  outputs and gradients equal the unpadded attention (both through XLA here)."""
  rng = np.random.default_rng(0)
  q_length, kv_length = 7, (8 if case == "even kv" else 7)
  query = jnp.asarray(rng.normal(size=(2, q_length, 3, 8)), jnp.float32)
  key, value = (jnp.asarray(rng.normal(size=(2, kv_length, 3, 8)), jnp.float32)
                for _ in range(2))
  options = dict(
      bias=(jnp.asarray(rng.normal(size=(1, 3, q_length, kv_length)), jnp.float32)
            if case == "bias" else None),
      mask=(jnp.asarray(rng.random((2, 1, q_length, kv_length)) < 0.7).at[..., 0].set(True)
            if case == "mask" else
            jnp.asarray(rng.random((2, 1, 1, kv_length)) < 0.7).at[..., 0].set(True)
            if case == "key mask" else None),
      causal=case == "causal")
  weights_out = jnp.asarray(rng.normal(size=(2, q_length, 3, 8)), jnp.float32)

  bias = options.pop("bias")
  bias = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias is None else bias  # its gradient too

  def loss(attend, query, key, value, bias):
    return jnp.sum(attend(query, key, value, bias) * weights_out)

  plain = lambda q, k, v, b: jax.nn.dot_product_attention(
      q, k, v, bias=b, mask=options["mask"], is_causal=options["causal"])
  padded = lambda q, k, v, b: layers.even_length_attention(q, k, v, bias=b,
                                                           implementation="xla", **options)
  np.testing.assert_allclose(padded(query, key, value, bias), plain(query, key, value, bias),
                             rtol=1e-5, atol=1e-6)
  args = (query, key, value, bias)
  expected = jax.grad(functools.partial(loss, plain), argnums=(0, 1, 2, 3))(*args)
  got = jax.grad(functools.partial(loss, padded), argnums=(0, 1, 2, 3))(*args)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cudnn_gets_even_lengths(monkeypatch):
  """With attention_implementation="cudnn", a ViT's 5 tokens (4 patches, the class token) reach
  JAX's attention as 6 with the real lengths given; XLA stands in for cuDNN on this CPU."""
  seen = []
  original = jax.nn.dot_product_attention

  def recording(query, key, value, **kwargs):
    seen.append((query.shape[1], key.shape[1], kwargs.get("implementation"),
                 kwargs.get("key_value_seq_lengths")))
    return original(query, key, value, **{**kwargs, "implementation": "xla"})

  model = vit_jax.create_model("custom", num_classes=3, image_size=4, **VIT_SHAPE)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images)
  expected = model.apply(variables, images)
  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  cudnn = model.clone(attention_implementation="cudnn")
  np.testing.assert_allclose(cudnn.apply(variables, images), expected, rtol=1e-5, atol=1e-5)
  assert len(seen) == VIT_SHAPE["depth"]
  assert all(q == 6 and k == 6 and how == "cudnn" and list(lengths) == [5, 5]
             for q, k, how, lengths in seen), seen
