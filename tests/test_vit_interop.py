"""ViT checkpoint interop: lossless round trips, official .npz adaptation, refusals, timm parity."""

import hashlib
import os
import re
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit_jax
from common_jax import data, optim, sharding, train
from common_jax import trees
from vit_jax import adapt, models, npz, pretrained, tasks
from vit_jax import timm as vit_timm  # `timm` is the PyTorch library in the parity tests

# A tiny ViT: 2x2 patches, so 8x8 images make a 4x4 grid and 16x16 images an 8x8 grid.
SHAPE = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=2)
QUERY = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
POSEMB = "Transformer/posembed_input/pos_embedding"


def _model(**options):
  return vit_jax.create_model("custom", **{**SHAPE, "num_classes": 10, "image_size": 8,
                                           **options})


def _random_params(model, seed=0, scale=0.5):
  """Every parameter random (non-zero head and class token too), as a numpy tree."""
  rng = np.random.default_rng(seed)
  abstract = flax.linen.meta.unbox(models.abstract_variables(model)["params"])
  return jax.tree_util.tree_map(
      lambda x: (rng.normal(size=x.shape) * scale).astype(x.dtype), abstract)


def _assert_bit_identical(actual, expected):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  flat_actual, flat_expected = trees.flatten(actual), trees.flatten(expected)
  for key, want in flat_expected.items():
    got, want = np.asarray(jax.device_get(flat_actual[key])), np.asarray(jax.device_get(want))
    assert got.dtype == want.dtype and got.shape == want.shape, key
    assert got.tobytes() == want.tobytes(), f"{key} differs"


def _init_structure(model):
  """The tree of `model.init(...)["params"]`, unboxed (traced, not computed)."""
  return jax.tree_util.tree_structure(
      flax.linen.meta.unbox(models.abstract_variables(model)["params"]))


def _one_sentence(message):
  return "\n" not in message and message.endswith(".") and not re.search(r"\.\s+[A-Z]", message)


