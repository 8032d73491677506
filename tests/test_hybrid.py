"""Hybrid ViTs (a BiT ResNet stem in front of the encoder): variants, official names, counts
against timm, the stem's function against timm's, sharded training, npz round trip."""

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

import vit_jax
from common_jax import layers
from common_jax import optim
from common_jax import sharding
from common_jax import train
from vit_jax import models
from vit_jax import npz
from vit_jax import resnet
from vit_jax.tasks import ClassificationTask


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.linen.meta.unbox(tree), sep="/")


def _tiny_hybrid(**overrides):
  """A two-stage stem (one unit each, /8) and a one-block encoder: every kind of stem layer."""
  options = dict(num_classes=5, patch_size=1, width=32, depth=1, mlp_dim=64, num_heads=4,
                 image_size=32, resnet_stages=(1, 1))
  options.update(overrides)
  return models.VisionTransformer(**options)


@pytest.mark.parametrize("variant, stages, patch_size, effective", [
    ("R50+B/16", (3, 4, 9), 1, 16),
    ("R26+S/32", (2, 2, 2, 2), 1, 32),
    ("R50+L/32", (3, 4, 6, 3), 1, 32),
    ("R+Ti/16", (), 8, 32),  # the official config: 8x8 patches of the root's /4 map
])
def test_hybrid_variants_follow_the_official_configs(variant, stages, patch_size, effective):
  model = vit_jax.create_model(variant)
  assert model.resnet_stages == stages
  assert (model.patch_size, model.effective_patch_size) == (patch_size, effective)
  assert vit_jax.create_model("B/16").resnet_stages is None


def test_hybrid_image_size_must_be_a_multiple_of_the_effective_patch():
  with pytest.raises(ValueError, match="does not divide image_size 200"):
    vit_jax.create_model("R50+B/16", image_size=200)
  vit_jax.create_model("R50+B/16", image_size=384)


@pytest.mark.parametrize("variant, timm_name", [
    ("R50+B/16", "vit_base_r50_s16_224"),
    ("R26+S/32", "vit_small_r26_s32_224"),
    ("R+Ti/16", "vit_tiny_r_s16_p8_224"),
])
def test_parameter_counts_equal_timms_hybrids(variant, timm_name):
  # timm's hybrids have no pre-logits layer, as a model without representation_size.
  timm = pytest.importorskip("timm")
  torch = pytest.importorskip("torch")
  with torch.device("meta"):  # shapes only, no memory or initialisation
    reference = timm.create_model(timm_name, pretrained=False, num_classes=1000)
  expected = sum(p.numel() for p in reference.parameters())
  model = vit_jax.create_model(variant, num_classes=1000)
  params = models.abstract_variables(model)["params"]
  assert layers.count_params(params) == expected
  # The same number of tokens: the feature map and the patch on it divide the image alike.
  assert _flat(params)["Transformer/posembed_input/pos_embedding"].shape \
      == tuple(reference.pos_embed.shape)


def test_parameter_names_and_shapes_follow_the_official_checkpoints():
  params = _flat(models.abstract_variables(vit_jax.create_model("R50+B/16"))["params"])
  shapes = {
      "conv_root/kernel": (7, 7, 3, 64),
      "gn_root/scale": (64,), "gn_root/bias": (64,),
      "block1/unit1/conv_proj/kernel": (1, 1, 64, 256),
      "block1/unit1/gn_proj/scale": (256,),
      "block1/unit1/conv1/kernel": (1, 1, 64, 64),
      "block1/unit1/conv2/kernel": (3, 3, 64, 64),
      "block1/unit1/conv3/kernel": (1, 1, 64, 256),
      "block1/unit3/gn3/bias": (256,),
      "block2/unit1/conv_proj/kernel": (1, 1, 256, 512),
      "block2/unit1/conv2/kernel": (3, 3, 128, 128),
      "block3/unit9/conv3/kernel": (1, 1, 256, 1024),
      "embedding/kernel": (1, 1, 1024, 768),
      "Transformer/posembed_input/pos_embedding": (1, 14 * 14 + 1, 768),
  }
  assert {name: params[name].shape for name in shapes} == shapes
  units = {name.split("/")[0]: set() for name in params if name.startswith("block")}
  for name in params:
    if name.startswith("block"):
      units[name.split("/")[0]].add(name.split("/")[1])
  assert {block: len(u) for block, u in units.items()} == {"block1": 3, "block2": 4,
                                                           "block3": 9}
  # Only the first unit of a stage projects its shortcut; no convolution has a bias.
  assert not any(name.startswith("block1/unit2/conv_proj") for name in params)
  assert not any("conv" in name and name.endswith("/bias") for name in params)
  stem_only = _flat(models.abstract_variables(vit_jax.create_model("R+Ti/16"))["params"])
  assert not any(name.startswith("block") for name in stem_only)
  assert stem_only["embedding/kernel"].shape == (8, 8, 64, 192)


