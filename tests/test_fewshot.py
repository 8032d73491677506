"""Few-shot linear evaluation (vit_jax.fewshot) and the closed-form ridge both families share."""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

import run
import vit_jax
from common_jax import ridge
from configs import vit_digits
from vit_jax import fewshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# The ridge


@pytest.mark.parametrize("n, dim", [(40, 6), (12, 30)])  # the primal and the dual solves
def test_ridge_equals_a_least_squares_reference(n, dim):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, dim)) * rng.uniform(0.5, 3, dim) + rng.normal(size=dim)
  targets = ridge.one_vs_all_targets(rng.integers(0, 4, n), 4)
  penalties = (0.1, 1024.0)
  fit = ridge.fit(x, targets, penalties)
  # Reference: min ||x_s W + b - t||^2 + p ||W||^2 with b free, as one stacked least-squares
  # problem [[x_s, 1], [sqrt(p) I, 0]] [W; b] = [t; 0].
  standardised = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
  queries = rng.normal(size=(7, dim))
  for i, penalty in enumerate(penalties):
    design = np.block([[standardised, np.ones((n, 1))],
                       [np.sqrt(penalty) * np.eye(dim), np.zeros((dim, 1))]])
    solution = np.linalg.lstsq(design, np.concatenate([targets, np.zeros((dim, 4))]),
                               rcond=None)[0]
    np.testing.assert_allclose(fit.weights[i], solution[:dim], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.target_mean, solution[dim], rtol=1e-8, atol=1e-10)
    expected = (queries - x.mean(axis=0)) / (x.std(axis=0) + 1e-6) @ solution[:dim] + solution[dim]
    np.testing.assert_allclose(ridge.scores(queries, fit, i), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(ridge.predict(queries, fit, i), np.argmax(expected, axis=1))


def test_one_vs_all_targets():
  np.testing.assert_array_equal(ridge.one_vs_all_targets(np.array([2, 0]), 3),
                                [[-1, -1, 1], [1, -1, -1]])


# ------------------------------------------------------------------------------------------------
# Few-shot accuracies from features


def _separable(per_class, num_classes=10, dim=32, seed=0):
  """Tight clusters around class centres that differ in every dimension (so that standardising
  with the few training examples' statistics leaves no dimension of pure noise)."""
  centres = np.random.default_rng(123).normal(size=(num_classes, dim))
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class)
  rng.shuffle(labels)
  features = centres[labels] + 0.01 * rng.normal(size=(len(labels), dim))
  return features.astype(np.float32), labels


def test_fewshot_is_exact_on_separable_features():
  train_x, train_y = _separable(30, seed=0)
  test_x, test_y = _separable(20, seed=1)
  accuracies = fewshot.fewshot_accuracies(train_x, train_y, test_x, test_y, num_classes=10)
  assert list(accuracies) == [1, 5, 10, 25]
  assert all(values == [1.0, 1.0, 1.0] for values in accuracies.values()), accuracies
  rows = fewshot.summarize(accuracies)
  assert [(row["shots"], row["mean"], row["std"]) for row in rows] == [
      (1, 1.0, 0.0), (5, 1.0, 0.0), (10, 1.0, 0.0), (25, 1.0, 0.0)]
  table = fewshot.format_table(rows)
  assert "1.0000 ± 0.0000" in table and len(table.splitlines()) == 5


def test_fewshot_on_unpredictable_labels_is_near_chance_and_seeds_differ():
  rng = np.random.default_rng(0)
  train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(500, 16))
  train_y, test_y = np.arange(300) % 5, rng.integers(0, 5, 500)
  accuracies = fewshot.fewshot_accuracies(train_x, train_y, test_x, test_y, num_classes=5,
                                          shots=(5,), seeds=4)
  assert all(0.1 < value < 0.32 for value in accuracies[5]), accuracies
  assert len(set(accuracies[5])) > 1  # each seed draws other examples
  # Deterministic: the same draws again.
  assert fewshot.fewshot_accuracies(train_x, train_y, test_x, test_y, num_classes=5,
                                    shots=(5,), seeds=4) == accuracies


def test_more_shots_than_a_class_has_is_one_sentence():
  train_x, train_y = _separable(30)
  train_y = np.where(train_y == 3, 4, train_y)  # class 3 has none
  with pytest.raises(ValueError, match=r"^config.fewshot_shots asks for 25 training examples per "
                     r"class but class 3 has only 0 in the train split; lower "
                     r"config.fewshot_shots to at most 0 or use a larger config.train_split.$"):
    fewshot.fewshot_accuracies(train_x, train_y, train_x, train_y, num_classes=10)


@pytest.mark.parametrize("shots, seeds, l2, message", [
    ((), 3, 1024.0, r"config.fewshot_shots=\(\) must be one or more positive integers"),
    ((0, 5), 3, 1024.0, r"config.fewshot_shots=\(0, 5\) must be one or more positive integers"),
    ((1.5,), 3, 1024.0, r"config.fewshot_shots=\(1.5,\) must be"),
    ((1,), 0, 1024.0, r"config.fewshot_seeds=0 must be a positive integer"),
    ((1,), 3, 0.0, r"config.fewshot_l2=0.0 must be a positive number"),
    ((1,), 3, float("nan"), r"config.fewshot_l2=nan must be a positive number"),
])
def test_settings_are_checked(shots, seeds, l2, message):
  with pytest.raises(ValueError, match=message):
    fewshot.check_settings(shots, seeds, l2)


# ------------------------------------------------------------------------------------------------
# Features from a model