def _snapshot(directory):
  """Every path under `directory` with its size, mtime and content hash."""
  entries = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      digest = None
      if os.path.isfile(path):
        with open(path, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      entries[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns, digest)
  return entries


# ------------------------------------------------------------------------------------------------
# Lossless round trips


@pytest.mark.parametrize("options", [
    dict(classifier="token", representation_size=16),
    dict(classifier="gap", param_dtype=jnp.bfloat16),  # widened to float32 exactly, and back
])
def test_npz_round_trip_is_bit_identical_with_official_names(tmp_path, options):
  model = _model(**options)
  params = _random_params(model)
  path = npz.export_npz({"params": params}, str(tmp_path / "vit.npz"))
  with np.load(path, allow_pickle=False) as stored:
    assert set(stored.files) == set(trees.flatten(params))
    assert QUERY in stored.files and "embedding/kernel" in stored.files
    assert all(stored[k].dtype == np.float32 for k in stored.files)
  loaded = npz.load_npz(path, model)
  assert jax.tree_util.tree_structure(loaded["params"]) == _init_structure(model)
  _assert_bit_identical(loaded["params"], params)


@pytest.mark.parametrize("options", [
    dict(classifier="token", representation_size=16),
    dict(classifier="gap"),
])
def test_safetensors_round_trip_is_bit_identical_with_timm_names(tmp_path, options):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  model = _model(**options)
  params = _random_params(model)
  path = vit_timm.export_safetensors({"params": params}, str(tmp_path / "vit.safetensors"))
  tensors = load_file(path)
  width, patch = SHAPE["width"], SHAPE["patch_size"]
  assert tensors["patch_embed.proj.weight"].shape == (width, 3, patch, patch)
  assert tensors["blocks.1.attn.qkv.weight"].shape == (3 * width, width)
  assert tensors["blocks.1.attn.qkv.bias"].shape == (3 * width,)
  assert tensors["blocks.0.mlp.fc1.weight"].shape == (SHAPE["mlp_dim"], width)
  assert tensors["norm.weight"].shape == (width,)
  assert ("cls_token" in tensors) == (options["classifier"] == "token")
  # The fused qkv rows are q, then k, then v, each head after head.
  np.testing.assert_array_equal(tensors["blocks.0.attn.qkv.weight"][:width],
                                params["Transformer"]["encoderblock_0"][
                                    "MultiHeadDotProductAttention_1"]["query"]["kernel"]
                                .reshape(width, width).T)
  loaded = vit_timm.load_safetensors(path, model)
  assert jax.tree_util.tree_structure(loaded["params"]) == _init_structure(model)
  _assert_bit_identical(loaded["params"], params)


def test_older_official_layout_under_opt_target_loads(tmp_path):
  model = _model()
  params = _random_params(model)
  flat = trees.flatten(params)
  np.savez(tmp_path / "old.npz", **{f"opt/target/{key}": value for key, value in flat.items()})
  _assert_bit_identical(npz.load_npz(str(tmp_path / "old.npz"), model)["params"], params)


# ------------------------------------------------------------------------------------------------
# An official-layout .npz adapted to a higher resolution and a new head, then fine-tuned


def _ramp_grid(height, width, channels, seed):
  """A position grid that is linear in row and column, per channel: a*r + b*c + offset."""
  rng = np.random.default_rng(seed)
  a, b, offset = rng.normal(size=(3, channels))
  rows, cols = np.mgrid[:height, :width]
  return (rows[..., None] * a + cols[..., None] * b + offset).astype(np.float32), (a, b, offset)


def _write_official_npz(path):
  """A pre-training checkpoint as the official code writes it: 8x8 images, 100 classes, a
  representation layer, flat '/'-joined keys. Returns the arrays written."""
  source = _model(image_size=8, num_classes=100, representation_size=16)
  flat = trees.flatten(_random_params(source, seed=1))
  grid, _ = _ramp_grid(4, 4, SHAPE["width"], seed=2)
  flat[POSEMB] = np.concatenate([flat[POSEMB][:, :1], grid.reshape(1, 16, -1)], axis=1)
  for key in (QUERY, "embedding/kernel", "cls", POSEMB, "head/kernel", "pre_logits/kernel",
              "Transformer/encoder_norm/scale",
              "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"):
    assert key in flat  # the real names of the published checkpoints
  assert flat[POSEMB].shape == (1, 1 + 16, SHAPE["width"])
  np.savez(path, **flat)
  return flat


def test_official_npz_loads_at_higher_resolution_with_a_new_head(tmp_path):
  written = _write_official_npz(tmp_path / "pretrained.npz")
  model = _model(image_size=16, num_classes=10)  # 8x8 grid, 10 classes, no representation layer
  params = npz.load_npz(str(tmp_path / "pretrained.npz"), model)["params"]
  assert jax.tree_util.tree_structure(params) == _init_structure(model)
  flat = trees.flatten(params)
  assert "pre_logits/kernel" not in flat
  assert flat["head/kernel"].shape == (SHAPE["width"], 10)
  np.testing.assert_array_equal(flat["head/kernel"], 0.0)
  np.testing.assert_array_equal(flat["head/bias"], 0.0)
  posemb = flat[POSEMB]
  assert posemb.shape == (1, 1 + 64, SHAPE["width"])
  np.testing.assert_array_equal(posemb[:, 0], written[POSEMB][:, 0])  # class-token slot as it is
  # Corner-aligned bilinear: new cell i sits at old coordinate i * (4 - 1) / (8 - 1).
  _, (a, b, offset) = _ramp_grid(4, 4, SHAPE["width"], seed=2)
  rows, cols = np.mgrid[:8, :8] * 3 / 7
  expected = rows[..., None] * a + cols[..., None] * b + offset
  np.testing.assert_allclose(posemb[0, 1:].reshape(8, 8, -1), expected, atol=1e-5)
  for key, value in flat.items():  # everything else is the file's, bit for bit
    if not key.startswith("head/") and key != POSEMB:
      assert value.tobytes() == written[key].tobytes(), key


@pytest.mark.parametrize("num_tokens", [0, 1])
def test_posemb_resize_keeps_linear_ramps_on_non_square_grids(num_tokens):
  grid, (a, b, offset) = _ramp_grid(2, 3, 8, seed=3)
  tokens = np.full((1, num_tokens, 8), 7.0, np.float32)
  posemb = np.concatenate([tokens, grid.reshape(1, 6, 8)], axis=1)
  resized = adapt.resize_posemb(posemb, (4, 5), num_tokens=num_tokens, old_grid=(2, 3))
  assert resized.shape == (1, num_tokens + 20, 8) and resized.dtype == np.float32
  np.testing.assert_array_equal(resized[:, :num_tokens], tokens)
  rows, cols = np.mgrid[:4, :5]
  expected = (rows * 1 / 3)[..., None] * a + (cols * 2 / 4)[..., None] * b + offset
  np.testing.assert_allclose(resized[0, num_tokens:].reshape(4, 5, 8), expected, atol=1e-5)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """Fine-tunes the 8x8 official .npz at 16x16 on digits for 3 steps on an FSDP mesh of 8."""
  root = tmp_path_factory.mktemp("finetune")
  pretrained_npz = str(root / "pretrained.npz")
  written = _write_official_npz(pretrained_npz)
  task = tasks.ClassificationTask(variant="custom", num_classes=10, image_size=16,
                                  model_options=dict(SHAPE))
  model = task.model
  workdir = str(root / "workdir")
  os.makedirs(workdir)  # run.py creates it before the loop runs

  def train_data(start_step):
    return data.train_iterator(
        dataset="sklearn_digits", split="train", preprocess="decode|resize(16)|value_range(-1,1)",
        global_batch_size=16, seed=0, start_step=start_step, data_dir=str(root / "data"))

  result = train.train_and_evaluate(
      task, loop=train.LoopConfig(total_steps=3, batch_size=16, log_every=0, eval_every=0,
                                  checkpoint_every=0, async_checkpoints=False),
      optimizer=optim.OptimizerConfig(name="sgd", learning_rate=0.01, decay="constant"),
      mesh_config=sharding.MeshConfig(data=1, fsdp=8), workdir=workdir, train_data=train_data,
      initial_params=pretrained.pretrained_initializer(pretrained_npz, model), tensorboard=False)
  return dict(model=model, workdir=workdir, result=result, written=written, root=root)


def test_finetuning_through_the_loop_starts_from_the_npz(finetuned):
  result, written = finetuned["result"], finetuned["written"]
  assert result["step"] == 3
  params = result["params"]
  kernel = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"][
      "kernel"]
  assert "fsdp" in tuple(kernel.sharding.spec)  # trained sharded, not gathered
  flat = {k: np.asarray(v) for k, v in trees.flatten(jax.device_get(params)).items()}
  assert "pre_logits/kernel" not in flat and flat["head/kernel"].shape == (SHAPE["width"], 10)
  assert np.abs(flat["head/kernel"]).max() > 0  # the zero head learned
  # Three small SGD steps move the weights by far less than the file's scale (0.5): the loop
  # started from the file, not from its own initialisation.
  for key in (QUERY, "embedding/kernel", "cls", "Transformer/encoder_norm/scale"):
    np.testing.assert_allclose(flat[key], written[key], atol=0.05, err_msg=key)
  np.testing.assert_allclose(flat[POSEMB][:, 0], written[POSEMB][:, 0], atol=0.05)


