"""iGPT weights in and out: Hugging Face ImageGPT directories and OpenAI checkpoints.

Round trips are bit-identical; Hugging Face's model computes our logits (when torch and
transformers are installed); files that do not fit are refused with one sentence naming the key
or file, and an export never leaves a half-written or clobbered directory.
"""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import igpt_jax
from common_jax import checkpoint as checkpoint_lib
from common_jax import optim
from common_jax import sharding
from common_jax import train
from common_jax import trees
from igpt_jax import hf as igpt_hf  # `hf` is the fixture of torch and transformers below
from igpt_jax import openai
from test_igpt_model import random_variables  # gains near 1, no trivial zeros

SHAPE = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
IMAGE_SIZE = 4
NUM_CLUSTERS = 16
PARITY_TOLERANCE = 1e-4  # float32, max abs difference of logits


def tiny_model(**options):
  return igpt_jax.create_model("custom", image_size=IMAGE_SIZE, num_clusters=NUM_CLUSTERS,
                               **dict(SHAPE, **options))


def random_clusters(seed=0, num_clusters=NUM_CLUSTERS):
  return np.random.default_rng(seed).uniform(-1, 1, (num_clusters, 3)).astype(np.float32)


def random_ids(seed=0, batch=2):
  return np.random.default_rng(seed).integers(0, NUM_CLUSTERS, (batch, IMAGE_SIZE**2))


def assert_bit_identical(actual, expected):
  actual = trees.flatten(trees.params_of(actual))
  expected = trees.flatten(trees.params_of(expected))
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    value = np.asarray(jax.device_get(value))
    assert actual[key].dtype == value.dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def assert_one_sentence(error):
  message = str(error.value)
  assert "\n" not in message and message.endswith("."), message


# ------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("num_classes", [0, 3])
def test_export_then_load_is_bit_identical(tmp_path, num_classes):
  model = tiny_model(num_classes=num_classes)
  variables = random_variables(model)
  clusters = random_clusters()
  directory = tmp_path / "hf"
  assert igpt_hf.export_hf(model, variables, directory, clusters) == str(directory)
  assert sorted(os.listdir(directory)) == [
      "config.json", "model.safetensors", "preprocessor_config.json"]
  assert os.listdir(tmp_path) == ["hf"]  # no temporary directory left behind
  with open(directory / "config.json", encoding="utf-8") as f:
    config = json.load(f)
  assert (config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"],
          config["n_head"], config["n_inner"]) == (NUM_CLUSTERS + 1, IMAGE_SIZE**2, 32, 2, 2, 64)
  assert config["activation_function"] == "quick_gelu" and not config["tie_word_embeddings"]

  loaded_model, loaded, loaded_clusters = igpt_hf.load_hf(directory)
  assert loaded_model == model
  assert_bit_identical(loaded, variables)
  assert loaded_clusters.dtype == np.float32
  np.testing.assert_array_equal(loaded_clusters, clusters)


def test_hf_layout_is_the_inverse_of_ours():
  model = tiny_model()
  params = random_variables(model)["params"]
  tensors = igpt_hf.to_hf(params)
  assert tensors["transformer.wte.weight"].shape == (NUM_CLUSTERS + 1, 32)
  np.testing.assert_array_equal(tensors["transformer.wte.weight"][-1], params["sos"])
  assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
  assert tensors["lm_head.weight"].shape == (NUM_CLUSTERS, 32)
  # Column j of c_attn's q block is output feature j = head * head_dim + e of the projection.
  q = params["h_0"]["attn"]["q_proj"]
  np.testing.assert_array_equal(tensors["transformer.h.0.attn.c_attn.weight"][:, 17], q[1, 1])
  assert not any(np.any(v) for k, v in tensors.items() if k.endswith(".bias"))
  assert_bit_identical(trees.unflatten(igpt_hf.from_hf(tensors, num_heads=2)), params)


