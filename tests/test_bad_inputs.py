"""The bad-input matrix: every input a user can get wrong ends in one `error:` sentence, exit
status 2, and leaves the workdir byte for byte as it was.

In-process cases go through `run.dispatch` (what `python run.py` runs after parsing its flags);
the command-line cases (flags, recipe files) run `run.py` itself.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import run
from common_jax import family as family_lib
from configs import igpt_digits
from configs import vit_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
TINY_IGPT = dict(width=32, depth=2, mlp_dim=64, num_heads=2)


def _apply(config, overrides):
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def vit_config(data_dir, **overrides):
  config = vit_digits.get_config()
  config.update(dict(data_dir=str(data_dir), total_steps=10, log_every=5, eval_every=0,
                     checkpoint_every=0))
  config.model.update(TINY_VIT)
  config.optimizer.warmup_steps = 2
  return _apply(config, overrides)


def igpt_config(data_dir, **overrides):
  config = igpt_digits.get_config()
  config.update(dict(data_dir=str(data_dir), total_steps=10, log_every=5, eval_every=0,
                     checkpoint_every=0))
  config.model.update(TINY_IGPT)
  config.optimizer.warmup_steps = 2
  return _apply(config, overrides)


def snapshot(directory):
  """{relative path: sha256} of every file below `directory` (and the directories)."""
  state = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      state[os.path.relpath(os.path.join(root, name), directory) + "/"] = ""
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        state[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return state


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A ViT and an iGPT workdir, each trained for 10 steps (one checkpoint)."""
  root = tmp_path_factory.mktemp("trained")
  data_dir = root / "data"
  assert run.dispatch(vit_config(data_dir), str(root / "vit")) == 0
  assert run.dispatch(igpt_config(data_dir), str(root / "igpt")) == 0
  return root


def _sentence(text):
  lines = [line for line in text.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), text
  assert "Traceback" not in text and lines[0].endswith((".", "?", ")")), text
  return lines[0]