@pytest.mark.parametrize("classifier, representation_size", [("token", 12), ("gap", None)])
def test_features_are_what_the_head_sees(classifier, representation_size):
  model = vit_jax.create_model("custom", num_classes=5, image_size=8, width=16, depth=1,
                               mlp_dim=32, num_heads=2, patch_size=4, classifier=classifier,
                               representation_size=representation_size)
  images = np.random.default_rng(0).uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
  params = jax.device_get(flax.linen.meta.unbox(
      model.init(jax.random.PRNGKey(0), images)["params"]))
  # A non-zero head (it starts at zero), so that the logits test the features.
  params["head"] = {"kernel": np.random.default_rng(1).normal(size=params["head"]["kernel"].shape),
                    "bias": np.arange(5.0)}
  batches = [{"image": images[:4], "label": np.arange(4), "mask": np.ones(4, np.float32)},
             {"image": np.concatenate([images[4:], np.zeros((2, 8, 8, 3), np.float32)]),
              "label": np.array([4, 0, 0, 0]), "mask": np.array([1, 1, 0, 0], np.float32)}]
  features, labels = fewshot.extract_features(model, params, batches)
  assert features.shape == (6, representation_size or 16) and features.dtype == np.float32
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 0])  # padding rows dropped
  logits = np.asarray(model.apply({"params": params}, images))
  np.testing.assert_allclose(features @ params["head"]["kernel"] + params["head"]["bias"], logits,
                             rtol=1e-5, atol=1e-5)
  # The loop's evaluator: params + data -> mean accuracy per shot count.
  evaluator = fewshot.make_evaluator(model, lambda: batches, lambda: batches, num_classes=5,
                                     shots=(1,), seeds=2)
  results = evaluator(params)
  assert list(results) == ["fewshot/1shot_accuracy"] and 0 <= results["fewshot/1shot_accuracy"] <= 1


# ------------------------------------------------------------------------------------------------
# run.py --mode fewshot


def test_fewshot_mode_needs_a_trained_workdir(tmp_path):
  config = vit_digits.get_config()
  config.data_dir = str(tmp_path / "data")
  with pytest.raises(ValueError, match=r"--workdir .* holds no checkpoint; --mode fewshot "
                                       r"evaluates a trained run"):
    run.prepare(config, str(tmp_path / "untrained"), "fewshot")
  assert not (tmp_path / "untrained").exists()
  config.fewshot_shots = (0,)
  with pytest.raises(ValueError, match=r"config.fewshot_shots=\(0,\) must be"):
    run.prepare(config, str(tmp_path / "untrained"), "fewshot")


def _run(workdir, data_dir, *extra):
  command = [sys.executable, os.path.join(ROOT, "run.py"), f"--workdir={workdir}",
             f"--config.data_dir={data_dir}", "--config.model.width=32",
             "--config.model.depth=1", "--config.model.mlp_dim=64", "--config.model.num_heads=2",
             "--config.total_steps=30", "--config.optimizer.warmup_steps=5",
             "--config.log_every=10", "--config.eval_every=0", "--config.checkpoint_every=0",
             *extra]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2")
  return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_fewshot_mode_on_a_trained_digits_workdir(tmp_path):
  workdir, data_dir = tmp_path / "vit", tmp_path / "data"
  trained = _run(workdir, data_dir)
  assert trained.returncode == 0, trained.stdout + trained.stderr
  checkpoints = sorted(os.listdir(workdir / "checkpoints"))

  result = _run(workdir, data_dir, "--mode=fewshot")
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("shots"))
  table = lines[header + 1:header + 5]
  assert [int(line.split()[0]) for line in table] == [1, 5, 10, 25]
  assert all("±" in line for line in table)
  report = json.load(open(workdir / "fewshot.json"))
  assert report["step"] == 30 and report["l2"] == 1024.0 and report["seeds"] == [0, 1, 2]
  assert report["train_examples"] == 1442 and report["eval_examples"] == 355
  assert report["feature_dim"] == 32  # classifier gap, no representation layer: the width
  rows = report["results"]
  assert [row["shots"] for row in rows] == [1, 5, 10, 25]
  for row in rows:
    assert len(row["accuracies"]) == 3 and 0 <= row["min"] <= row["mean"] <= row["max"] <= 1
    assert row["mean"] == pytest.approx(np.mean(row["accuracies"]))
    assert f"{row['mean']:.4f} ± {row['std']:.4f}" in "\n".join(table)
  assert rows[-1]["mean"] > 0.3  # 25 shots of 10 classes after 30 steps; chance is 0.1
  assert sorted(os.listdir(workdir / "checkpoints")) == checkpoints  # only read

  too_many = _run(workdir, data_dir, "--mode=fewshot", "--config.fewshot_shots=(1,500)")
  assert too_many.returncode == 2
  assert too_many.stderr.strip().splitlines()[-1].startswith(
      "error: config.fewshot_shots asks for 500 training examples per class but class")


def test_the_loop_runs_the_fewshot_evaluation_with_every_evaluation(tmp_path):
  import json  # pylint: disable=g-import-not-at-top,reimported
  import run as run_lib  # pylint: disable=g-import-not-at-top
  from configs import vit_digits  # pylint: disable=g-import-not-at-top,reimported
  config = vit_digits.get_config()
  config.update(total_steps=4, log_every=2, eval_every=2, data_dir=str(tmp_path / "data"),
                fewshot_in_eval=True, fewshot_shots=(1, 5), fewshot_seeds=1)
  config.optimizer.warmup_steps = 0
  config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  assert run_lib.dispatch(config, str(tmp_path / "w")) == 0
  records = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  evaluated = [r for r in records if "eval/accuracy" in r]
  assert [r["step"] for r in evaluated] == [2, 4]
  for record in evaluated:
    assert 0 <= record["eval/fewshot/1shot_accuracy"] <= 1
    assert 0 <= record["eval/fewshot/5shot_accuracy"] <= 1