@pytest.mark.parametrize("fmt", pretrained.FORMATS)
def test_sharded_training_result_round_trips_bit_identically(finetuned, tmp_path, fmt):
  params = finetuned["result"]["params"]  # jax arrays sharded over the 8-device FSDP mesh
  path = pretrained.export({"params": params}, str(tmp_path / f"finetuned.{fmt}"), fmt)
  load = npz.load_npz if fmt == "npz" else vit_timm.load_safetensors
  _assert_bit_identical(load(path, finetuned["model"])["params"], params)


@pytest.mark.parametrize("fmt", pretrained.FORMATS)
def test_export_from_checkpoint_is_the_final_params_and_reads_only(finetuned, tmp_path, fmt):
  workdir = finetuned["workdir"]
  before = _snapshot(workdir)
  path = pretrained.export_from_checkpoint(workdir, finetuned["model"],
                                        str(tmp_path / f"exported.{fmt}"), fmt)
  assert _snapshot(workdir) == before
  load = npz.load_npz if fmt == "npz" else vit_timm.load_safetensors
  _assert_bit_identical(load(path, finetuned["model"])["params"], finetuned["result"]["params"])


def test_finetuning_can_start_from_a_workdir_at_another_resolution(finetuned):
  # The run's own checkpoint (16x16, 10 classes) seeds a 32x32 run with 3 classes.
  model = _model(image_size=32, num_classes=3)
  before = _snapshot(finetuned["workdir"])
  initialize = pretrained.pretrained_initializer(finetuned["workdir"], model)
  fresh = _random_params(model, seed=5)
  params = trees.flatten(initialize(fresh))
  trained = {k: np.asarray(v) for k, v in
             trees.flatten(jax.device_get(finetuned["result"]["params"])).items()}
  assert _snapshot(finetuned["workdir"]) == before
  assert params[POSEMB].shape == (1, 1 + 16 * 16, SHAPE["width"])
  np.testing.assert_array_equal(params[POSEMB][:, 0], trained[POSEMB][:, 0])
  np.testing.assert_array_equal(params["head/kernel"], trees.flatten(fresh)["head/kernel"])
  assert params[QUERY].tobytes() == trained[QUERY].tobytes()


