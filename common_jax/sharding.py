"""Mesh construction and logical-axis sharding.

The mesh has three named axes: `data` (batch split, parameters replicated), `fsdp` (batch split,
parameters sharded along `embed`) and `tensor` (heads/MLP split). Their sizes come from the
config; -1 means "the devices left over". Parameters and activations carry logical axis names;
`rules` maps each logical name to mesh axes, so changing parallelism is a config change.
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Parameters and activations have names of their own, so a rule
# changed for one never moves the other. Flax uses the first rule whose mesh axes are still
# free for the array.
DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    # Parameters: `embed` sharded over fsdp (ZeRO-3 style), the wide axes over tensor.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("classes", None),
    # The leading axis of scanned blocks' stacked parameters (scan_layers=True): every device
    # holds every layer's share; the other axes follow their own rules.
    ("layers", None),
    # Activations: the batch over data x fsdp, features whole except where tensor splits them.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; exactly one may be -1 (the remaining devices)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


def mesh_shape(config: MeshConfig, num_devices: int) -> Tuple[int, int, int]:
  """Resolves -1 and checks that the axis sizes multiply to the device count."""
  sizes = [config.data, config.fsdp, config.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh has more than one axis set to -1 ({config}); set at most one.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh sizes must be positive or -1, got {config}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {config} cannot fill {num_devices} devices: "
                       f"{num_devices} is not divisible by {known}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {config} needs {math.prod(sizes)} devices but "
                     f"{num_devices} are present; make the sizes multiply to {num_devices} "
                     "or set one of them to -1.")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh over all (or the given) devices with axes `MESH_AXES` in Auto sharding mode."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(config, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, ValueError, NotImplementedError):
    # Topology-aware placement is unavailable for some device kinds (e.g. CPU); fall back to
    # the plain order, which is what it would give there anyway.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch array: leading axis split over data x fsdp."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[Tuple[str, Any]]) -> Any:
  """NamedShardings for a (boxed, possibly abstract) tree; unannotated leaves are replicated."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def global_batch(local_batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Assembles this process's rows into global arrays sharded over data x fsdp."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "config.batch_size") -> None:
  """Raises if the global batch cannot be split evenly over the data-parallel devices."""
  ways = data_parallel_size(mesh)
  if global_batch_size <= 0 or global_batch_size % ways:
    raise ValueError(
        f"{field}={global_batch_size} is not divisible by the {ways} data-parallel devices "
        f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple "
        f"of {ways}.")
  if global_batch_size % jax.process_count():
    raise ValueError(f"{field}={global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes; use a multiple of {jax.process_count()}.")