def test_initialisation_and_logical_axis_names():
  model = _tiny_hybrid()
  images = np.zeros((1, 32, 32, 3), np.float32)
  boxed = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(
      x, flax.linen.LogicallyPartitioned))
  assert all(isinstance(x, flax.linen.LogicallyPartitioned) for x in leaves)
  rule_names = {name for name, _ in sharding.DEFAULT_RULES}
  for leaf in leaves:
    assert set(leaf.names) - {None} <= rule_names, leaf.names
  assert boxed["block1"]["unit1"]["conv1"]["kernel"].names == (None, None, None, "embed")
  params = _flat(boxed)
  # gn3 starts at zero scale, so every unit starts as its shortcut; the other norms at one.
  np.testing.assert_array_equal(params["block2/unit1/gn3/scale"], 0.0)
  np.testing.assert_array_equal(params["block2/unit1/gn2/scale"], 1.0)
  np.testing.assert_array_equal(params["gn_root/scale"], 1.0)


def test_weight_standardisation():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 5)) * 3 + 1
  standard = np.asarray(resnet.standardize(kernel))
  np.testing.assert_allclose(standard.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(standard.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


class _Stem(nn.Module):
  stages: tuple
  dtype: object = jax.numpy.float32

  @nn.compact
  def __call__(self, x):
    return resnet.stem(x, self.stages, dtype=self.dtype)


def _timm_backbone_state(params):
  """Official stem names -> timm ResNetV2 (preact=False) state dict, torch layout."""
  state = {}
  for name, value in _flat(params).items():
    value = np.asarray(value)
    if name.endswith("/kernel"):
      value = value.transpose(3, 2, 0, 1)  # [h, w, in, out] -> [out, in, h, w]
    module, leaf = name.rsplit("/", 1)
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    parts = module.split("/")
    if parts[0] in ("conv_root", "gn_root"):
      target = {"conv_root": "stem.conv", "gn_root": "stem.norm"}[parts[0]]
    else:
      stage, unit, layer = int(parts[0][5:]) - 1, int(parts[1][4:]) - 1, parts[2]
      layer = {"conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}.get(
          layer, layer.replace("gn", "norm"))
      target = f"stages.{stage}.blocks.{unit}.{layer}"
    state[f"{target}.{leaf}"] = value
  return state


def test_stem_computes_what_timms_hybrid_backbone_computes():
  """Padding, strides, projections, activations: the same function as timm's R50+ViT backbone
  (ResNetV2 with StdConv2dSame), up to the two codes' epsilons (timm: 1e-8 inside the
  standardisation's square root, GroupNorm 1e-5; official: 1e-5 added to the std, 1e-6)."""
  torch = pytest.importorskip("torch")
  hybrid = pytest.importorskip("timm.models.vision_transformer_hybrid")
  stages = (1, 2)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  stem = _Stem(stages)
  params = jax.jit(stem.init)(jax.random.PRNGKey(0), images)["params"]
  # Random norm parameters, so that no branch is silenced by gn3's zero scale.
  leaves, tree = jax.tree_util.tree_flatten(flax.linen.meta.unbox(params))
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [jax.random.normal(k, x.shape) * (0.5 if x.ndim == 1 else 1.0) + (x.ndim == 1)
            for k, x in zip(keys, leaves)]
  params = jax.tree_util.tree_unflatten(tree, leaves)
  ours = np.asarray(jax.jit(stem.apply)({"params": params}, images))
  reference = hybrid._resnetv2(layers=stages)  # pylint: disable=protected-access
  reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                             _timm_backbone_state(params).items()})
  reference.eval()
  with torch.no_grad():
    theirs = reference.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  theirs = theirs.numpy().transpose(0, 2, 3, 1)
  assert ours.shape == theirs.shape == (2, 4, 4, 512)
  # Measured: 1e-6 of the largest feature; symmetric (3, 3) root padding instead of "SAME"'s
  # (2, 3) would be off by 0.67 of it.
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_the_stem_runs_in_the_models_dtype():
  images = np.zeros((2, 32, 32, 3), np.float32)
  stem = _Stem((1, 1), dtype=jax.numpy.bfloat16)
  variables = jax.eval_shape(stem.init, jax.random.PRNGKey(0), images)
  assert jax.eval_shape(stem.apply, variables, images).dtype == jax.numpy.bfloat16
  assert _flat(variables["params"])["conv_root/kernel"].dtype == np.float32
  model = _tiny_hybrid(dtype=jax.numpy.bfloat16, num_classes=0)
  out = jax.jit(model.apply)(jax.jit(model.init)(jax.random.PRNGKey(0), images), images)
  assert out.shape == (2, 32) and out.dtype == jax.numpy.bfloat16
  assert np.all(np.isfinite(np.asarray(out, np.float32)))