def test_export_from_checkpoint_refuses_another_model_and_touches_nothing(finetuned, tmp_path):
  workdir = finetuned["workdir"]
  destination = tmp_path / "keep.npz"
  destination.write_bytes(b"an earlier good export")
  before = _snapshot(workdir)
  wider = vit_jax.create_model("custom", **{**SHAPE, "width": 48}, num_classes=10, image_size=16)
  with pytest.raises(ValueError) as error:
    pretrained.export_from_checkpoint(workdir, wider, str(destination), "npz")
  message = str(error.value)
  assert "`embedding/kernel`" in message
  assert "(2, 2, 3, 32)" in message and "(2, 2, 3, 48)" in message and _one_sentence(message)
  with pytest.raises(ValueError, match="holds no checkpoint"):
    pretrained.export_from_checkpoint(str(tmp_path / "empty"), wider, str(destination), "npz")
  assert destination.read_bytes() == b"an earlier good export"
  assert sorted(os.listdir(tmp_path)) == ["keep.npz"]
  assert _snapshot(workdir) == before


# ------------------------------------------------------------------------------------------------
# Files that do not fit, and failed exports


def _flat(model, seed=0):
  return trees.flatten(_random_params(model, seed))


def _flip_last_data_byte(path, key):
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(key + ".npy")
  with open(path, "r+b") as f:
    f.seek(info.header_offset + 26)
    name_length, extra_length = np.frombuffer(f.read(4), np.uint16)
    position = info.header_offset + 30 + name_length + extra_length + info.compress_size - 1
    f.seek(position)
    byte = f.read(1)
    f.seek(position)
    f.write(bytes([byte[0] ^ 0xFF]))


def _wider(path):
  np.savez(path, **_flat(_model(width=48)))


def _deeper(path):
  np.savez(path, **_flat(_model(depth=3)))


def _missing_key(path):
  flat = _flat(_model())
  del flat["Transformer/encoderblock_1/LayerNorm_2/scale"]
  np.savez(path, **flat)


