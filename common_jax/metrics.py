"""Metrics to `<workdir>/metrics.jsonl`, TensorBoard, and a one-line console progress report."""

import json
import math
import os
import sys
import time
from typing import Dict, Optional

import jax


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class MetricWriter:
  """Writes scalars; only process 0 writes files, every process may print."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, stream=None):
    self._is_lead = jax.process_index() == 0
    self._stream = stream or sys.stdout
    self._jsonl = None
    self._tb = None
    if self._is_lead:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self._is_lead:
      return
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))

  def print(self, message: str) -> None:
    if self._is_lead:
      print(message, file=self._stream, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Rate and ETA over the steps since the last report (compilation excluded by resetting)."""

  def __init__(self, total_steps: int, global_batch_size: int):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
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
    return {"steps_per_sec": steps_per_sec,
            "examples_per_sec": steps_per_sec * self.global_batch_size}

  def line(self, step: int, scalars: Dict[str, float], rates: Dict[str, float]) -> str:
    parts = [f"step {step}/{self.total_steps}"]
    parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
    if rates:
      eta = (self.total_steps - step) / rates["steps_per_sec"]
      parts += [f"{rates['steps_per_sec']:.2f} steps/s",
                f"{rates['examples_per_sec']:.0f} ex/s", f"ETA {format_duration(eta)}"]
    return " | ".join(parts)
