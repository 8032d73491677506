"""The one train loop. A task (see `common_jax.task`) supplies the model and the loss; this module
does the mesh, the sharded state, the jitted step, data feeding, evaluation, metrics and
checkpoints. It imports no dataset code: data arrives through two factories of numpy batches.
"""

import collections
import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common_jax import checkpoint as checkpoint_lib
from common_jax import metrics as metrics_lib
from common_jax import mfu
from common_jax import optim
from common_jax import sharding as sharding_lib
from common_jax import stopping
from common_jax.stopping import NONFINITE_ACTIONS, TrainingDiverged  # pylint: disable=unused-import
from common_jax.task import Task

LocalBatch = Dict[str, np.ndarray]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2]: base key; step keys are fold_in(rng, step)



@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log, evaluate and checkpoint."""
  total_steps: int
  batch_size: int
  seed: int = 0
  accum_steps: int = 1
  log_every: int = 50
  eval_every: int = 500  # 0: only at the end
  checkpoint_every: int = 500  # 0: only at the end (and on SIGTERM/SIGINT)
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  # A non-finite loss or gradient norm: "stop" the run (TrainingDiverged), or "skip" the update
  # (counted; costs one more pass over parameters and optimiser state per step).
  on_nonfinite: str = "stop"


def check_loop(config: LoopConfig) -> None:
  """Raises one clear sentence for loop settings that cannot work."""
  if config.total_steps <= 0:
    raise ValueError(f"config.total_steps={config.total_steps} must be positive.")
  if config.accum_steps <= 0 or config.batch_size % config.accum_steps:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                     f"config.accum_steps={config.accum_steps}; use a multiple.")
  for name in ("log_every", "eval_every", "checkpoint_every"):
    if getattr(config, name) < 0:
      raise ValueError(f"config.{name} must be >= 0.")
  if config.keep_checkpoints < 1:
    raise ValueError(f"config.keep_checkpoints={config.keep_checkpoints} must be >= 1: the last "
                     "checkpoint is what a run resumes from and what it leaves behind.")
  if config.on_nonfinite not in NONFINITE_ACTIONS:
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r} is unknown; use one of "
                     f"{NONFINITE_ACTIONS}.")


# A non-finite step is noticed at the latest this many steps later when nothing else (a log, a
# checkpoint) reads the step's flags earlier.
CHECK_EVERY = 100


@dataclasses.dataclass
class Trainer:
  """Everything jitted and sharded for one task on one mesh (usable without the loop)."""
  task: Task
  mesh: jax.sharding.Mesh
  rules: Sequence[Tuple[str, Any]]
  tx: optax.GradientTransformation
  accum_steps: int = 1
  #: A step whose loss or gradient norm is not finite: "stop" (the loop raises
  #: TrainingDiverged) or "skip" (parameters and optimiser state stay as they were). Either way
  #: the step's "nonfinite" metric is 1.
  on_nonfinite: str = "stop"

  def __post_init__(self):
    self.model = self.task.model
    self._dummy = self.task.dummy_batch(1)
    with self.context():
      abstract = jax.eval_shape(self._init_boxed, jax.random.PRNGKey(0))
      self.state_shardings = sharding_lib.logical_shardings(abstract, self.mesh, self.rules)
    self._batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self._replicated = sharding_lib.replicated(self.mesh)
    self.init = jax.jit(lambda rng: nn.meta.unbox(self._init_boxed(rng)),
                        out_shardings=self.state_shardings)
    self.train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, self._batch_sharding),
        out_shardings=(self.state_shardings, self._replicated), donate_argnums=(0,))
    self.eval_step = jax.jit(
        self._eval_step, in_shardings=(self.state_shardings.params, self._batch_sharding),
        out_shardings=self._replicated)
    # Whether every parameter is finite: one pass over them, run where the loop checks.
    self.params_finite = jax.jit(stopping.all_finite, in_shardings=(self.state_shardings.params,),
                                 out_shardings=self._replicated)

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical-axis rules in scope, for tracing and calling the jitted functions."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
      yield

  def _init_boxed(self, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    batch = {k: jnp.asarray(v) for k, v in self._dummy.items()}
    variables = self.task.init_variables(init_rng, batch)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=state_rng)

  def _loss(self, params, batch, rng):
    return self.task.loss_and_metrics(params, batch, rng, True)

  def _gradients(self, state: TrainState, batch) -> Tuple[jax.Array, Dict[str, jax.Array], Any]:
    """(mean loss, metrics, gradients) of one global batch, over accum_steps microbatches."""
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    if self.accum_steps == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, rng)
      return loss, metrics, grads
    # Microbatch i takes rows i, i+k, i+2k, ...: each device keeps its own rows, no transfer.
    k = self.accum_steps
    micro = jax.tree_util.tree_map(
        lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch)

    def accumulate(carry, inputs):
      index, microbatch = inputs
      (loss, metrics), grads = grad_fn(state.params, microbatch, jax.random.fold_in(rng, index))
      return jax.tree_util.tree_map(jnp.add, carry, (loss, metrics, grads)), None

    zeros = jax.tree_util.tree_map(
        jnp.zeros_like, jax.eval_shape(grad_fn, state.params,
                                       jax.tree_util.tree_map(lambda x: x[0], micro), rng))
    zeros = (zeros[0][0], zeros[0][1], zeros[1])
    (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    return jax.tree_util.tree_map(lambda x: x / k, (loss, metrics, grads))

  def _train_step(self, state: TrainState, batch) -> Tuple[TrainState, Dict[str, jax.Array]]:
    loss, metrics, grads = self._gradients(state, batch)
    grad_norm = optax.tree.norm(grads)
    # Judged on the device from two scalars; the loop reads the flag where it reads metrics
    # anyway (log, checkpoint) and never saves a state it has not checked: no host sync per step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if self.on_nonfinite == "skip":
      # The flag is known before the update, so the select joins the optimiser's own pass.
      params, opt_state = jax.tree_util.tree_map(
          lambda new, old: jnp.where(finite, new, old),
          (params, opt_state), (state.params, state.opt_state))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   nonfinite=jnp.logical_not(finite).astype(jnp.int32))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def _eval_step(self, params, batch) -> Dict[str, jax.Array]:
    return self.task.eval_sums(params, batch)

  def evaluate(self, params, batches: Iterable[LocalBatch]) -> Dict[str, float]:
    """Runs eval_sums over all batches and returns sum / count for every metric."""
    totals: Dict[str, float] = {}
    with self.context():
      for local in batches:
        sums = self.eval_step(params, sharding_lib.global_batch(local, self.mesh))
        for key, value in jax.device_get(sums).items():
          totals[key] = totals.get(key, 0.0) + float(value)
    count = totals.pop("count", 0.0)
    if not count:
      raise ValueError("the evaluation split yielded no examples; check config.eval_split.")
    return {key: value / count for key, value in totals.items()}


def train_and_evaluate(
    task: Task,
    *,
    loop: LoopConfig,
    optimizer: optim.OptimizerConfig,
    mesh_config: sharding_lib.MeshConfig,
    workdir: str,
    train_data: Callable[[int], Iterator[LocalBatch]],
    eval_data: Optional[Callable[[], Iterable[LocalBatch]]] = None,
    rules: Sequence[Tuple[str, Any]] = sharding_lib.DEFAULT_RULES,
    initial_params: Optional[Callable[[Any], Any]] = None,
    tensorboard: bool = True,
    flops_per_example: Optional[float] = None,
    evaluators: Sequence[Callable[[Any], Dict[str, float]]] = (),
) -> Dict[str, Any]:
  """Trains `task` to `loop.total_steps`, resuming from the latest checkpoint in `workdir`.

  Args:
    train_data: start_step -> iterator of this process's local batches for steps start_step, ...
    eval_data: () -> iterable over one pass of local evaluation batches (with "mask").
    initial_params: host params -> params, applied to a fresh (not resumed) initialisation,
      e.g. to load pretrained weights.
    flops_per_example: the model's training FLOPs per example (the family's formula, see
      `common_jax.plan`); with it every progress line and metrics record carries the FLOP/s per
      device and the MFU against the device's peak (`common_jax.mfu.device_peak`).
    evaluators: more evaluations, each params -> {metric name: value}, run with every
      evaluation (outside the mesh's activation constraints) and logged beside it, e.g. the
      ViT family's few-shot evaluation (`config.fewshot_in_eval`).

  Returns:
    dict with "step", "stopped" (True when a signal ended the run early), "eval" (last
    evaluation's metrics), "params" (final parameters) and timing in seconds.
  """
  start_time = time.perf_counter()
  check_loop(loop)
  mesh = sharding_lib.make_mesh(mesh_config)
  sharding_lib.check_batch_size(loop.batch_size, mesh)
  if loop.accum_steps > 1:
    sharding_lib.check_batch_size(loop.batch_size // loop.accum_steps, mesh,
                                  field="config.batch_size / config.accum_steps")
  tx = optim.make_optimizer(optimizer, loop.total_steps)
  schedule = optim.make_schedule(optimizer, loop.total_steps)
  trainer = Trainer(task=task, mesh=mesh, rules=rules, tx=tx, accum_steps=loop.accum_steps,
                    on_nonfinite=loop.on_nonfinite)

  checkpointer = checkpoint_lib.Checkpointer(workdir, keep=loop.keep_checkpoints,
                                             asynchronous=loop.async_checkpoints,
                                             say=metrics_lib.say)
  writer = None
  try:  # every way out waits for the save in flight (below: except and finally)
    with trainer.context():
      state = trainer.init(jax.random.PRNGKey(loop.seed))
    state, restored_step = checkpointer.restore_newest_intact(state)
    if restored_step is not None:
      metrics_lib.say(f"resumed from {checkpointer.directory} at step {restored_step}")
    elif initial_params is not None:
      params = initial_params(jax.device_get(state.params))
      params = jax.device_put(params, trainer.state_shardings.params)
      # Re-initialise the optimiser state around the loaded parameters.
      state = state.replace(params=params, opt_state=jax.device_put(
          tx.init(params), trainer.state_shardings.opt_state))
    step = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(workdir, tensorboard=tensorboard, start_step=step)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    writer.print(f"model {type(trainer.model).__name__}: {num_params:,} parameters; mesh "
                 f"{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
                 f"devices; {loop.total_steps} steps of batch {loop.batch_size}")
    peak = None
    if flops_per_example and loop.log_every and step < loop.total_steps:
      peak, peak_source = mfu.device_peak()
      writer.print(f"MFU: {flops_per_example / 1e9:.3g} GFLOP per example (model FLOPs, "
                   f"6·N·T + attention) against {peak_source} per device")

    def run_eval(at_step: int) -> Dict[str, float]:
      began = time.perf_counter()
      ema = optim.polyak_params(state.opt_state)  # config.optimizer.ema_decay
      params = state.params if ema is None else ema
      results = trainer.evaluate(params, eval_data())
      for evaluate in evaluators:
        with jax.set_mesh(None), nn.logical_axis_rules([]):  # plain jit, any batch size
          results.update(evaluate(params))
      writer.write(at_step, {f"eval/{k}": v for k, v in results.items()})
      writer.print(f"eval{'' if ema is None else ' (moving average)'} at step {at_step}: " +
                   ", ".join(f"{k} {v:.4f}" for k, v in results.items()) +
                   f" ({time.perf_counter() - began:.1f}s)")
      return results

    unchecked = []  # (step, metrics) whose non-finite flag the host has not read yet
    skipped = 0  # steps skipped (on_nonfinite="skip") since the last log

    def check_finite() -> None:
      """Reads the flags of the steps since the last check and stops at the first non-finite
      one (or counts it, with "skip"); then checks the parameters themselves, which a finite
      gradient with a learning rate of nan or inf makes non-finite. Called before every save:
      nothing unchecked is saved."""
      nonlocal skipped
      flags = jax.device_get([metrics["nonfinite"] for _, metrics in unchecked])
      bad = [(at, metrics) for (at, metrics), flag in zip(unchecked, flags) if flag]
      unchecked.clear()
      if bad and loop.on_nonfinite == "stop":
        raise stopping.diverged(bad[0][0], checkpointer.latest_step(), bad[0][1])
      skipped += len(bad)
      if not jax.device_get(trainer.params_finite(state.params)):
        raise stopping.diverged(step, checkpointer.latest_step())

    several = jax.process_count() > 1
    progress = metrics_lib.Progress(loop.total_steps, loop.batch_size,
                                    flops_per_example=flops_per_example if peak else None,
                                    num_devices=jax.device_count(), peak_per_device=peak)
    last_eval: Dict[str, float] = {}
    pending = []  # metrics since the last log
    stopped = False
    eval_seconds = 0.0
    first_step_seconds = None
    train_iter = (on_device(train_data(step), mesh) if step < loop.total_steps
                  else iter(()))
    # Signals are taken from here until the last save is on disk (one after the loop is only
    # noted: the run is ending anyway).
    with stopping.StopRequest(step) as stop, trainer.context():
      while step < loop.total_steps:
        batch = next(train_iter)
        step_began = time.perf_counter()
        state, step_metrics = trainer.train_step(state, batch)
        step += 1
        unchecked.append((step, step_metrics))
        if loop.log_every:
          pending.append(step_metrics)
        if not several:
          checkpointer.poll()  # a failed save stops the run now, not one checkpoint later
        if first_step_seconds is None:
          jax.block_until_ready(step_metrics)
          first_step_seconds = time.perf_counter() - step_began  # compile + one step
          progress.reset(step)
        final = step == loop.total_steps
        log_now = loop.log_every and (step % loop.log_every == 0 or final)
        stop_now = stop.requested(step) and not final  # asked every step (a sync point)
        save_now = (loop.checkpoint_every and step % loop.checkpoint_every == 0) or final
        if log_now or save_now or stop_now or len(unchecked) >= CHECK_EVERY:
          check_finite()
        if log_now:
          fetched = jax.device_get(pending)
          pending = []
          finite = [m for m in fetched if not m["nonfinite"]]  # skipped steps: no average
          averaged = {k: float(np.mean([m[k] for m in finite]))
                      for k in fetched[0] if k != "nonfinite" and finite}
          if loop.on_nonfinite == "skip":
            averaged["skipped_steps"], skipped = float(skipped), 0
          averaged["learning_rate"] = float(schedule(step - 1))
          rates = progress.rates(step)
          writer.write(step, {**{f"train/{k}": v for k, v in averaged.items()}, **rates})
          shown = {k: v for k, v in sorted(averaged.items(), key=lambda item: item[0] != "loss")
                   if k not in ("grad_norm", "learning_rate")}
          writer.print(progress.line(step, shown, rates))
          if several and checkpoint_lib.all_processes(checkpointer.save_finished()):
            checkpointer.wait()  # the processes learn of a failed save at the same step
        if save_now or stop_now:
          checkpointer.save(step, state, force=True)
          writer.flush()
        if eval_data is not None and ((loop.eval_every and step % loop.eval_every == 0)
                                      or final):
          began = time.perf_counter()
          last_eval = run_eval(step)
          eval_seconds += time.perf_counter() - began
          progress.reset(step)
        if stop_now:
          checkpointer.wait()
          writer.print(f"{stop.describe()} received: saved a checkpoint at step {step} in "
                       f"{checkpointer.directory}; run the same command again to resume.")
          stopped = True
          break
      if step >= loop.total_steps and not last_eval and eval_data is not None and not stopped:
        last_eval = run_eval(step)  # resumed at the end: report the final numbers again
      checkpointer.close()  # the last save is on disk, or SaveFailed
  except BaseException:
    _close_after_error(checkpointer)
    raise
  finally:
    if writer is not None:
      writer.close()
  total_seconds = time.perf_counter() - start_time
  if not stopped:
    metrics_lib.say(f"done at step {step} in {metrics_lib.format_duration(total_seconds)} "
                    f"(first step incl. compilation {first_step_seconds or 0:.1f}s, "
                    f"evaluation {eval_seconds:.1f}s)")
  return {"step": step, "stopped": stopped, "eval": last_eval, "params": state.params,
          "seconds": total_seconds, "first_step_seconds": first_step_seconds,
          "eval_seconds": eval_seconds}


def on_device(local_batches: Iterator[LocalBatch], mesh: jax.sharding.Mesh,
              ahead: int = 2) -> Iterator[Dict[str, jax.Array]]:
  """The global batches of `local_batches`, each sent to the devices `ahead` steps before the
  step that takes it: the transfer (asynchronous, like the steps) overlaps the steps before, and
  the host reads the next batch while the devices compute."""
  queue = collections.deque()
  for local in local_batches:
    queue.append(sharding_lib.global_batch(local, mesh))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _close_after_error(checkpointer: checkpoint_lib.Checkpointer) -> None:
  """Waits for the save in flight while another error ends the run; a failure of that save is
  said, not raised over the error that is ending the run."""
  try:
    checkpointer.close()
  except checkpoint_lib.SaveFailed as error:
    metrics_lib.say(f"also: {error}", sys.stderr)
