"""Model-FLOPs utilisation: a step's FLOPs (XLA's cost analysis of the lowered step, `step_flops`)
per second, against the peak of the devices that ran it.

Peaks are dense bfloat16 matrix-multiply rates per device (chip) from the vendors' data sheets;
on a CPU, or any device not listed, the peak is the float32 matmul rate measured once on this
machine (`measured_matmul_rate`), and the report says so.
"""

import functools
import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

# device_kind substring (lower case) -> dense bf16 FLOP/s per device.
PEAK_FLOPS = (
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
    ("h200", 989e12),  # SXM, dense
    ("h100", 989e12),  # SXM, dense (PCIe: 756e12)
    ("a100", 312e12),
)


@functools.lru_cache(maxsize=None)
def measured_matmul_rate(size: int = 1024, repeats: int = 10) -> float:
  """FLOP/s of a float32 [size, size] @ [size, size] matmul on the first device (best of a few)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    began = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - began)
  return 2.0 * size**3 / best


def device_peak(device: Optional[jax.Device] = None) -> Tuple[float, str]:
  """(peak FLOP/s of one device, where that number comes from)."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak, f"{device.device_kind} bf16 peak {peak / 1e12:.0f} TFLOP/s"
  rate = measured_matmul_rate()
  return rate, (f"{device.device_kind}: this machine's measured fp32 matmul rate "
                f"{rate / 1e9:.1f} GFLOP/s")


def _flops(cost) -> Optional[float]:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def step_flops(lowered, compiled=None, num_devices: int = 1) -> Optional[float]:
  """FLOPs of one call of a lowered (`jax.jit(f).lower(...)`) function, all devices together;
  None when XLA gives no count.

  The count is XLA's cost analysis of the program as lowered, before the backend's passes: a
  compiled GPU program has its matrix products rewritten into library calls (cuBLAS, cuDNN) that
  the analysis does not count, and a compiled partitioned program counts one device's share.
  Backends loaded as plugins (GPU, TPU) give no count for a lowered program; there, with
  `compiled` (the same program compiled, partitioned over `num_devices`), a TPU's compiled count
  times `num_devices` stands in, and a GPU gives None.
  """
  flops = _flops(lowered.cost_analysis())
  if flops is None and compiled is not None and jax.default_backend() not in ("gpu", "cuda"):
    per_device = _flops(compiled.cost_analysis())
    flops = per_device * num_devices if per_device is not None else None
  return flops


def utilisation(flops_per_step: float, steps_per_second: float, num_devices: int,
                peak_per_device: float) -> float:
  """MFU: achieved FLOP/s over the devices' peak FLOP/s."""
  return flops_per_step * steps_per_second / (num_devices * peak_per_device)
