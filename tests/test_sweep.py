"""--mode sweep: one run per config.sweep entry, a table of their results, bad entries refused."""

import json
import re

import pytest

import run
from common_jax import sweep
from common_jax.errors import ConfigError
from configs import vit_digits_ablation

LOOP = ("total_steps", "seed")


def test_entries_parse_into_names_and_typed_overrides():
  parsed = sweep.parse(["a: model.posemb=learn2d, optimizer.learning_rate=1e-3",
                        "b: total_steps=20"], LOOP)
  assert parsed == [("a", {"model.posemb": "learn2d", "optimizer.learning_rate": 1e-3}),
                    ("b", {"total_steps": 20})]


@pytest.mark.parametrize("entries, message", [
    ((), "--mode sweep needs runs to make"),
    (("no colon",), "is not '<name>: <field>=<value>, ...'"),
    (("a: model.posemb=none", "a: model.posemb=learn"), "names 'a' twice"),
    (("a: learning_rate=1",), "config.optimizer.* as optimizer.<field>=..."),
])
def test_bad_entries_are_one_sentence(entries, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    sweep.parse(entries, LOOP)


def test_every_entry_is_checked_before_any_run(tmp_path, capsys):
  config = vit_digits_ablation.get_config("posemb")
  config.sweep = ("ok: model.posemb=learn", "bad: model.posemb=learn3d")
  assert run.dispatch(config, str(tmp_path / "w"), "sweep") == 2
  assert "posemb='learn3d' is unknown" in capsys.readouterr().err
  assert not (tmp_path / "w" / "ok" / "checkpoints").exists()


@pytest.mark.slow
def test_a_sweep_trains_each_entry_and_writes_the_table(tmp_path):
  config = vit_digits_ablation.get_config("classifier")
  config.update(data_dir=str(tmp_path / "data"), total_steps=6, log_every=3)
  config.optimizer.warmup_steps = 0
  config.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
  config.sweep = ("token: model.classifier=token", "gap_fast: optimizer.learning_rate=0.01")
  workdir = tmp_path / "sweep"
  assert run.dispatch(config, str(workdir), "sweep") == 0
  rows = json.load(open(workdir / "sweep.json"))
  assert [row["name"] for row in rows] == ["token", "gap_fast"]
  assert all(row["step"] == 6 and 0 <= row["accuracy"] <= 1 for row in rows)
  assert json.load(open(workdir / "token" / "config.json"))["model"]["classifier"] == "token"
  assert json.load(open(workdir / "gap_fast" / "config.json"))["optimizer"]["learning_rate"] == 0.01
  table = (workdir / "sweep.md").read_text()
  assert "| token | model.classifier=token |" in table and "| gap_fast |" in table
  # Run again: finished runs are not trained again (each resumes at its last step).
  assert run.dispatch(config, str(workdir), "sweep") == 0
  again = json.load(open(workdir / "sweep.json"))
  assert [(r["step"], r["accuracy"]) for r in again] == [(r["step"], r["accuracy"]) for r in rows]