def _gap_file(path):
  np.savez(path, **_flat(_model(classifier="gap")))


def _truncated(path):
  np.savez(path, **_flat(_model()))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _corrupt_array(path):
  np.savez(path, **_flat(_model()))
  _flip_last_data_byte(path, QUERY)


def _pickle_inside(path):
  flat = _flat(_model())
  flat["cls"] = np.array([{"not": "an array"}], dtype=object)
  np.savez(path, **flat)  # numpy pickles object arrays into the archive


def _not_an_archive(path):
  with open(path, "w") as f:
    f.write("this is not a checkpoint")


@pytest.mark.parametrize("make_file, fragments", [
    (_wider, ["`embedding/kernel`", "(2, 2, 3, 48)", "(2, 2, 3, 32)"]),
    (_deeper, ["`Transformer/encoderblock_2/", "depth"]),
    (_missing_key, ["no `Transformer/encoderblock_1/LayerNorm_2/scale` (32,)"]),
    (_gap_file, ["`cls`", "classifier"]),
    (_truncated, ["truncated or corrupt", "BadZipFile"]),
    (_corrupt_array, [f"`{QUERY}`", "truncated or corrupt"]),
    (_pickle_inside, ["`cls`", "pickled", "allow_pickle=False"]),
    (_not_an_archive, ["is not an .npz archive", "unpickle"]),
])
def test_npz_that_does_not_fit_is_refused_in_one_sentence(tmp_path, make_file, fragments):
  path = str(tmp_path / "bad.npz")
  make_file(path)
  model = _model()
  for attempt in (lambda: npz.load_npz(path, model),
                  lambda: pretrained.pretrained_initializer(path, model)(_random_params(model))):
    with pytest.raises(ValueError) as error:
      attempt()
    message = str(error.value)
    for fragment in fragments:
      assert fragment in message, message
    assert _one_sentence(message), message