@pytest.fixture(scope="module")
def trained():
  """A few Adam steps of the autoregressive task on an FSDP mesh of the 8 CPU devices."""
  clusters = random_clusters(1)
  task = igpt_jax.AutoregressiveTask(clusters, variant="custom", image_size=IMAGE_SIZE,
                                     model_options=SHAPE)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1), jax.devices())
  tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=1e-2), 10)
  trainer = train.Trainer(task=task, mesh=mesh, rules=sharding.DEFAULT_RULES, tx=tx)
  rng = np.random.default_rng(0)
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    initial = jax.device_get(state.params)
    for _ in range(3):
      batch = {"image": rng.uniform(-1, 1, (16, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)}
      state, _ = trainer.train_step(state, sharding.global_batch(batch, mesh))
  return trainer.model, state, initial, clusters


def test_round_trip_after_sharded_training(tmp_path, trained):
  model, state, initial, clusters = trained
  assert len(jax.devices()) == 8
  assert state.params["h_0"]["mlp"]["c_fc"].sharding.spec[0] == "fsdp"  # really sharded
  params = jax.device_get(state.params)
  assert not np.array_equal(params["wtet"], initial["wtet"])  # and really trained
  # The sharded arrays themselves are exported (gathered), not a host copy made beforehand.
  igpt_hf.export_hf(model, {"params": state.params}, tmp_path / "hf", clusters)
  loaded_model, loaded, loaded_clusters = igpt_hf.load_hf(tmp_path / "hf")
  assert loaded_model == model
  assert_bit_identical(loaded, {"params": params})
  np.testing.assert_array_equal(loaded_clusters, clusters)


def save_workdir(workdir, state, step=3):
  """A training run's workdir holding `state` (params and optimiser state) at `step`."""
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), asynchronous=False)
  checkpointer.save(step, state)
  checkpointer.wait()
  checkpointer.close()
  return str(workdir)


def test_export_from_checkpoint(tmp_path, trained):
  model, state, _, clusters = trained
  save_workdir(tmp_path / "run", state)
  igpt_hf.export_hf_from_checkpoint(tmp_path / "run", model, tmp_path / "hf", clusters)
  _, loaded, _ = igpt_hf.load_hf(tmp_path / "hf")
  assert_bit_identical(loaded, {"params": jax.device_get(state.params)})

  # A model of another shape is refused before anything is written.
  with pytest.raises(ValueError, match=r"`sos` has shape \(32,\) in the checkpoint at step 3") as e:
    igpt_hf.export_hf_from_checkpoint(tmp_path / "run", tiny_model(width=16), tmp_path / "x",
                                      clusters)
  assert_one_sentence(e)
  assert not os.path.exists(tmp_path / "x")
  with pytest.raises(ValueError, match="holds no checkpoints directory"):
    igpt_hf.export_hf_from_checkpoint(tmp_path / "nowhere", model, tmp_path / "x", clusters)
  assert not os.path.exists(tmp_path / "nowhere")


@pytest.fixture()
def counted_reads(monkeypatch):
  """The steps at which checkpoint arrays were read (Checkpointer.read_params calls)."""
  steps, read_params = [], checkpoint_lib.Checkpointer.read_params

  def counting(self, step=None):
    steps.append(step)
    return read_params(self, step)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "read_params", counting)
  return steps


@pytest.mark.parametrize("options, fragments", [
    (dict(width=16), ["`sos` has shape (32,)", "but the model expects (16,)"]),
    (dict(depth=1), ["holds `h_1/attn/c_proj` (2, 16, 32), which the model does not have"]),
    (dict(depth=3), ["has no `h_2/attn/c_proj` (2, 16, 32), which the model needs"]),
])
def test_pretrained_initializer_refuses_another_size_before_any_compute(
    tmp_path, trained, counted_reads, options, fragments):
  _, state, _, _ = trained
  workdir = save_workdir(tmp_path / "pretrain", state)
  before = snapshot(workdir)
  with pytest.raises(ValueError) as e:
    igpt_jax.pretrained_initializer(workdir, tiny_model(**options))  # not the returned function
  message = str(e.value)
  for fragment in fragments + [workdir, "use the same model options as the pre-training run"]:
    assert fragment in message, message
  assert_one_sentence(e)
  assert counted_reads == []  # decided from the checkpoint's metadata: no array was read
  assert snapshot(workdir) == before


