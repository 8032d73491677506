"""Serving exports: a trained model's inference function as StableHLO, weights included.

    python run.py --config configs/vit_digits.py --mode export --format stablehlo \
        --output vit_serving/

writes a directory of two files:

    model.stablehlo  `jax.export.Exported.serialize()` of the jitted inference function, with the
                     parameters baked in as constants and a symbolic batch dimension
    spec.json        its input and output (name, shape with "batch" for the symbolic dimension,
                     dtype, what the values mean), the run it came from and the jax version

which any JAX of a compatible calling convention runs without this library or the checkpoint:

    exported = jax.export.deserialize(open("vit_serving/model.stablehlo", "rb").read())
    logits = exported.call(images)  # any batch size

The weights are constants rather than a second argument so that the file alone is the model:
nothing to keep in step with it, no parameter tree to rebuild. The price is size (about 4 bytes
per float32 parameter, ViT-B/16 ~350 MB) and a ceiling: jax.export serializes with flatbuffers,
which hold at most 2 GiB, so larger models are refused (`check_size`). The function is lowered
for CPU, CUDA GPUs and TPUs at once, with XLA's attention (`portable`).
"""

import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, Optional, Tuple, Union

import jax
import numpy as np

from common_jax import weights

FORMAT = "stablehlo"
MODEL_FILE = "model.stablehlo"
SPEC_FILE = "spec.json"
BATCH = "batch"  # the symbolic dimension's name, in shapes and in spec.json
PLATFORMS = ("cpu", "cuda", "tpu")
# flatbuffers (jax.export's serialization) hold at most 2**31 bytes; 128 MiB are left for the
# program itself and the metadata.
MAX_PARAMETER_BYTES = 2**31 - 2**27


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One input or output of the exported function, as recorded in spec.json."""
  name: str
  shape: Tuple[Union[int, str], ...]  # BATCH marks the symbolic batch dimension
  dtype: str  # numpy name: "float32", "int32"
  note: str  # what the values are (range, palette, ...)


def portable(model: Any) -> Any:
  """`model` with XLA's attention: a cuDNN kernel lowers for NVIDIA GPUs only, and the export is
  lowered for every platform of PLATFORMS (the computed values are the same)."""
  if getattr(model, "attention_implementation", None) is None:
    return model
  return model.clone(attention_implementation="xla")


def parameter_bytes(params: Any) -> int:
  """Bytes of a parameter tree (arrays or jax.ShapeDtypeStruct)."""
  return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
             for leaf in jax.tree_util.tree_leaves(params))


def check_size(params: Any, what: str) -> None:
  """Raises for parameters too large to be baked into one artifact (arrays or shapes)."""
  size = parameter_bytes(params)
  if size > MAX_PARAMETER_BYTES:
    raise ValueError(
        f"{what} has {size / 2**30:.2f} GiB of parameters, more than the "
        f"{MAX_PARAMETER_BYTES / 2**30:.3g} GiB that a jax.export artifact with its weights baked "
        "in can hold (flatbuffers' 2 GiB limit), so it cannot be exported with --format "
        "stablehlo; export its weights in another --format instead.")


def export(apply: Callable[[Any, jax.Array], jax.Array], params: Any, inputs: TensorSpec,
           outputs: TensorSpec, directory: str, *, about: Dict[str, Any],
           overwrite: bool = False) -> str:
  """Writes `x -> apply(params, x)` as <directory>/model.stablehlo and its spec.json.

  Args:
    apply: (params, x) -> y, jittable; x of `inputs`' shape and dtype, y of `outputs`'.
    params: the parameter tree (numpy or jax arrays), baked into the artifact as constants.
    inputs, outputs: the one input and output; BATCH in `inputs.shape` becomes symbolic.
    directory: destination, written atomically (`common_jax.weights.write_directory`); a
      non-empty directory is replaced only with `overwrite`.
    about: what spec.json records besides the tensors (the run, step, palette, ...).

  Returns:
    The absolute directory path.
  """
  try:
    import flatbuffers  # pylint: disable=g-import-not-at-top,unused-import  # jax.export's
  except ImportError:
    raise ValueError("--format stablehlo serializes through the flatbuffers package, which is "
                     "not installed; pip install flatbuffers.") from None
  check_size(params, "the model")
  batch, = jax.export.symbolic_shape(BATCH)
  shape = tuple(batch if dim == BATCH else dim for dim in inputs.shape)
  exported = jax.export.export(jax.jit(lambda x: apply(params, x)), platforms=PLATFORMS)(
      jax.ShapeDtypeStruct(shape, np.dtype(inputs.dtype)))
  (result,) = exported.out_avals
  expected = tuple(batch if dim == BATCH else dim for dim in outputs.shape)
  if result.shape != expected or result.dtype != np.dtype(outputs.dtype):
    raise ValueError(f"the exported function gives {outputs.name} of shape {result.shape} and "
                     f"dtype {result.dtype}, not the {outputs.shape} {outputs.dtype} its spec "
                     "says; fix the spec.")
  data = exported.serialize()
  spec = {
      "format": FORMAT, "file": MODEL_FILE,
      "inputs": [dataclasses.asdict(inputs)], "outputs": [dataclasses.asdict(outputs)],
      **about,
      "parameters": sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)),
      "parameter_bytes": parameter_bytes(params), "file_bytes": len(data),
      "platforms": list(exported.platforms), "jax_version": jax.__version__,
      "calling_convention_version": exported.calling_convention_version,
      "usage": f"jax.export.deserialize(open('{MODEL_FILE}', 'rb').read()).call("
               f"{inputs.name})"}
  text = json.dumps(spec, indent=2, default=_json_value)

  def write(temporary: str) -> None:
    with open(os.path.join(temporary, MODEL_FILE), "wb") as f:
      f.write(data)
    with open(os.path.join(temporary, SPEC_FILE), "w", encoding="utf-8") as f:
      f.write(text)

  return weights.write_directory(directory, write, overwrite=overwrite)


def read_spec(directory: str) -> Optional[Dict[str, Any]]:
  """spec.json of a serving export, or None where `directory` is not one."""
  try:
    with open(os.path.join(directory, SPEC_FILE), encoding="utf-8") as f:
      spec = json.load(f)
  except (OSError, ValueError):
    return None
  if not (isinstance(spec, dict) and spec.get("format") == FORMAT
          and os.path.isfile(os.path.join(directory, MODEL_FILE))):
    return None
  return spec


def is_export(directory: str, family: str) -> bool:
  """Whether `directory` is a serving export of a model of `family` ("ViT", "iGPT")."""
  spec = read_spec(directory)
  return spec is not None and spec.get("family") == family


def load(directory: str) -> Tuple[jax.export.Exported, Dict[str, Any]]:
  """(the exported function, its spec) of a serving export; `.call(x)` runs it."""
  spec = read_spec(directory)
  if spec is None:
    raise ValueError(f"{directory} holds no {MODEL_FILE} and {SPEC_FILE} of a serving export; "
                     "point at the --output of run.py --mode export --format stablehlo.")
  with open(os.path.join(directory, MODEL_FILE), "rb") as f:
    return jax.export.deserialize(bytearray(f.read())), spec


def describe_run(run: Any, step: int, family: str) -> Dict[str, Any]:
  """What spec.json records about the run (`common_jax.family.Run`) an export came from."""
  return {"family": family, "task": run.task, "workdir": os.path.abspath(run.workdir),
          "step": int(step), "variant": run.variant, "image_size": run.image_size,
          "num_classes": run.num_classes, "model": dict(run.model)}


def _json_value(value: Any) -> Any:
  """dtypes (config.model's dtype, param_dtype) by name; anything else as its str."""
  try:
    return np.dtype(value).name
  except TypeError:
    return str(value)
