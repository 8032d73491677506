"""Optimiser recipes of both papers, built with optax.

- Pre-training (ViT, iGPT): Adam with decoupled weight decay, linear warm-up, then linear or
  cosine decay; gradients clipped at global norm 1.
- Fine-tuning (ViT): SGD with momentum 0.9, clip at 1, warm-up + cosine.
Gradient accumulation lives in the train step (microbatches scanned inside one jit), not here.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common_jax import trees

OPTIMIZERS = ("adam", "sgd")
DECAYS = ("cosine", "linear", "constant")
MOMENT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimiser and learning-rate schedule; see the module docstring for the recipes."""
  name: str = "adam"
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  decay: str = "cosine"
  end_learning_rate: float = 0.0
  weight_decay: float = 0.0  # AdamW (optax): update -= lr(t) * weight_decay * param; kernels only
  b1: float = 0.9
  b2: float = 0.999
  momentum: float = 0.9
  grad_clip_norm: Optional[float] = 1.0
  # The dtype the first moment is kept in: Adam's mu (optax's `mu_dtype`), SGD's momentum trace
  # (optax's `accumulator_dtype`). "bfloat16" halves that buffer; each update is still computed
  # in the gradients' dtype and rounded when stored. optax has no such option for Adam's second
  # moment (nu): it is kept in the parameters' dtype, float32 with float32 master weights.
  moment_dtype: str = "float32"
  # Polyak averaging: the loop evaluates ema = decay * ema + (1 - decay) * params, updated after
  # every step and kept in the optimiser state (so checkpoints hold it); 0 = off.
  ema_decay: float = 0.0


class EmaState(NamedTuple):
  """The exponential moving average of the parameters (`polyak`)."""
  ema: Any


def polyak(decay: float) -> optax.GradientTransformation:
  """A transformation that leaves the updates as they are and keeps the moving average of the
  parameters they produce (the last of a chain, so that the updates are final)."""
  def init(params):
    return EmaState(ema=jax.tree_util.tree_map(jnp.array, params))

  def update(updates, state, params):
    new = optax.apply_updates(params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                                 state.ema, new)
    return updates, EmaState(ema=ema)

  return optax.GradientTransformation(init, update)


def polyak_params(opt_state: Any) -> Optional[Any]:
  """The moving average of the parameters in an optimiser state of `make_optimizer`, or None
  when config.optimizer.ema_decay is 0."""
  for part in opt_state if isinstance(opt_state, tuple) else ():
    if isinstance(part, EmaState):
      return part.ema
  return None


def check(config: OptimizerConfig, total_steps: int) -> None:
  """Raises one clear sentence for settings that cannot work."""
  if config.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={config.name!r} is unknown; use one of {OPTIMIZERS}.")
  if config.decay not in DECAYS:
    raise ValueError(f"config.optimizer.decay={config.decay!r} is unknown; use one of {DECAYS}.")
  if config.learning_rate <= 0:
    raise ValueError(f"config.optimizer.learning_rate={config.learning_rate} must be positive.")
  if not 0 <= config.warmup_steps <= total_steps:
    raise ValueError(f"config.optimizer.warmup_steps={config.warmup_steps} must lie in "
                     f"[0, total steps = {total_steps}].")
  if config.moment_dtype not in MOMENT_DTYPES:
    raise ValueError(f"config.optimizer.moment_dtype={config.moment_dtype!r} is unknown; use one "
                     f"of {', '.join(MOMENT_DTYPES)}.")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.optimizer.ema_decay={config.ema_decay} must lie in [0, 1) (0: no "
                     "moving average; e.g. 0.9999).")
  if config.weight_decay and config.name != "adam":
    raise ValueError("config.optimizer.weight_decay is only supported with name='adam'; "
                     "set it to 0 for sgd.")


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then decay to `end_learning_rate`."""
  decay_steps = max(total_steps - config.warmup_steps, 1)
  peak, end = config.learning_rate, config.end_learning_rate
  if config.decay == "cosine":
    alpha = end / peak
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha)
  elif config.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if not config.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def _kernels_only(params: Any) -> Any:
  # Decay matrices (kernels, embeddings), not biases, norms' scales or the class token. A block's
  # parameter stacked by scan_layers is judged by its per-block shape, so that both layouts
  # decay the same parameters.
  def decayed(path, p) -> bool:
    name = "/".join(str(getattr(key, "key", key)) for key in path)
    shape = p.shape[1:] if any(name.startswith(stack + "/")
                               for stack in trees.LAYER_STACKS) else p.shape
    return len(shape) > 1 and shape[-1] < int(np.prod(shape))

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """The optax transformation for `config` over `total_steps` optimiser updates."""
  check(config, total_steps)
  schedule = make_schedule(config, total_steps)
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  moment_dtype = MOMENT_DTYPES[config.moment_dtype]
  if config.name == "adam":
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, mu_dtype=moment_dtype,
                             weight_decay=config.weight_decay, mask=_kernels_only))
  else:
    parts.append(optax.sgd(schedule, momentum=config.momentum,
                           accumulator_dtype=moment_dtype))
  if config.ema_decay:
    parts.append(polyak(config.ema_decay))
  return optax.chain(*parts)
