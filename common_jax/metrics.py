"""Metrics to `<workdir>/metrics.jsonl`, TensorBoard, and a one-line console progress report."""

import itertools
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

import jax

from common_jax import weights


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


_WRITER_NUMBERS = itertools.count()


class MetricWriter:
  """Writes scalars; only process 0 writes files, every process may print.

  A run resumed at step N redoes what came after N, so the records of those steps are dropped
  first (`metrics.jsonl` rewritten atomically, TensorBoard told to purge them), and a record
  already logged at step N with the same keys (the final evaluation, redone) is not repeated:
  every logged step appears once.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, stream=None,
               start_step: int = 0):
    """start_step: the step the run starts from (the restored step; 0 for a fresh run)."""
    self._is_lead = jax.process_index() == 0
    self._stream = stream or sys.stdout
    self._jsonl = None
    self._tb = None
    self._logged_at_start: List[frozenset] = []  # key sets of the records kept at start_step
    if self._is_lead:
      path = os.path.join(workdir, "metrics.jsonl")
      self._logged_at_start = _drop_records_after(path, start_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      if tensorboard:
        SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
        logdir = os.path.join(workdir, "tensorboard")
        # Events after start_step were written by the run that was interrupted: hidden. The
        # suffix keeps two writers of the same second (its file name) from overwriting each other.
        self._tb = SummaryWriter(
            logdir, purge_step=start_step + 1 if os.path.isdir(logdir) else None,
            filename_suffix=f".{os.getpid()}.{next(_WRITER_NUMBERS)}")
    self._start_step = start_step

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self._is_lead:
      return
    if step == self._start_step and frozenset(scalars) in self._logged_at_start:
      return  # logged before the interruption; the values are the same
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))

  def flush(self) -> None:
    """Puts buffered TensorBoard events on disk (done with every checkpoint, so that what a
    checkpoint holds is in TensorBoard even if the process is killed after it)."""
    if self._tb is not None:
      self._tb.flush()

  def print(self, message: str) -> None:
    say(message, self._stream)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it
  is installed (1.3 s of every start-up here) only to accept torch tensors, and we log floats."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]  # a later `import torch` imports it as usual
  return SummaryWriter


def say(message: str, stream=None) -> None:
  """Prints one line on process 0 only."""
  if jax.process_index() == 0:
    print(message, file=stream or sys.stdout, flush=True)


def _drop_records_after(path: str, step: int) -> List[frozenset]:
  """Rewrites `path` (atomically) without the records of steps after `step` and without a line
  cut short by a kill; returns the key sets of the records kept at `step`."""
  if not os.path.exists(path):
    return []
  kept, dropped = [], False
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
        keep = isinstance(record, dict) and int(record["step"]) <= step and line.endswith("\n")
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append((record, line))
      dropped = dropped or not keep
  if dropped:
    weights.write_text(path, "".join(line for _, line in kept))
  return [frozenset(record) - {"step"} for record, _ in kept if int(record["step"]) == step]


class Progress:
  """Rate, ETA and MFU over the steps since the last report (compilation excluded by resetting).

  With `flops_per_example` (model FLOPs) and the devices' peak, each report also carries the
  FLOP/s per device and the MFU: FLOP/s per device over the peak of one device.
  """

  def __init__(self, total_steps: int, global_batch_size: int, *,
               flops_per_example: Optional[float] = None, num_devices: int = 1,
               peak_per_device: Optional[float] = None):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.flops_per_example = flops_per_example
    self.num_devices = num_devices
    self.peak_per_device = peak_per_device
    self._mark_time: Optional[float] = None
    self._mark_step = 0

  def reset(self, step: int) -> None:
    self._mark_time, self._mark_step = time.perf_counter(), step

  def rates(self, step: int) -> Dict[str, float]:
    now = time.perf_counter()
    if self._mark_time is None or step <= self._mark_step:
      return {}
    steps_per_sec = (step - self._mark_step) / max(now - self._mark_time, 1e-9)
    self._mark_time, self._mark_step = now, step
    rates = {"steps_per_sec": steps_per_sec,
             "examples_per_sec": steps_per_sec * self.global_batch_size}
    if self.flops_per_example and self.peak_per_device:
      per_device = rates["examples_per_sec"] * self.flops_per_example / self.num_devices
      rates.update(flops_per_sec_per_device=per_device, mfu=per_device / self.peak_per_device)
    return rates

  def line(self, step: int, scalars: Dict[str, float], rates: Dict[str, float]) -> str:
    parts = [f"step {step}/{self.total_steps}"]
    parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
    if rates:
      eta = (self.total_steps - step) / rates["steps_per_sec"]
      parts += [f"{rates['steps_per_sec']:.2f} steps/s", f"{rates['examples_per_sec']:.0f} ex/s"]
      if "mfu" in rates:
        parts += [f"{_si(rates['flops_per_sec_per_device'])}FLOP/s/device",
                  f"MFU {100 * rates['mfu']:.1f}%"]
      parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


def _si(value: float) -> str:
  """12.3e9 -> '12.3 G'."""
  for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if value >= factor:
      return f"{value / factor:.3g} {prefix}"
  return f"{value:.3g} "