def test_pretrained_initializer_reads_the_checkpoint_with_a_fresh_classifier(
    tmp_path, trained, counted_reads):
  _, state, _, _ = trained
  workdir = save_workdir(tmp_path / "pretrain", state, step=5)
  model = tiny_model(num_classes=3)  # fine-tuning: `clf` is new, everything else pre-trained
  initialize = igpt_jax.pretrained_initializer(workdir, model)
  assert counted_reads == []  # checked now, read when called
  fresh = random_variables(model, seed=4)["params"]
  params = initialize(fresh)
  assert counted_reads == [5]
  expected = dict(trees.flatten(jax.device_get(state.params)), clf=fresh["clf"])
  assert_bit_identical({"params": params}, {"params": trees.unflatten(expected)})


# ------------------------------------------------------------------------------------------------
# Exports never clobber


def test_export_refuses_a_non_empty_directory(tmp_path):
  model = tiny_model()
  directory = tmp_path / "hf"
  directory.mkdir()
  (directory / "notes.txt").write_text("precious")
  with pytest.raises(ValueError, match="not empty; .*overwrite=True") as e:
    igpt_hf.export_hf(model, random_variables(model), directory, random_clusters())
  assert_one_sentence(e)
  assert snapshot(directory) == {"notes.txt": b"precious"}
  assert os.listdir(tmp_path) == ["hf"]