def _official_npz(path, width):
  """A ViT .npz in the official layout, of a width the digits recipe does not have."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model("custom", num_classes=10, image_size=8, width=width, depth=1,
                              mlp_dim=64, num_heads=2, patch_size=2, classifier="gap")
  from common_jax import trees  # pylint: disable=g-import-not-at-top
  shapes = trees.flat_shapes(models.abstract_variables(model)["params"])
  np.savez(path, **{key: np.zeros(shape, np.float32) for key, shape in shapes.items()})
  return str(path)


# (family, mode, config overrides, export (output, format, overwrite) or None, expected fragment)
CASES = {
    "unknown variant": ("vit", "train", {"model.variant": "Q/16"}, None, "model variant 'Q/16'"),
    "patch does not divide": ("vit", "train", {"model.patch_size": 3}, None, "patch size 3"),
    "batch vs devices": ("vit", "train", {"batch_size": 12}, None, "config.batch_size=12"),
    "unknown dataset": ("vit", "train", {"dataset": "no_such_dataset"}, None, "config.dataset"),
    "unknown optimizer": ("vit", "train", {"optimizer.name": "lamb"}, None, "'lamb' is unknown"),
    "mesh of 3": ("vit", "train", {"mesh.data": 3}, None, "config.mesh"),
    "two mesh axes -1": ("vit", "train", {"mesh.fsdp": -1}, None, "more than one axis"),
    "num_classes vs dataset": ("vit", "train", {"num_classes": 5}, None,
                               "config.num_classes=5 but sklearn_digits has 10 classes"),
    "num_classes 0": ("vit", "train", {"num_classes": 0}, None, "config.num_classes=0"),
    "image_size 0": ("vit", "train", {"image_size": 0}, None, "config.image_size=0"),
    "label smoothing": ("vit", "train", {"label_smoothing": 1.5}, None, "label_smoothing=1.5"),
    "dropout 1.5": ("vit", "train", {"model.dropout_rate": 1.5}, None, "dropout_rate=1.5"),
    "cudnn on cpu": ("vit", "train", {"model.attention_implementation": "cudnn"}, None,
                     "needs an NVIDIA GPU"),
    "unknown dtype": ("vit", "train", {"model.dtype": "float8"}, None, "config.model.dtype"),
    "unknown field": ("vit", "train", {"foo": 1}, None, "unknown field(s) ['foo']"),
    "optimizer typo": ("vit", "train", {"optimizer.learning_rte": 0.1}, None,
                       "did you mean learning_rate?"),
    "unknown task": ("vit", "train", {"task": "vit_segmentation"}, None, "config.task="),
    "keep no checkpoint": ("vit", "train", {"keep_checkpoints": 0}, None, "keep_checkpoints=0"),
    "on_nonfinite": ("vit", "train", {"on_nonfinite": "explode"}, None, "on_nonfinite"),
    "no steps": ("vit", "train", {"total_steps": 0}, None, "total_steps=0"),
    "accumulation": ("vit", "train", {"accum_steps": 3}, None, "config.accum_steps=3"),
    "warm-up too long": ("vit", "train", {"optimizer.warmup_steps": 50}, None, "warmup_steps=50"),
    "zero learning rate": ("vit", "train", {"optimizer.learning_rate": 0.0}, None,
                           "learning_rate=0.0 must be positive"),
    "weight decay with sgd": ("vit", "train", {"optimizer.name": "sgd"}, None, "weight_decay"),
    "eval batch": ("vit", "train", {"eval_batch_size": 7}, None, "config.eval_batch_size=7"),
    "resume with another learning rate": ("vit", "train", {"optimizer.learning_rate": 1e6},
                                          None, "optimizer.learning_rate (0.003 -> 1000000.0)"),
    "resume with another seed": ("vit", "train", {"seed": 1}, None, "seed (0 -> 1)"),
    "resume with fewer steps": ("vit", "train", {"total_steps": 5}, None,
                                "total_steps (10 -> 5)"),
    "iGPT mode on ViT": ("vit", "sample", {}, None, "--mode sample is not a mode of ViT"),
    "export without output": ("vit", "export", {}, ("", "", False), "needs --output"),
    "export ViT as hf": ("vit", "export", {}, ("{tmp}/x", "hf", False), "--format hf"),
    "export into the workdir": ("vit", "export", {}, ("{workdir}/vit.npz", "npz", True),
                                "lies in the workdir"),
    "export over a workdir": ("igpt", "export", {}, ("{root}/vit", "hf", True),
                              "lies in the workdir"),
    "export over its own workdir": ("igpt", "export", {}, ("{workdir}", "hf", True),
                                    "lies in the workdir"),
    "overwrite a non-export": ("vit", "export", {}, ("{tmp}/notes.txt", "npz", True),
                              "is not an earlier npz export"),
    "existing output": ("vit", "export", {}, ("{tmp}/notes.txt", "npz", False),
                        "already exists"),
    "init_from missing": ("vit", "train", {"init_from": "{tmp}/none.npz"}, None, "none.npz"),
    "init_from of another width": ("vit", "train", {"init_from": "{tmp}/wide.npz"}, None,
                                   "but the model expects"),
    "palette missing": ("igpt", "train", {"palette": "{tmp}/missing.npy"}, None,
                        "missing.npy does not exist"),
    "palette not finite": ("igpt", "probe", {"palette": "{tmp}/nan.npy"}, None,
                           "non-finite colours"),
    "init_from for pre-training": ("igpt", "train", {"init_from": "{root}/igpt"}, None,
                                   "config.init_from is for the igpt_finetune_* tasks"),
    "probe layer": ("igpt", "probe", {"probe_layers": (7,)}, None, "probe layer 7"),
    "probe penalty": ("igpt", "probe", {"probe_l2": (0.0,)}, None, "ridge penalties"),
    "mask probability": ("igpt", "train", {"mask_prob": 1.5}, None, "config.mask_prob=1.5"),
    "fine-tune from another size": ("igpt", "train",
                                    {"task": "igpt_finetune_ar", "model.width": 48,
                                     "init_from": "{root}/igpt"}, None,
                                    "use the same model options as the pre-training run"),
    "unknown preprocessing op": ("vit", "train", {"preprocess_train": "decode|nope(3)"}, None,
                                 "has the op 'nope(3)', which is unknown"),
    "preprocessing without decode": ("vit", "train", {"preprocess_eval": "value_range(-1,1)"},
                                     None, "start it with 'decode'"),
    "preprocessing to another size": ("vit", "train",
                                      {"preprocess_train": "decode|resize(12)|value_range(-1,1)"},
                                      None, "at 12x12, but config.image_size=8"),
    "eval images at another size": ("vit", "train",
                                    {"image_size": 12,
                                     "preprocess_train": "decode|resize(12)|value_range(-1,1)"},
                                    None, "preprocess_eval='decode|value_range(-1,1)' leaves"),
    "iGPT image size": ("igpt", "train", {"image_size": 6}, None,
                        "at 8x8, but config.image_size=6"),
    "plan at another size": ("vit", "plan", {"image_size": 16}, None,
                             "at 8x8, but config.image_size=16"),
    "image folder without a root": ("vit", "train", {"dataset": "image_folder:"}, None,
                                    "names no folder"),
    "text file named .png": ("vit", "train", {"dataset": "image_folder:{tmp}/folder"}, None,
                             "image 'train/a/bad.png'"),
    "eval of an empty workdir": ("vit", "eval", {}, None, "holds no checkpoints directory"),
    "workdir in use": ("vit", "train", {"total_steps": 20}, None, "is in use by process"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_sentence_and_changes_nothing(case, trained, tmp_path, capsys):
  family, mode, overrides, export, fragment = CASES[case]
  workdir = trained / family
  if case == "eval of an empty workdir":
    workdir = tmp_path / "empty"
  names = dict(tmp=tmp_path, root=trained, workdir=workdir)
  overrides = {key: value.format(**names) if isinstance(value, str) else value
               for key, value in overrides.items()}
  (tmp_path / "notes.txt").write_text("my notes")
  _official_npz(tmp_path / "wide.npz", width=48)
  np.save(tmp_path / "nan.npy", np.full((16, 3), np.nan, np.float32))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ("train", "test"):
    os.makedirs(tmp_path / "folder" / split / "a")
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    image.save(tmp_path / "folder" / split / "a" / "0.png")
  (tmp_path / "folder" / "train" / "a" / "bad.png").write_text("not an image")
  if export is not None:
    export = family_lib.ExportRequest(export[0].format(**names), export[1], export[2])
  lock = None
  if case == "workdir in use":  # a live process (this one) holds the lock
    lock = workdir / "run.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(),
                                "started": "now"}))
  config = (vit_config if family == "vit" else igpt_config)(trained / "data", **overrides)
  before = {name: snapshot(trained / name) for name in ("vit", "igpt")}
  notes = (tmp_path / "notes.txt").read_bytes()
  try:
    status = run.dispatch(config, str(workdir), mode, export)
    after = {name: snapshot(trained / name) for name in ("vit", "igpt")}
  finally:
    if lock is not None:
      lock.unlink()
  captured = capsys.readouterr()
  assert status == 2, captured.out + captured.err
  line = _sentence(captured.err)
  assert fragment in line, line
  assert after == before
  assert (tmp_path / "notes.txt").read_bytes() == notes
  assert not (tmp_path / "empty").exists()


def _cli(*args, cwd=ROOT):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
  return result.returncode, result.stderr


CLI_CASES = {
    "missing recipe": (["--config=/nonexistent/recipe.py"], "no such recipe file"),
    "recipe syntax error": (["--config={tmp}/syntax.py"], "line 1: invalid syntax"),
    "recipe without get_config": (["--config={tmp}/empty.py"], "defines no get_config()"),
    "unknown recipe argument": (["--config=configs/igpt_digits.py:xyz"],
                                "the argument 'xyz' is unknown"),
    "unknown override": (["--config.foo=1"], "config has no field 'foo'"),
    "override typo": (["--config.optimizer.learning_rte=1"], "did you mean learning_rate?"),
    "override of the wrong type": (["--config.batch_size=abc"], "--config.batch_size=abc"),
    "unknown flag": (["--nosuchflag"], "Unknown command line flag 'nosuchflag'"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_command_line_mistakes_are_one_sentence(case, trained, tmp_path):
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "empty.py").write_text("VALUE = 1\n")
  args, fragment = CLI_CASES[case]
  before = snapshot(trained / "vit")
  status, stderr = _cli(*[arg.format(tmp=tmp_path) for arg in args],
                        f"--workdir={trained / 'vit'}", "--mode=plan")
  assert status == 2, stderr
  assert fragment in _sentence(stderr)
  assert snapshot(trained / "vit") == before
