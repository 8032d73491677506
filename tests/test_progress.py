"""The progress report: rates, MFU, and batches sent to the devices ahead of their step."""

import jax
import numpy as np
import pytest

from common_jax import metrics
from common_jax import mfu
from common_jax import sharding
from common_jax import train


def test_mfu_is_model_flops_per_device_over_the_peak(monkeypatch):
  clock = iter([10.0, 12.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  progress = metrics.Progress(100, 32, flops_per_example=1e9, num_devices=4,
                              peak_per_device=8e10)
  progress.reset(10)
  rates = progress.rates(20)  # 10 steps of 32 examples in 2 s
  assert rates["steps_per_sec"] == pytest.approx(5.0)
  assert rates["examples_per_sec"] == pytest.approx(160.0)
  assert rates["flops_per_sec_per_device"] == pytest.approx(160.0 * 1e9 / 4)
  assert rates["mfu"] == pytest.approx(4e10 / 8e10)
  line = progress.line(20, {"loss": 1.5}, rates)
  assert line == ("step 20/100 | loss 1.5 | 5.00 steps/s | 160 ex/s | 40 GFLOP/s/device | "
                  "MFU 50.0% | ETA 0m16s")


def test_without_flops_no_mfu():
  progress = metrics.Progress(10, 8)
  progress.reset(0)
  rates = progress.rates(5)
  assert set(rates) == {"steps_per_sec", "examples_per_sec"}
  assert "MFU" not in progress.line(5, {}, rates)


def test_known_devices_have_a_peak_others_are_measured():
  class Device:  # pylint: disable=too-few-public-methods
    device_kind = "NVIDIA H100 80GB HBM3"
  peak, source = mfu.device_peak(Device())
  assert peak == 989e12 and "H100" in source
  rate, source = mfu.device_peak(jax.devices()[0])
  assert rate == mfu.measured_matmul_rate() > 0 and "measured fp32 matmul rate" in source


def test_batches_go_to_the_devices_ahead_of_their_step():
  mesh = sharding.make_mesh(sharding.MeshConfig())
  read = []

  def local_batches():
    for index in range(5):
      read.append(index)
      yield {"image": np.full((8, 2), index, np.float32)}

  batches = train.on_device(local_batches(), mesh, ahead=2)
  first = next(batches)
  assert read == [0, 1, 2]  # two more already sent while step 0 runs
  assert isinstance(first["image"], jax.Array) and first["image"].shape == (8, 2)
  rest = [int(batch["image"][0, 0]) for batch in batches]
  assert [int(first["image"][0, 0])] + rest == [0, 1, 2, 3, 4]