def _train(mesh_config, devices, steps=2):
  """(losses, initial params, final state) of `steps` SGD steps on a tiny hybrid."""
  task = ClassificationTask("R+Ti/16", num_classes=10, image_size=16, model_options=dict(
      width=32, depth=1, mlp_dim=64, num_heads=4, patch_size=2))
  # The same task with a unit in the stem (one stage: /4, then 2x2 patches).
  task.model = _tiny_hybrid(num_classes=10, image_size=16, resnet_stages=(1,), patch_size=2)
  mesh = sharding.make_mesh(mesh_config, devices)
  tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=0.1), 10)
  trainer = train.Trainer(task=task, mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx)
  rng, losses = np.random.default_rng(0), []
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    initial = jax.device_get(state.params)
    for _ in range(steps):
      batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
               "label": rng.integers(0, 10, 8).astype(np.int32)}
      state, metrics = trainer.train_step(state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
  return losses, initial, state


def test_fsdp_training_equals_single_device():
  ref_losses, initial, ref_state = _train(sharding.MeshConfig(data=1), jax.devices()[:1])
  losses, _, state = _train(sharding.MeshConfig(data=1, fsdp=-1), jax.devices())
  assert len(jax.devices()) == 8
  kernel = state.params["block1"]["unit1"]["conv3"]["kernel"]
  assert kernel.sharding.spec[-1] == "fsdp"  # the stem is sharded like the rest
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         jax.device_get(state.params), jax.device_get(ref_state.params))
  # The stem was trained: its parameters moved from their initial values.
  assert not np.allclose(jax.device_get(state.params["conv_root"]["kernel"]),
                         initial["conv_root"]["kernel"])


def test_official_npz_layout_round_trips(tmp_path):
  model = _tiny_hybrid()
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  path = npz.export_npz(variables, str(tmp_path / "hybrid.npz"))
  with np.load(path, allow_pickle=False) as stored:
    names = set(stored.files)
  assert {"conv_root/kernel", "gn_root/scale", "block1/unit1/conv_proj/kernel",
          "block2/unit1/gn3/scale", "embedding/kernel"} <= names
  loaded = npz.load_npz(path, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["params"],
                         flax.linen.meta.unbox(variables["params"]))
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(loaded, images), apply(variables, images))
  # At twice the resolution the position embedding is resized to the stem's grid (8x8, not 64x64).
  bigger = npz.load_npz(path, _tiny_hybrid(image_size=64))
  assert bigger["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape \
      == (1, 8 * 8 + 1, 32)
  # A plain ViT is told which model the file needs.
  with pytest.raises(ValueError, match="embedding/kernel.*hybrid variant"):
    npz.load_npz(path, models.VisionTransformer(num_classes=5, patch_size=8, width=32, depth=1,
                                                mlp_dim=64, num_heads=4, image_size=32))
