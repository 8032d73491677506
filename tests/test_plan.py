"""--mode plan: per-device memory and FLOPs of a run's step, from shapes, without its data."""

import pytest

import run
from configs import igpt_pretrain
from configs import vit_pretrain


def _fsdp(config, **overrides):
  config.mesh.data, config.mesh.fsdp = 1, -1
  config.update(overrides)
  if "image_size" in overrides:  # the recipe's strings crop to its own size (plan checks them)
    config.preprocess_train = config.preprocess_eval = (
        f"decode|resize({overrides['image_size']})|value_range(-1,1)")
  return config


@pytest.mark.parametrize("family_name, config", [
    ("vit", lambda: _fsdp(vit_pretrain.get_config("B/16,imagenet2012"), image_size=64,
                          batch_size=16)),
    ("igpt", lambda: _fsdp(igpt_pretrain.get_config("S,imagenet32"), image_size=16,
                           batch_size=16)),
])
def test_an_fsdp_plan_puts_an_eighth_of_the_state_on_each_device(family_name, config, tmp_path,
                                                                 capsys):
  config = config()
  config.model.depth = 2  # compile time; the property is per layer
  config.device_memory_gb = 0.001
  family, prepared = run.prepare(config, str(tmp_path / "workdir"), "plan")  # no data is read
  report, _ = family.plan_report(prepared)
  assert report.devices == 8
  for per_device, total in ((report.param_bytes_per_device, report.param_bytes_total),
                            (report.opt_bytes_per_device, report.opt_bytes_total)):
    assert abs(per_device - total / 8) <= 0.15 * total / 8, (family_name, per_device, total)
  assert report.temp_bytes_per_device > 0 and report.fits is False
  per_example = report.xla_flops_per_step / report.batch_size
  assert 0.8 < per_example / report.formula_flops_per_example < 1.25
  assert family.plan(prepared) == 0
  printed = capsys.readouterr().out
  assert "DOES NOT FIT" in printed and "(6*N*T + attention)" in printed
  assert not (tmp_path / "workdir").exists()


def test_a_scanned_model_plans_and_says_xla_counts_its_loop_once(tmp_path, capsys):
  reports = {}
  for scan in (False, True):
    config = _fsdp(vit_pretrain.get_config("B/16,imagenet2012"), image_size=32, batch_size=8)
    config.model.update(depth=4, width=64, mlp_dim=128, num_heads=4, scan_layers=scan)
    family, prepared = run.prepare(config, str(tmp_path / "workdir"), "plan")
    reports[scan], _ = family.plan_report(prepared)
  assert reports[True].has_loops and not reports[False].has_loops
  assert reports[True].formula_flops_per_example == reports[False].formula_flops_per_example
  # One of the four blocks counted: XLA's figure falls short of the unscanned one.
  assert reports[True].xla_flops_per_step < 0.8 * reports[False].xla_flops_per_step
  assert family.plan(prepared) == 0
  assert "XLA counts a loop's body once" in capsys.readouterr().out


def test_flops_where_a_lowered_program_has_no_count():
  """Plugin backends (GPU, TPU) give no count for a lowered program: a TPU's compiled,
  partitioned count times the devices stands in (checked here on the CPU backend), and neither
  count is made up when both are missing."""
  from common_jax import mfu  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  class Stage:
    def __init__(self, cost):
      self.cost = cost

    def cost_analysis(self):
      return self.cost

  assert mfu.step_flops(Stage({"flops": 10.0}), Stage({"flops": 3.0}), 8) == 10.0
  assert mfu.step_flops(Stage(None), Stage([{"flops": 3.0}]), 8) == 24.0
  assert mfu.step_flops(Stage(None), Stage({}), 8) is None
  assert mfu.step_flops(Stage(None)) is None