def test_failed_export_leaves_the_destination_as_it_was(tmp_path, monkeypatch):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  model = tiny_model()
  directory = tmp_path / "hf"
  igpt_hf.export_hf(model, random_variables(model, seed=0), directory, random_clusters())
  before = snapshot(directory)

  def write_half_then_fail(tensors, path, metadata=None):
    with open(path, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(safetensors_numpy, "save_file", write_half_then_fail)
  with pytest.raises(OSError, match="disk full"):
    igpt_hf.export_hf(model, random_variables(model, seed=1), directory, random_clusters(),
                      overwrite=True)
  assert snapshot(directory) == before
  assert os.listdir(tmp_path) == ["hf"]


def test_overwrite_replaces_the_whole_directory(tmp_path):
  model = tiny_model()
  directory = tmp_path / "hf"
  directory.mkdir()
  (directory / "stale.bin").write_bytes(b"old")
  new = random_variables(model, seed=2)
  igpt_hf.export_hf(model, new, directory, random_clusters(), overwrite=True)
  assert "stale.bin" not in os.listdir(directory)
  assert os.listdir(tmp_path) == ["hf"]
  assert_bit_identical(igpt_hf.load_hf(directory)[1], new)


def test_an_empty_existing_directory_is_filled(tmp_path):
  model = tiny_model()
  (tmp_path / "hf").mkdir()
  igpt_hf.export_hf(model, random_variables(model), tmp_path / "hf", random_clusters())
  assert "model.safetensors" in os.listdir(tmp_path / "hf")


@pytest.mark.parametrize("case, pattern", [
    ("bert", "autoregressive only"),
    ("clusters", r"clusters must be .*\[16, 3\], got float32 \(8, 3\)"),
    ("shape", r"`sos` has shape \(16,\) in the variables but the model expects \(32,\)"),
    ("missing", r"the variables has no `h_1/attn/c_proj` \(2, 16, 32\), which the model needs"),
    ("extra", r"the variables holds `h_2/ln_1/g` \(32,\), which the model does not have"),
])
def test_export_refuses_what_does_not_fit(tmp_path, case, pattern):
  model = tiny_model(causal=case != "bert")
  variables = random_variables(model)
  clusters = random_clusters(num_clusters=8 if case == "clusters" else NUM_CLUSTERS)
  if case == "shape":
    variables = random_variables(tiny_model(width=16))
  elif case == "missing":
    del variables["params"]["h_1"]["attn"]["c_proj"]
  elif case == "extra":
    variables = random_variables(tiny_model(depth=3))
    variables["params"]["h_2"] = {"ln_1": variables["params"]["h_2"]["ln_1"]}
    for key in ("h_0", "h_1"):
      variables["params"][key] = random_variables(model)["params"][key]
  with pytest.raises(ValueError, match=pattern) as e:
    igpt_hf.export_hf(model, variables, tmp_path / "hf", clusters)
  assert_one_sentence(e)
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Imports refuse files that do not fit


@pytest.fixture()
def exported(tmp_path):
  model = tiny_model()
  igpt_hf.export_hf(model, random_variables(model), tmp_path / "hf", random_clusters())
  return tmp_path / "hf"


def _edit_json(path, **changes):
  with open(path, encoding="utf-8") as f:
    content = json.load(f)
  for key, value in changes.items():
    if value is None:
      content.pop(key, None)
    else:
      content[key] = value
  with open(path, "w", encoding="utf-8") as f:
    json.dump(content, f)


def _edit_tensors(path, change):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  tensors = dict(safetensors_numpy.load_file(str(path)))
  change(tensors)
  safetensors_numpy.save_file(tensors, str(path))


def _set(tensors, key, value):
  tensors[key] = np.full_like(tensors[key], value)


@pytest.mark.parametrize("case, pattern", [
    ("n_embd", r"`transformer.wpe.weight` has shape \(16, 32\) in .*model.safetensors but "
               r"config.json \(n_positions=16, n_embd=48\) expects \(16, 48\)"),
    ("n_layer_more", r"has no `transformer.h.2.attn.c_attn.weight` \(32, 96\), which config.json "
                     r"\(n_layer=3, n_embd=32\) needs"),
    ("n_layer_less", r"holds `transformer.h.1.attn.c_attn.bias` \(96,\), which an ImageGPT built "
                     r"from config.json \(n_layer=1\) does not have"),
    ("n_positions", r"config.json has 15 positions, which is not image_size\*\*2"),
    ("activation", r"activation_function='gelu', which iGPT does not compute"),
    ("epsilon", r"layer_norm_epsilon=1e-06 but iGPT's norm uses 1e-05"),
    ("model_type", r"model_type='gpt2', not 'imagegpt'"),
    ("no_config", r"has no config.json"),
    ("missing_key", r"has no `transformer.h.1.mlp.c_proj.weight` \(64, 32\)"),
    ("extra_key", r"holds `transformer.h.0.attn.q_attn.weight` \(32, 32\)"),
    ("bias", r"`transformer.h.0.mlp.c_fc.bias` in .*model.safetensors is not zero"),
    ("truncated", r"model.safetensors cannot be read as .safetensors \(truncated or corrupt"),
    ("no_weights", r"has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"),
    ("no_preprocessor", r"has no preprocessor_config.json, which holds the colour clusters"),
    ("no_clusters", r"preprocessor_config.json has no `clusters`"),
    ("clusters_shape", r"`clusters` of shape \(15, 3\) but config.json's vocab_size=17 needs"),
    ("size", r"size=\{'height': 8, 'width': 8\} but config.json's n_positions=16"),
])
def test_load_refuses_files_that_do_not_fit(exported, case, pattern):
  config = exported / "config.json"
  weights = exported / "model.safetensors"
  preprocessor = exported / "preprocessor_config.json"
  if case == "n_embd":
    _edit_json(config, n_embd=48, n_head=2)
  elif case == "n_layer_more":
    _edit_json(config, n_layer=3)
  elif case == "n_layer_less":
    _edit_json(config, n_layer=1)
  elif case == "n_positions":
    _edit_json(config, n_positions=15)
    _edit_tensors(weights, lambda t: t.update(
        {"transformer.wpe.weight": t["transformer.wpe.weight"][:15]}))
  elif case == "activation":
    _edit_json(config, activation_function="gelu")
  elif case == "epsilon":
    _edit_json(config, layer_norm_epsilon=1e-6)
  elif case == "model_type":
    _edit_json(config, model_type="gpt2")
  elif case == "no_config":
    os.remove(config)
  elif case == "missing_key":
    _edit_tensors(weights, lambda t: t.pop("transformer.h.1.mlp.c_proj.weight"))
  elif case == "extra_key":
    _edit_tensors(weights, lambda t: t.update(
        {"transformer.h.0.attn.q_attn.weight": np.zeros((32, 32), np.float32)}))
  elif case == "bias":
    _edit_tensors(weights, lambda t: _set(t, "transformer.h.0.mlp.c_fc.bias", 0.01))
  elif case == "truncated":
    with open(weights, "r+b") as f:
      f.truncate(os.path.getsize(weights) // 2)
  elif case == "no_weights":
    os.remove(weights)
  elif case == "no_preprocessor":
    os.remove(preprocessor)
  elif case == "no_clusters":
    _edit_json(preprocessor, clusters=None)
  elif case == "clusters_shape":
    _edit_json(preprocessor, clusters=random_clusters(num_clusters=15).tolist())
  elif case == "size":
    _edit_json(preprocessor, size={"height": 8, "width": 8})
  before = snapshot(exported)
  with pytest.raises(ValueError, match=pattern) as e:
    igpt_hf.load_hf(exported)
  assert_one_sentence(e)
  assert snapshot(exported) == before


def test_load_takes_dtype_options_but_not_a_shape(exported):
  model, variables, _ = igpt_hf.load_hf(exported, param_dtype=np.dtype("float16"))
  assert model.param_dtype == np.float16
  assert variables["params"]["wte"].dtype == np.float16
  with pytest.raises(ValueError, match=r"\['width'\] come from config.json"):
    igpt_hf.load_hf(exported, width=64)


# ------------------------------------------------------------------------------------------------
# OpenAI's checkpoints


def openai_arrays(params, gpt2_conv1d=False):
  """Our params -> OpenAI's variable names (optionally conv1d weights as GPT-2's [1, in, out])."""
  arrays = {}
  for key, value in trees.flatten(params).items():
    name = "model/" + key.replace("h_", "h", 1) if key.startswith("h_") else "model/" + key
    if "/mlp/" in name:
      name += "/w"
      if gpt2_conv1d:
        value = value[None]
    arrays["model/clf/wclf" if key == "clf" else name] = np.asarray(value)
  return arrays


def test_openai_layout_loads_bit_identically(tmp_path):
  model = tiny_model(num_classes=3)
  params = random_variables(model)["params"]
  arrays = openai_arrays(params, gpt2_conv1d=True)
  # Optimiser slots and counters are skipped; a zero conv1d bias is accepted.
  arrays.update({"model/wte/Adam": arrays["model/wte"], "model/wte/Adam_1": arrays["model/wte"],
                 "beta1_power": np.float32(0.9), "global_step": np.int64(7),
                 "model/h0/mlp/c_fc/b": np.zeros((64,), np.float32)})
  loaded_model, loaded, clusters = openai.load_openai_arrays(arrays, "custom", **SHAPE)
  assert loaded_model == model and clusters is None
  assert_bit_identical(loaded, {"params": params})

  # The two import paths agree: OpenAI's layout -> export_hf -> load_hf.
  igpt_hf.export_hf(loaded_model, loaded, tmp_path / "hf", random_clusters())
  assert_bit_identical(igpt_hf.load_hf(tmp_path / "hf")[1], {"params": params})


def test_openai_bert_checkpoint_loads_as_a_bert_model():
  model = tiny_model(causal=False)
  params = random_variables(model)["params"]
  loaded_model, loaded, _ = openai.load_openai_arrays(openai_arrays(params))
  assert loaded_model == model
  assert_bit_identical(loaded, {"params": params})


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"has no `model/h1/ln_2/g` \(32,\), which a 2-layer model needs"),
    ("unknown", r"holds `model/h0/attn/c_attn` \(32, 96\), which iGPT does not have"),
    ("bias", r"`model/h1/mlp/c_proj/b` in the arrays is not zero"),
    ("shape", r"`model/h1/mlp/c_fc/w` has shape \(32, 48\) in the arrays but .* expects \(32, 64\)"),
    ("variant", r"variant 'S' means width=512 but the arrays hold\(s\) width=32"),
    ("image_size", r"image_size=8 but `model/wpe` in the arrays has 16 rows"),
])
def test_openai_layout_refusals(case, pattern):
  arrays = openai_arrays(random_variables(tiny_model())["params"])
  options = {}
  if case == "missing":
    del arrays["model/h1/ln_2/g"]
  elif case == "unknown":
    arrays["model/h0/attn/c_attn"] = np.zeros((32, 96), np.float32)
  elif case == "bias":
    arrays["model/h1/mlp/c_proj/b"] = np.full((32,), 0.5, np.float32)
  elif case == "shape":
    arrays["model/h1/mlp/c_fc/w"] = arrays["model/h1/mlp/c_fc/w"][:, :48]
  elif case == "variant":
    options = dict(variant="S")
  elif case == "image_size":
    options = dict(image_size=8)
  with pytest.raises(ValueError, match=pattern) as e:
    openai.load_openai_arrays(arrays, **options)
  assert_one_sentence(e)


