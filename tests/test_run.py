"""run.py end to end: config errors before compute, SIGTERM + resume is exact, learning works."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import run
from configs import vit_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=32", "--config.model.depth=1", "--config.model.mlp_dim=64",
        "--config.model.num_heads=2", "--config.log_every=5", "--config.eval_every=0",
        "--config.checkpoint_every=0", "--config.optimizer.warmup_steps=10"]


def _config(data_dir, **overrides):
  config = vit_digits.get_config()
  config.data_dir = str(data_dir)
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


@pytest.mark.parametrize("overrides, message", [
    ({"model.variant": "Q/16"}, "model variant 'Q/16' is unknown"),
    ({"model.patch_size": 3}, "patch size 3 does not divide image_size 8"),
    ({"batch_size": 12}, "config.batch_size=12 is not divisible by the 8 data-parallel devices"),
    ({"dataset": "no_such_dataset"}, "config.dataset"),
    ({"optimizer.name": "lamb"}, "config.optimizer.name='lamb' is unknown"),
    ({"mesh.data": 3}, "config.mesh"),
    # A label >= num_classes would be an all-zero one-hot row: a silently wrong loss.
    ({"num_classes": 5}, "config.num_classes=5 but sklearn_digits has 10 classes; set "
                         "config.num_classes=10."),
    ({"label_smoothing": 1.5}, "config.label_smoothing=1.5 must lie in [0, 1)"),
    ({"foo": 1}, "config has unknown field(s) ['foo']"),
    ({"optimizer.lrate": 0.1}, "config.optimizer has unknown field(s) ['lrate']"),
    ({"task": "vit_segmentation"}, "config.task='vit_segmentation' is unknown; use one of"),
])
def test_bad_configs_fail_before_compute(tmp_path, overrides, message):
  workdir = tmp_path / "workdir"
  with pytest.raises(ValueError, match=re.escape(message)):
    run.prepare(_config(tmp_path / "data", **overrides), str(workdir))
  assert not workdir.exists()  # nothing was written


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="--workdir .* is not writable"):
    run.prepare(_config(tmp_path / "data"), str(blocker / "workdir"))


@pytest.mark.parametrize("mode", ["plan", "eval"])
def test_reading_modes_do_not_create_the_workdir(tmp_path, mode):
  workdir = tmp_path / "workdir"
  run.prepare(_config(tmp_path / "data"), str(workdir), mode)
  assert not workdir.exists()


def _igpt_config(data_dir, **overrides):
  from configs import igpt_digits  # pylint: disable=g-import-not-at-top
  config = igpt_digits.get_config()
  config.data_dir = str(data_dir)
  config.update(overrides)
  return config


def _fake_run(workdir, palette=True):
  """A workdir that looks trained: a checkpoint step directory and (optionally) a palette."""
  os.makedirs(workdir / "checkpoints" / "10")
  if palette:
    np.save(workdir / "palette.npy", np.zeros((16, 3), np.float32))


@pytest.mark.parametrize("case, message", [
    ("missing_palette", r"palette .*missing.npy does not exist; set config.palette"),
    ("init_from_for_ar", r"config.init_from is for the igpt_finetune_\* tasks"),
    ("init_from_empty", r"config.init_from=.* holds no checkpoint"),
    ("refit_palette", r"holds checkpoints trained on the colour ids of .*palette.npy"),
    ("probe_without_palette", r"has no palette.npy; train there first"),
    ("probe_layer", r"probe layer 3 is out of range; use 0..2"),
    ("probe_l2", r"ridge penalties \(0.0,\) must be one or more positive numbers"),
    ("probe_folds", r"choosing among the ridge penalties .* needs cross-validation"),
])
def test_igpt_settings_fail_before_compute(tmp_path, case, message):
  data_dir, workdir = tmp_path / "data", tmp_path / "workdir"
  mode, overrides = "train", {}
  if case == "missing_palette":
    overrides = {"palette": str(tmp_path / "missing.npy")}
  elif case == "init_from_for_ar":
    _fake_run(tmp_path / "pretrained")
    overrides = {"init_from": str(tmp_path / "pretrained")}
  elif case == "init_from_empty":
    os.makedirs(tmp_path / "empty")
    overrides = {"init_from": str(tmp_path / "empty")}
    mode = "probe"
  elif case == "refit_palette":
    _fake_run(workdir)
    mode = "palette"
  elif case == "probe_without_palette":
    mode = "probe"
  elif case.startswith("probe_"):
    _fake_run(workdir)
    mode = "probe"
    overrides = {"probe_layer": {"probe_layers": (3,)}, "probe_l2": {"probe_l2": (0.0,)},
                 "probe_folds": {"probe_folds": 0}}[case]
  before = sorted(os.walk(workdir))
  with pytest.raises(ValueError, match=message):
    run.prepare(_igpt_config(data_dir, **overrides), str(workdir), mode)
  if case == "refit_palette":
    assert sorted(os.walk(workdir)) == before  # the palette was not touched


def test_finetuning_reads_the_palette_of_the_pretraining_run(tmp_path):
  from igpt_jax.family import palette_path  # pylint: disable=g-import-not-at-top
  _fake_run(tmp_path / "pretrained")
  config = _igpt_config(tmp_path / "data", task="igpt_finetune_ar",
                        init_from=str(tmp_path / "pretrained"))
  _, prepared = run.prepare(config, str(tmp_path / "new"), "plan")
  assert palette_path(prepared) == str(tmp_path / "pretrained" / "palette.npy")
  config.palette = str(tmp_path / "mine.npy")
  np.save(tmp_path / "mine.npy", np.zeros((16, 3), np.float32))
  _, prepared = run.prepare(config, str(tmp_path / "new"), "plan")
  assert palette_path(prepared) == str(tmp_path / "mine.npy")


def _run(workdir, data_dir, *extra, wait=True):
  command = [sys.executable, os.path.join(ROOT, "run.py"), f"--workdir={workdir}",
             f"--config.data_dir={data_dir}", *TINY, *extra]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2")
  if not wait:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)
  return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=600)


def test_error_is_one_sentence_and_exit_code_2(tmp_path):
  result = _run(tmp_path / "w", tmp_path / "data", "--config.batch_size=7")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.batch_size=7 is not divisible by the 2 data-parallel devices "
      "(mesh data x fsdp = 2 x 1); use a multiple of 2.")
  assert not (tmp_path / "w").exists()


def _params(workdir, step):
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "default"))
  return state["params"]


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_unbroken_run(tmp_path):
  steps = ["--config.total_steps=150", "--config.model.dropout_rate=0.1"]
  data_dir = tmp_path / "data"
  unbroken = _run(tmp_path / "unbroken", data_dir, *steps)
  assert unbroken.returncode == 0, unbroken.stdout + unbroken.stderr

  process = _run(tmp_path / "broken", data_dir, *steps, wait=False)
  for line in process.stdout:
    if line.startswith("step 20/"):
      process.send_signal(signal.SIGTERM)
      break
  output = process.stdout.read()
  assert process.wait(timeout=300) == 75  # stopped by a signal, checkpoint saved: run again
  assert "SIGTERM received: saved a checkpoint at step" in output
  stopped_at = int(output.split("saved a checkpoint at step ")[1].split()[0])
  assert 20 <= stopped_at < 150
  assert os.listdir(tmp_path / "broken" / "checkpoints") == [str(stopped_at)]

  resumed = _run(tmp_path / "broken", data_dir, *steps)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resumed from" in resumed.stdout and f"at step {stopped_at}" in resumed.stdout

  expected, actual = _params(tmp_path / "unbroken", 150), _params(tmp_path / "broken", 150)
  flat_expected = ocp.tree.to_flat_dict(expected)
  flat_actual = ocp.tree.to_flat_dict(actual)
  assert flat_expected.keys() == flat_actual.keys()
  for key in flat_expected:
    np.testing.assert_array_equal(flat_actual[key], flat_expected[key], err_msg=str(key))

  # Exports never replace a file silently; --overwrite does, and the workdir is only read.
  output = tmp_path / "vit.npz"
  checkpoints = sorted(os.listdir(tmp_path / "broken" / "checkpoints"))
  assert _run(tmp_path / "broken", data_dir, "--mode=export", f"--output={output}").returncode == 0
  first = output.read_bytes()
  again = _run(tmp_path / "broken", data_dir, "--mode=export", f"--output={output}")
  assert again.returncode == 2 and "already exists" in again.stderr.strip().splitlines()[-1]
  assert _run(tmp_path / "broken", data_dir, "--mode=export", f"--output={output}",
              "--overwrite").returncode == 0
  assert output.read_bytes() == first
  assert sorted(os.listdir(tmp_path / "broken" / "checkpoints")) == checkpoints

  # The unbroken run learned something and logged it where users look.
  records = [json.loads(line) for line in open(tmp_path / "unbroken" / "metrics.jsonl")]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert losses[-1] < 0.85 * losses[0]
  # Train records carry the throughput and the MFU: model FLOPs per second per device (the
  # same FLOPs per example throughout) over the measured peak.
  rated = [r for r in records if "train/loss" in r]
  assert all(r["examples_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in rated)
  per_example = {round(r["flops_per_sec_per_device"] * 2 / r["examples_per_sec"]) for r in rated}
  assert len(per_example) == 1 and per_example.pop() > 0  # 2 devices
  assert "MFU:" in unbroken.stdout and "% | ETA" in unbroken.stdout
  result = json.load(open(tmp_path / "unbroken" / "result.json"))
  assert result["step"] == 150 and result["accuracy"] > 0.2  # chance is 0.1


def _igpt(workdir, data_dir, *extra):
  command = [sys.executable, os.path.join(ROOT, "run.py"), "--config=configs/igpt_digits.py",
             f"--workdir={workdir}", f"--config.data_dir={data_dir}",
             "--config.model.width=32", "--config.model.depth=2", "--config.model.mlp_dim=64",
             "--config.model.num_heads=2", "--config.total_steps=30",
             "--config.optimizer.warmup_steps=5", "--config.log_every=10",
             "--config.eval_every=0", "--config.checkpoint_every=0",
             "--config.sample.num_images=3", "--config.sample.num_samples=2", *extra]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


@pytest.mark.slow
def test_igpt_palette_train_sample_probe(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, data_dir = tmp_path / "igpt", tmp_path / "data"
  output = _igpt(workdir, data_dir)  # fits the palette first, then trains
  assert "palette written to" in output and "bits_per_token" in output
  assert np.load(workdir / "palette.npy").shape == (16, 3)
  entropy = json.load(open(workdir / "palette.json"))["unigram_entropy_bits"]
  assert 0 < entropy <= 4  # 16 colours
  result = json.load(open(workdir / "result.json"))
  assert result["step"] == 30 and result["bits_per_token"] < 4

  _igpt(workdir, data_dir, "--mode=sample")
  completions = Image.open(workdir / "completions.png")
  # 3 rows (one per test image) of prompt | 2 samples | original, 8x8 images scaled 4x.
  cell, separator = 8 * 4, 2
  assert completions.size == (4 * cell + 5 * separator, 3 * cell + 4 * separator)
  # Unconditional samples: 3 rows of 2 samples.
  assert Image.open(workdir / "samples.png").size == (2 * cell + 3 * separator,
                                                      3 * cell + 4 * separator)

  output = _igpt(workdir, data_dir, "--mode=probe")
  report = json.load(open(workdir / "probe.json"))
  assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
  assert all(0.1 < row["test_accuracy"] <= 1 for row in report["layers"])
  assert 0.5 < report["pixels"]["test_accuracy"] <= 1
  assert report["best_layer_by"] == "cv_accuracy"
  best = max(report["layers"], key=lambda row: row["cv_accuracy"])
  assert report["best_layer"] == best["layer"]
  assert all(row["l2"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) for row in report["layers"])
  assert "on raw pixels" in output


@pytest.mark.parametrize("recipe", sorted(
    name[:-3] for name in os.listdir(os.path.join(ROOT, "configs"))
    if name.endswith(".py") and name not in ("__init__.py", "common.py")))
def test_every_recipe_reads_into_a_run(recipe):
  """Every field of every recipe is one that its family reads (and none is missing)."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"configs.{recipe}")
  family, prepared = run.read(module.get_config(), "/nonexistent/workdir")
  assert prepared.task in family.tasks
  family.abstract_params(prepared) if recipe.startswith("igpt") else family.model(prepared)