def test_safetensors_that_do_not_fit_are_refused_in_one_sentence(tmp_path):
  wide = str(tmp_path / "wide.safetensors")
  vit_timm.export_safetensors({"params": _random_params(_model(width=48))}, wide)
  with pytest.raises(ValueError) as error:
    vit_timm.load_safetensors(wide, _model())
  assert "`embedding/kernel`" in str(error.value) and "(2, 2, 3, 48)" in str(error.value)
  assert _one_sentence(str(error.value))
  with open(wide, "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match="truncated or corrupt") as error:
    vit_timm.load_safetensors(wide, _model())
  assert _one_sentence(str(error.value))


def test_missing_file_and_unknown_format_are_refused(tmp_path):
  with pytest.raises(ValueError, match="no file at"):
    npz.load_npz(str(tmp_path / "absent.npz"), _model())
  with pytest.raises(ValueError, match=r"must be a training workdir, an \.npz .* or a "):
    pretrained.pretrained_initializer(str(tmp_path / "weights.pth"), _model())
  with pytest.raises(ValueError, match="export format 'pth' is unknown"):
    pretrained.export({"params": _random_params(_model())}, str(tmp_path / "x.pth"), "pth")


@pytest.mark.parametrize("fmt", pretrained.FORMATS)
def test_failed_export_never_replaces_a_good_file(tmp_path, monkeypatch, fmt):
  destination = tmp_path / f"model.{fmt}"
  destination.write_bytes(b"an earlier good export")

  def write_half_then_fail(*args, **kwargs):
    target = args[0] if fmt == "npz" else args[1]  # np.savez(file, ...), save_file(t, path)
    if isinstance(target, str):
      with open(target, "wb") as f:
        f.write(b"PK\x03\x04 half")
    else:
      target.write(b"PK\x03\x04 half")
    raise OSError(28, "No space left on device")

  if fmt == "npz":
    monkeypatch.setattr(np, "savez", write_half_then_fail)
  else:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(safetensors.numpy, "save_file", write_half_then_fail)
  with pytest.raises(OSError, match="No space left"):
    pretrained.export({"params": _random_params(_model())}, str(destination), fmt)
  assert destination.read_bytes() == b"an earlier good export"
  assert os.listdir(tmp_path) == [destination.name]  # no temporary file left behind


# ------------------------------------------------------------------------------------------------
# Cross-framework parity with timm (skipped where torch/timm are not installed)


def _torch_and_timm():
  torch = pytest.importorskip("torch", reason="timm parity needs torch (pip install torch timm)")
  timm = pytest.importorskip("timm", reason="timm parity needs timm (pip install timm)")
  return torch, timm


def _realistic_params(model, seed):
  """Random weights of initialiser-like scale (kernels ~ 1/sqrt(fan_in), norm scales ~ 1), with
  non-zero head and class token; drawn by numpy, which is much faster here than `model.init`."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if name.endswith("/scale"):
      return (1 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
    if name.endswith("/kernel"):
      attention_in = re.search(r"/(query|key|value)/kernel$", name)
      fan_in = x.shape[0] if attention_in else int(np.prod(x.shape[:-1]))
      return (rng.normal(size=x.shape) / np.sqrt(fan_in)).astype(np.float32)
    return (0.05 * rng.normal(size=x.shape)).astype(np.float32)  # biases, cls, pos_embedding

  abstract = flax.linen.meta.unbox(models.abstract_variables(model)["params"])
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _logits_difference(torch, timm_model, model, params, seed=0):
  images = np.random.default_rng(seed).uniform(
      -1, 1, (2, model.image_size, model.image_size, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, images))
  timm_model.eval()
  with torch.no_grad():
    theirs = timm_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  assert ours.shape == theirs.shape and np.abs(ours).max() > 1e-2  # far from zero
  return float(np.abs(ours - theirs).max())


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_logits_equal_timm_both_ways(tmp_path, classifier):
  torch, _ = _torch_and_timm()
  from safetensors.torch import load_file, save_file  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  VisionTransformer = vision_transformer.VisionTransformer  # pylint: disable=invalid-name
  torch.manual_seed(0)
  pool = dict(token=dict(), gap=dict(class_token=False, global_pool="avg", fc_norm=False))
  timm_model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                 num_classes=10, **pool[classifier])
  model = vit_jax.create_model("custom", num_classes=10, image_size=32, width=64, depth=2,
                               mlp_dim=256, num_heads=4, patch_size=8, classifier=classifier,
                               gelu_approximate=False)
  # Ours -> timm: our export loads strictly into timm and gives the same logits.
  params = _realistic_params(model, seed=1)
  path = vit_timm.export_safetensors({"params": params}, str(tmp_path / "ours.safetensors"))
  timm_model.load_state_dict(load_file(path), strict=True)
  assert _logits_difference(torch, timm_model, model, params) < 1e-4
  # timm -> ours: timm's own random initialisation, saved by torch, loads into our model.
  torch.manual_seed(1)
  theirs = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                             num_classes=10, **pool[classifier])
  save_file({k: v.contiguous() for k, v in theirs.state_dict().items()},
            str(tmp_path / "timm.safetensors"))
  loaded = vit_timm.load_safetensors(str(tmp_path / "timm.safetensors"), model)["params"]
  assert _logits_difference(torch, theirs, model, loaded) < 1e-4


def test_export_loads_as_a_named_timm_model(tmp_path, monkeypatch):
  torch, timm = _torch_and_timm()
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights come from our file, never the hub
  model = vit_jax.create_model("Ti/16", num_classes=1000, image_size=224, gelu_approximate=False)
  params = _realistic_params(model, seed=2)
  path = vit_timm.export_safetensors({"params": params}, str(tmp_path / "vit_tiny.safetensors"))
  timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=True,
                                 pretrained_cfg_overlay=dict(file=path))
  assert _logits_difference(torch, timm_model, model, params) < 1e-4