def test_load_openai_without_tensorflow_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
  with pytest.raises(ImportError, match="pip install tensorflow") as e:
    openai.load_openai("model.ckpt-1000")
  assert_one_sentence(e)


def test_load_openai_reads_a_tensorflow_checkpoint(tmp_path):
  tf = pytest.importorskip(
      "tensorflow", reason="TensorFlow is an optional, large dependency of load_openai only")
  model = tiny_model()
  params = random_variables(model)["params"]
  arrays = openai_arrays(params, gpt2_conv1d=True)
  graph = tf.Graph()
  with graph.as_default():
    for name, value in arrays.items():
      # Nested scopes give the variables exactly OpenAI's names ("model/h0/attn/q_proj").
      *scopes, leaf = name.split("/")
      with tf.compat.v1.variable_scope("/".join(scopes)):
        tf.compat.v1.get_variable(leaf, initializer=tf.constant(value))
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(tf.compat.v1.global_variables_initializer())
      prefix = saver.save(session, str(tmp_path / "model.ckpt"))
  assert set(arrays) <= set(dict(tf.train.list_variables(prefix)))
  clusters = random_clusters()
  igpt_jax.save_palette(str(tmp_path / "kmeans_centers.npy"), clusters)
  loaded_model, loaded, loaded_clusters = openai.load_openai(
      prefix, clusters_path=str(tmp_path / "kmeans_centers.npy"))
  assert loaded_model == model
  assert_bit_identical(loaded, {"params": params})
  np.testing.assert_array_equal(loaded_clusters, clusters)


