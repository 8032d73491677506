"""`--mode plan`: what a run will cost, from shapes alone, for the mesh it names.

The train step is traced and compiled for abstract inputs (`jax.ShapeDtypeStruct`s carrying the
run's shardings): nothing is allocated and no data is read, so a ViT-H/14 over 8 simulated
devices plans on a laptop. Reported, per device where it matters:
  - parameters and optimiser state, in bytes per device (from their shardings);
  - the compiled step's temporaries (XLA's memory analysis), and whether the total fits the
    device memory (config.device_memory_gb, else what the device reports);
  - training FLOPs per step and per example, from XLA's cost analysis and from the usual
    6 * N * T formula plus attention (12 * layers * T^2 * width), side by side.
"""

import dataclasses
import math
from typing import Any, Dict, Optional

import jax
import numpy as np

from common_jax import mfu
from common_jax import train


@dataclasses.dataclass
class PlanReport:
  parameters: int
  param_bytes_per_device: int
  opt_bytes_per_device: int
  param_bytes_total: int
  opt_bytes_total: int
  temp_bytes_per_device: Optional[int]
  xla_flops_per_step: Optional[float]  # all devices together
  formula_flops_per_example: Optional[float]
  batch_size: int
  devices: int
  device_memory_bytes: Optional[int]
  has_loops: bool = False  # the step loops over layers or microbatches: XLA counts one iteration

  @property
  def bytes_per_device(self) -> int:
    return (self.param_bytes_per_device + self.opt_bytes_per_device +
            (self.temp_bytes_per_device or 0))

  @property
  def fits(self) -> Optional[bool]:
    if not self.device_memory_bytes:
      return None
    return self.bytes_per_device <= self.device_memory_bytes


def _bytes(tree: Any, shardings: Any) -> tuple:
  """(bytes on one device, bytes in all) of an abstract tree under its shardings."""
  per_device = total = 0
  for leaf, sharding in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    itemsize = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * itemsize
    per_device += math.prod(sharding.shard_shape(leaf.shape)) * itemsize
  return per_device, total


def device_memory(configured_gb: float) -> Optional[int]:
  """config.device_memory_gb in bytes, else what the first device reports (None on CPU)."""
  if configured_gb:
    return int(configured_gb * 2**30)
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def lower_step(trainer: train.Trainer, batch_size: int):
  """(lowered `trainer.train_step` for a global batch of `batch_size`, the abstract state):
  shapes only, nothing allocated."""
  with trainer.context():
    state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
    batch = {key: jax.ShapeDtypeStruct((batch_size,) + value.shape[1:], value.dtype,
                                       sharding=trainer._batch_sharding)  # pylint: disable=protected-access
             for key, value in trainer.task.dummy_batch(1).items()}
    state = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        state, trainer.state_shardings)
    return trainer.train_step.lower(state, batch), state


def plan_step(trainer: train.Trainer, batch_size: int,
              formula_flops_per_example: Optional[float],
              device_memory_gb: float = 0.0) -> PlanReport:
  """Compiles `trainer.train_step` for a global batch of `batch_size` (shapes only)."""
  lowered, state = lower_step(trainer, batch_size)
  with trainer.context():
    compiled = lowered.compile()
  param_device, param_total = _bytes(state.params, trainer.state_shardings.params)
  opt_device, opt_total = _bytes(state.opt_state, trainer.state_shardings.opt_state)
  memory = compiled.memory_analysis()
  temp = int(memory.temp_size_in_bytes) if memory is not None else None
  flops = mfu.step_flops(lowered, compiled, trainer.mesh.size)
  return PlanReport(
      parameters=sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(state.params)),
      param_bytes_per_device=param_device, opt_bytes_per_device=opt_device,
      param_bytes_total=param_total, opt_bytes_total=opt_total, temp_bytes_per_device=temp,
      xla_flops_per_step=flops, formula_flops_per_example=formula_flops_per_example,
      batch_size=batch_size, devices=trainer.mesh.size,
      device_memory_bytes=device_memory(device_memory_gb),
      # XLA's cost analysis counts a loop's body once.
      has_loops=trainer.accum_steps > 1 or bool(getattr(trainer.model, "scan_layers", False)))


def transformer_flops_per_example(params: int, tokens: int, layers: int, width: int) -> float:
  """Training FLOPs of one example: 6 * N * T (N: the parameters used per token, T: tokens)
  plus attention's scores and weighted sums, 12 * layers * T^2 * width (forward 4, backward 8)."""
  return 6.0 * params * tokens + 12.0 * layers * tokens**2 * width


def _gib(n: Optional[float]) -> str:
  if n is None:
    return "?"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(report: PlanReport) -> str:
  """The lines `--mode plan` prints after its summary line."""
  per_example = (report.xla_flops_per_step / report.batch_size
                 if report.xla_flops_per_step else None)
  formula = report.formula_flops_per_example
  lines = [
      f"  per device ({report.devices} devices): parameters "
      f"{_gib(report.param_bytes_per_device)} (of {_gib(report.param_bytes_total)}), optimiser "
      f"state {_gib(report.opt_bytes_per_device)} (of {_gib(report.opt_bytes_total)}), step "
      f"temporaries {_gib(report.temp_bytes_per_device)}; total "
      f"{_gib(report.bytes_per_device)}" + (
          "" if report.fits is None else
          f" -> {'fits' if report.fits else 'DOES NOT FIT'} in "
          f"{_gib(report.device_memory_bytes)}"),
      "  training FLOPs per example: "
      + (f"{per_example:.3e} (XLA cost analysis)" if per_example else "? (XLA gave none)")
      + (f", {formula:.3e} (6*N*T + attention)" if formula else "")
      + (f"; per step {report.xla_flops_per_step:.3e}" if report.xla_flops_per_step else "")
      + ("; the step loops (scan_layers or accum_steps), and XLA counts a loop's body once, so "
         "its figure is too low: the formula's holds" if report.has_loops and per_example
         else ""),
  ]
  return "\n".join(lines)


def as_dict(report: PlanReport) -> Dict[str, Any]:
  return dict(dataclasses.asdict(report), bytes_per_device=report.bytes_per_device,
              fits=report.fits)
