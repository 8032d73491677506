"""The config a resumed run is compared with (`common_jax.workdir.check_resumed_config`)."""

import json
import os

import pytest

from common_jax import workdir
from common_jax.errors import ConfigError

OLD = {"seed": 0, "total_steps": 100, "log_every": 10,
       "model": {"variant": "Ti/4", "remat_policy": "none"},
       "optimizer": {"learning_rate": 0.001}}


def _resume(tmp_path, new, *, allow=False):
  (tmp_path / "config.json").write_text(json.dumps(OLD))
  said = []
  workdir.check_resumed_config(str(tmp_path), json.dumps(new), 50, allow=allow, say=said.append)
  return said


def _with(**changes):
  new = json.loads(json.dumps(OLD))
  for dotted, value in changes.items():
    *parents, leaf = dotted.split("__")
    node = new
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return new


def test_fields_that_do_not_change_the_computation_are_free(tmp_path):
  assert not _resume(tmp_path, _with(log_every=1, model__remat_policy="full"))


def test_a_change_is_refused_naming_the_field(tmp_path):
  with pytest.raises(ConfigError, match=r"optimizer\.learning_rate \(0\.001 -> 0\.01\).*"
                                        r"allow_config_change=true"):
    _resume(tmp_path, _with(optimizer__learning_rate=0.01))


def test_allowed_change_keeps_the_old_config(tmp_path):
  said = _resume(tmp_path, _with(seed=3), allow=True)
  assert "changed seed" in said[-1]
  assert json.load(open(tmp_path / "config-50.json")) == OLD
  assert json.load(open(tmp_path / "config.json"))["seed"] == 3


def test_total_steps_may_grow_but_not_shrink(tmp_path):
  said = _resume(tmp_path, _with(total_steps=200))
  assert "total_steps grows from 100 to 200" in said[0]
  with pytest.raises(ConfigError, match=r"total_steps \(100 -> 80\)"):
    _resume(tmp_path, _with(total_steps=80))


def test_a_field_only_one_config_has_is_not_a_change(tmp_path):
  """A workdir started before a field existed (or after one was removed) resumes."""
  new = _with()
  new["model"]["scan_layers"] = False
  del new["log_every"]
  assert not _resume(tmp_path, new)
  assert not os.path.exists(tmp_path / "config-50.json")