# ------------------------------------------------------------------------------------------------
# Cross-framework parity with Hugging Face transformers


@pytest.fixture(scope="module")
def hf():
  torch = pytest.importorskip("torch", reason="parity with Hugging Face needs torch")
  transformers = pytest.importorskip(
      "transformers", reason="parity with Hugging Face needs transformers")
  return torch, transformers


def _hf_logits(torch, hf_model, ids):
  """Hugging Face reads [start token, x_0 .. x_{L-2}]; its logits at t predict x_t."""
  start = np.full((ids.shape[0], 1), NUM_CLUSTERS)  # the start token is the last id
  inputs = torch.tensor(np.concatenate([start, ids[:, :-1]], axis=1))
  with torch.no_grad():
    return hf_model(inputs).logits.numpy()


def _random_hf_model(torch, transformers, seed=0, **config):
  config = transformers.ImageGPTConfig(**dict(dict(
      vocab_size=NUM_CLUSTERS + 1, n_positions=IMAGE_SIZE**2, n_embd=32, n_layer=2, n_head=2),
      **config))
  torch.manual_seed(seed)
  model = transformers.ImageGPTForCausalImageModeling(config).eval()
  with torch.no_grad():
    # Larger than the default init (std 0.02) so that the logits are far from trivial; biases
    # zero (iGPT has none), norm gains away from 1.
    for name, parameter in model.named_parameters():
      if name.endswith(".bias"):
        parameter.zero_()
      elif ".ln_" in name:
        parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
      else:
        parameter.normal_(0.0, 0.3)
  return model


