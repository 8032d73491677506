"""The ViT family: its task, the config fields it reads, its checks, pretrained weights (an
official .npz, a timm .safetensors or another run's workdir in `config.init_from`) and the
export mode (`--format npz` in the official layout, `--format safetensors` with timm names)."""

import dataclasses
from typing import Any, Dict, Optional

import vit_jax
import math

from common_jax import family
from common_jax import plan
from common_jax import trees
from common_jax import weights
from vit_jax import tasks


@dataclasses.dataclass(frozen=True)
class Settings:
  """Top-level config fields only ViT tasks read."""
  label_smoothing: float  # training targets only; evaluation uses the hard labels


def _classification(run: family.Run) -> tasks.ClassificationTask:
  return tasks.ClassificationTask(
      variant=run.variant, num_classes=run.num_classes, image_size=run.image_size,
      model_options=run.model, label_smoothing=run.settings.label_smoothing)


class VitFamily(family.Family):
  """Supervised ViT classification (pre-training and fine-tuning)."""

  name = "ViT"
  tasks = {"vit_classification": _classification}
  settings = Settings
  export_formats = ("npz", "safetensors")

  def model_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
    options = super().model_options(options)
    if "representation_size" in options:
      options["representation_size"] = options["representation_size"] or None
    return options

  def flops_per_example(self, run: family.Run) -> Optional[float]:
    """6 * N * T + attention, N without the position embedding, class token and head (looked
    up, not multiplied per token), T the tokens (patches, plus the class token)."""
    if run.task not in ("vit_classification",):  # a task added from outside: no formula
      return None
    model = self.model(run)
    flat = trees.flat_shapes(self.abstract_params(run))
    per_token = sum(math.prod(shape) for key, shape in flat.items()
                    if not key.startswith(("cls", "head/")) and "pos_embedding" not in key)
    tokens = (run.image_size // model.patch_size)**2 + (model.classifier == "token")
    return plan.transformer_flops_per_example(per_token, tokens, model.depth, model.width)

  def initializer(self, run: family.Run):
    if not run.init_from:
      return None
    # Names and shapes are checked against the file or workdir now; arrays are read later.
    return vit_jax.pretrained_initializer(run.init_from, self.model(run))

  def export_checkpoint(self, run: family.Run, output: str, export_format: str) -> str:
    return vit_jax.export_from_checkpoint(run.workdir, self.model(run), output,
                                          export_format)

  def is_export(self, path: str, export_format: str) -> bool:
    """An npz in the official layout, or safetensors with timm's names."""
    read, name = {"npz": (weights.read_npz, "embedding/kernel"),
                  "safetensors": (lambda p: weights.read_safetensors([p]),
                                  "patch_embed.proj.weight")}[export_format]
    try:
      with read(path) as tensors:
        return name in tensors.shapes
    except (ValueError, OSError):
      return False


FAMILY = VitFamily()