def _save_hf(transformers, hf_model, directory, clusters):
  hf_model.save_pretrained(directory)
  transformers.ImageGPTImageProcessor(
      clusters=clusters, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(
          directory)


def test_hf_model_loads_with_the_same_logits(tmp_path, hf):
  torch, transformers = hf
  hf_model = _random_hf_model(torch, transformers)  # n_inner None: mlp_dim = 4 * n_embd
  clusters = random_clusters()
  _save_hf(transformers, hf_model, tmp_path / "hf", clusters)
  model, variables, loaded_clusters = igpt_hf.load_hf(tmp_path / "hf")
  assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (32, 2, 2, 128)
  np.testing.assert_array_equal(loaded_clusters, clusters)
  ids = random_ids()
  ours = np.asarray(model.apply(variables, ids))
  theirs = _hf_logits(torch, hf_model, ids)
  difference = float(np.max(np.abs(ours - theirs)))
  print(f"\nHF -> igpt_jax: max |logits difference| = {difference:.3g} "
        f"(logits up to {np.max(np.abs(theirs)):.3g})")
  assert ours.shape == theirs.shape == (2, IMAGE_SIZE**2, NUM_CLUSTERS)
  assert np.std(theirs) > 0.1  # a test with near-zero logits would prove nothing
  assert difference < PARITY_TOLERANCE


def test_exported_model_gives_hf_the_same_logits(tmp_path, hf):
  torch, transformers = hf
  model = tiny_model(num_classes=3)
  variables = random_variables(model, seed=3)
  igpt_hf.export_hf(model, variables, tmp_path / "hf", random_clusters())
  ids = random_ids(1)
  hf_model = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
  assert hf_model.dtype == torch.float32
  ours = np.asarray(model.apply(variables, ids))
  theirs = _hf_logits(torch, hf_model, ids)
  difference = float(np.max(np.abs(ours - theirs)))
  # The classifier loads into ImageGPTForImageClassification (mean over positions, then score).
  classifier = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "hf").eval()
  _, class_logits = model.apply(variables, ids, method=igpt_jax.ImageGPT.classify)
  class_difference = float(np.max(np.abs(np.asarray(class_logits)
                                         - _hf_logits(torch, classifier, ids))))
  print(f"\nigpt_jax -> HF: max |logits difference| = {difference:.3g} "
        f"(logits up to {np.max(np.abs(ours)):.3g}); class logits {class_difference:.3g}")
  assert np.std(ours) > 0.1
  assert difference < PARITY_TOLERANCE
  assert class_difference < PARITY_TOLERANCE


def test_hf_nonzero_bias_is_refused(tmp_path, hf):
  torch, transformers = hf
  hf_model = _random_hf_model(torch, transformers)
  with torch.no_grad():
    hf_model.transformer.h[1].attn.c_proj.bias.normal_()
  _save_hf(transformers, hf_model, tmp_path / "hf", random_clusters())
  with pytest.raises(ValueError, match=r"`transformer.h.1.attn.c_proj.bias` in .* is not zero"):
    igpt_hf.load_hf(tmp_path / "hf")


def test_pytorch_model_bin_loads(tmp_path, hf):
  torch, transformers = hf
  hf_model = _random_hf_model(torch, transformers, n_inner=64)
  _save_hf(transformers, hf_model, tmp_path / "safetensors", random_clusters())
  _, expected, _ = igpt_hf.load_hf(tmp_path / "safetensors")
  shutil.copytree(tmp_path / "safetensors", tmp_path / "bin")
  os.remove(tmp_path / "bin" / "model.safetensors")
  torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  _, loaded, _ = igpt_hf.load_hf(tmp_path / "bin")
  assert_bit_identical(loaded, expected)


def test_hf_image_processor_reads_the_exported_clusters(tmp_path, hf):
  _, transformers = hf
  model = tiny_model()
  clusters = random_clusters(4)
  igpt_hf.export_hf(model, random_variables(model), tmp_path / "hf", clusters)
  processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "hf")
  np.testing.assert_array_equal(np.asarray(processor.clusters), clusters)
  images = np.random.default_rng(0).integers(0, 256, (2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  ids = processor(list(images), return_tensors="np", input_data_format="channels_last")["input_ids"]
  expected = igpt_jax.quantize(images.astype(np.float32) / 127.5 - 1.0, clusters)
  np.testing.assert_array_equal(ids, np.asarray(expected).reshape(2, -1))
