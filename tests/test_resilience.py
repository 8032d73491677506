"""Nothing trained is ever lost (issue #9), end to end through run.py.

- A run killed (SIGKILL) at random moments, also while an async checkpoint is being written, and
  restarted until done ends bitwise equal to an unbroken run, every checkpoint readable and every
  logged step in metrics.jsonl once (5 kills per family; RESILIENCE_LONG=1: 20); a resumed run
  drops the records it redoes, and TensorBoard is told to purge them.
- A non-finite loss or update stops the run with one sentence naming the step (exit status 3),
  saves nothing non-finite and keeps the good checkpoints; on_nonfinite="skip" leaves parameters
  and optimiser state as they were on a non-finite step, counts it and goes on.
- A damaged latest checkpoint (a truncated data file, a deleted manifest) is named in one
  sentence; training falls back to the newest intact one and moves the damaged one aside; with
  no intact one nothing moves, and a checkpoint of another model is refused, never moved.
- A failed save (file size limit) stops the run at once and keeps the previous checkpoint; an
  error in the final evaluation waits for the final save.
- A checkpoint written on 8 devices continues on FSDP over 8, on 2 and on 1 device.
- Two processes of 4 devices train like one of 8, and a SIGTERM to one of them stops both at the
  same step with one checkpoint.

Every subprocess shares one JAX compilation cache, so a restart costs its start-up, not a compile.
"""

import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from common_jax import checkpoint as checkpoint_lib
from common_jax import metrics, optim, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = os.environ.get("RESILIENCE_LONG") == "1"
KILLS = 20 if LONG else 5
TOTAL_STEPS = 10 * (KILLS + 1)  # checkpoints every 10 steps: enough for every kill to progress
EXIT_DIVERGED = 3

FAMILIES = {
    "vit": ["--config=configs/vit_digits.py", "--config.model.width=32",
            "--config.model.depth=1", "--config.model.mlp_dim=64",
            "--config.model.num_heads=2", "--config.model.dropout_rate=0.1"],
    "igpt": ["--config=configs/igpt_digits.py", "--config.model.width=32",
             "--config.model.depth=2", "--config.model.mlp_dim=64",
             "--config.model.num_heads=2"],
}
LOOP = ["--config.log_every=5", "--config.eval_every=0", "--config.checkpoint_every=10",
        "--config.keep_checkpoints=3", "--config.optimizer.warmup_steps=5"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """The data directory and the compilation cache every run of this module shares."""
  root = tmp_path_factory.mktemp("resilience")
  return {"data": str(root / "data"), "cache": str(root / "jax_cache")}


def _command(shared, family, workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "run.py"), *FAMILIES[family], f"--workdir={workdir}",
          f"--config.data_dir={shared['data']}", *LOOP, *extra]


def _env(shared, devices):
  return dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu",
              JAX_COMPILATION_CACHE_DIR=shared["cache"],
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(shared, family, workdir, *extra, devices=2, expect=0, file_size_limit=None):
  """run.py to its end; expect: its exit status (None: any). file_size_limit: bytes per file
  (RLIMIT_FSIZE, set in the child before anything runs, as `ulimit -f` would)."""
  command = _command(shared, family, workdir, *extra)
  if file_size_limit:
    command = [sys.executable, "-c", _LIMITED.format(limit=file_size_limit), *command[1:]]
  result = subprocess.run(command, capture_output=True, text=True, env=_env(shared, devices),
                          cwd=ROOT, timeout=600)
  assert expect is None or result.returncode == expect, result.stdout + result.stderr
  return result


_LIMITED = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _state(workdir, step):
  """The whole saved train state at `step` as host numpy arrays (on any topology), flattened."""
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  with ocp.PyTreeCheckpointer() as reader:
    metadata = reader.metadata(path).item_metadata.tree
    state = reader.restore(path, args=ocp.args.PyTreeRestore(
        restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                            metadata)))
  return ocp.tree.to_flat_dict(state)


def _assert_bitwise_equal(expected, actual):
  assert expected.keys() == actual.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=str(key))


def _steps(workdir):
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))
                if name.isdigit())


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _assert_logged_once(workdir, total_steps, log_every=5):
  records = _records(workdir)
  train_steps = [r["step"] for r in records if any(k.startswith("train/") for k in r)]
  eval_steps = [r["step"] for r in records if any(k.startswith("eval/") for k in r)]
  assert train_steps == list(range(log_every, total_steps + 1, log_every))
  assert eval_steps == [total_steps]


@pytest.fixture(scope="module")
def unbroken(shared, tmp_path_factory):
  """family -> workdir of an unbroken TOTAL_STEPS run on 2 devices (checkpoints of the last
  three tens kept); made on first use."""
  runs = {}

  def get(family):
    if family not in runs:
      workdir = str(tmp_path_factory.mktemp(f"unbroken_{family}") / "w")
      _run(shared, family, workdir, f"--config.total_steps={TOTAL_STEPS}")
      runs[family] = workdir
    return runs[family]

  return get


def _copy(workdir, tmp_path, name="copy"):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


# -- Killed at random moments -------------------------------------------------------------------


def _kill_during_save(process, checkpoints, log):
  """Kills as soon as a checkpoint is being written (Orbax's temporary directory exists) once
  training has begun (by then the leftovers of earlier kills are cleaned up)."""
  while process.poll() is None:
    if (os.path.isdir(checkpoints) and "\nstep " in "\n" + _read(log)
        and any(".orbax-checkpoint-tmp" in name for name in os.listdir(checkpoints))):
      process.kill()
      return
    time.sleep(0.002)


def _read(path):
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def _kill_after_progress(process, checkpoints, delay):
  """Kills `delay` seconds after a checkpoint newer than those at launch is committed."""
  before = set(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else set()
  while process.poll() is None:
    names = set(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else set()
    if any(name.isdigit() for name in names - before):
      time.sleep(delay)
      process.kill()
      return
    time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "igpt"])
def test_killed_runs_resume_bitwise(shared, unbroken, tmp_path, family):
  expected = unbroken(family)
  workdir = str(tmp_path / "killed")
  checkpoints = os.path.join(workdir, "checkpoints")
  command = _command(shared, family, workdir, f"--config.total_steps={TOTAL_STEPS}")
  rng = random.Random(f"{family}-{KILLS}")
  kills = {"during_save": 0, "after_progress": 0, "at_start": 0}
  previous = "after_progress"
  for _ in range(3 * KILLS + 5):
    done = sum(kills.values()) >= KILLS
    # A kill during a save or at start-up makes no progress: never two of them in a row.
    way = ("finish" if done else "after_progress" if previous != "after_progress"
           else rng.choice(["during_save", "during_save", "at_start", "after_progress"]))
    log = tmp_path / "attempt.log"
    with open(log, "w", encoding="utf-8") as output:
      process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                 env=_env(shared, 2), cwd=ROOT)
    if way == "during_save":
      _kill_during_save(process, checkpoints, log)
    elif way == "after_progress":
      _kill_after_progress(process, checkpoints, rng.uniform(0.0, 0.3))
    elif way == "at_start":  # importing, preparing data, fitting the palette, restoring
      time.sleep(rng.uniform(0.5, 2.5))
      process.kill()
    process.wait(timeout=600)
    if process.returncode == -signal.SIGKILL:
      kills[way] += 1
      previous = way
      continue
    assert process.returncode == 0, _read(log)
    break
  print(f"{family}: {kills}")
  assert sum(kills.values()) >= KILLS and kills["during_save"] >= 1, kills

  _assert_bitwise_equal(_state(expected, TOTAL_STEPS), _state(workdir, TOTAL_STEPS))
  assert sorted(os.listdir(checkpoints)) == [str(s) for s in _steps(expected)]  # no leftovers
  for step in _steps(workdir):  # every checkpoint restores
    assert _state(workdir, step)
  assert not os.path.exists(os.path.join(workdir, checkpoint_lib.DAMAGED_DIRECTORY))
  _assert_logged_once(workdir, TOTAL_STEPS)


def _events(logdir):
  """(step, tag or "purge") of every event in a TensorBoard directory (TFRecord files)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  found = []
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      length = struct.unpack("<Q", data[offset:offset + 8])[0]
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.HasField("session_log"):
        found.append((event.step, "purge"))
      found += [(event.step, value.tag) for value in event.summary.value]
  return found


def test_a_resumed_run_drops_the_records_it_redoes(tmp_path):
  """metrics.jsonl loses the records after the restored step and a line cut by a kill, and a
  record the resumed run repeats at that step (the final evaluation) is not written twice;
  TensorBoard is told to purge the steps after it."""
  first = metrics.MetricWriter(str(tmp_path))
  for step in (5, 10, 15):
    first.write(step, {"train/loss": step})
  first.write(15, {"eval/loss": 1.5})
  first.close()
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 20, "train/lo')  # killed while writing
  resumed = metrics.MetricWriter(str(tmp_path), start_step=15)
  resumed.write(15, {"eval/loss": 1.5})  # the final evaluation, redone after a resume at the end
  resumed.write(20, {"train/loss": 20})
  resumed.close()
  assert [(r["step"], sorted(r)) for r in _records(str(tmp_path))] == [
      (5, ["step", "train/loss"]), (10, ["step", "train/loss"]), (15, ["step", "train/loss"]),
      (15, ["eval/loss", "step"]), (20, ["step", "train/loss"])]
  metrics.MetricWriter(str(tmp_path), start_step=10).close()  # resumed at 10: 15 and 20 go
  assert [r["step"] for r in _records(str(tmp_path))] == [5, 10]
  assert (16, "purge") in _events(tmp_path / "tensorboard")
  assert (11, "purge") in _events(tmp_path / "tensorboard")


# -- Non-finite loss ----------------------------------------------------------------------------


_LOSS_FIX = ("lower config.optimizer.learning_rate, or set config.on_nonfinite='skip' to skip "
             "such steps")
_UPDATE_FIX = "check config.optimizer: a learning rate of nan or inf, or one that overflows"


@pytest.mark.parametrize("learning_rate, on_nonfinite, what, fix", [
    ("1e6", "stop", "the loss is nan and the gradient norm nan", _LOSS_FIX),
    # Finite gradients, non-finite update: skipping would skip every step, so it stops too.
    ("nan", "skip", r"the parameters are not finite although every loss and gradient norm was "
                    r"\(an update of nan or inf\)", _UPDATE_FIX),
])
def test_divergence_stops_with_one_sentence_and_keeps_the_good_checkpoints(
    shared, unbroken, tmp_path, learning_rate, on_nonfinite, what, fix):
  workdir = _copy(unbroken("vit"), tmp_path)
  kept = {step: _state(workdir, step) for step in _steps(workdir)}
  result = _run(shared, "vit", workdir, f"--config.total_steps={TOTAL_STEPS + 40}",
                f"--config.optimizer.learning_rate={learning_rate}",
                f"--config.on_nonfinite={on_nonfinite}", "--config.allow_config_change=true",
                expect=EXIT_DIVERGED)
  last = result.stderr.strip().splitlines()[-1]
  match = re.fullmatch(
      rf"error: training diverged at step (\d+): {what}; the checkpoint at step {TOTAL_STEPS} "
      rf"is kept and nothing after it was saved \({re.escape(fix)}\).", last)
  assert match, last
  assert TOTAL_STEPS < int(match.group(1)) <= TOTAL_STEPS + 5  # found by the first log
  # Nothing was saved, so nothing was rotated away: the good checkpoints are as they were.
  assert _steps(workdir) == sorted(kept)
  for step, state in kept.items():
    _assert_bitwise_equal(state, _state(workdir, step))
  assert max(r["step"] for r in _records(workdir)) == TOTAL_STEPS  # and no NaN was logged


def _tiny_vit():
  from vit_jax.tasks import ClassificationTask  # pylint: disable=g-import-not-at-top
  return ClassificationTask("custom", num_classes=10, image_size=8, model_options=dict(
      width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4))


def _batches(nan_at=()):
  """start_step -> batches of 16 random 8x8 images; those of the steps in `nan_at` are NaN."""

  def train_data(start_step):
    rng = np.random.default_rng(start_step)
    for step in range(start_step + 1, 10**9):
      image = rng.uniform(-1, 1, (16, 8, 8, 3)).astype(np.float32)
      yield {"image": image * np.nan if step in nan_at else image,
             "label": rng.integers(0, 10, 16).astype(np.int32)}

  return train_data


def test_skip_leaves_the_state_unchanged_and_counts(tmp_path):
  # The step itself: a NaN batch changes neither the parameters nor the optimiser state.
  mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])  # compiles fastest
  trainer = train.Trainer(task=_tiny_vit(), mesh=mesh, rules=sharding.DEFAULT_RULES,
                          tx=optim.make_optimizer(optim.OptimizerConfig(), 10),
                          on_nonfinite="skip")
  with trainer.context():
    state = trainer.init(jax.random.PRNGKey(0))
    batches = _batches(nan_at=(1,))(0)
    before = jax.device_get(state)
    state, metrics = trainer.train_step(state, sharding.global_batch(next(batches), mesh))
    after = jax.device_get(state)
    assert int(metrics["nonfinite"]) == 1 and int(after.step) == 1
    _assert_bitwise_equal(ocp.tree.to_flat_dict({"p": before.params, "o": before.opt_state}),
                          ocp.tree.to_flat_dict({"p": after.params, "o": after.opt_state}))
    state, metrics = trainer.train_step(state, sharding.global_batch(next(batches), mesh))
    assert int(metrics["nonfinite"]) == 0
    assert not np.array_equal(jax.device_get(state.params)["head"]["kernel"],
                              before.params["head"]["kernel"])

  # The loop: skipped steps are counted per log, left out of the averages, and the run goes on.
  result = train.train_and_evaluate(
      _tiny_vit(), loop=train.LoopConfig(total_steps=6, batch_size=16, log_every=3,
                                         eval_every=0, checkpoint_every=0, on_nonfinite="skip"),
      optimizer=optim.OptimizerConfig(), mesh_config=sharding.MeshConfig(),
      workdir=str(tmp_path), train_data=_batches(nan_at=(2, 4, 5)), tensorboard=False)
  assert result["step"] == 6
  records = _records(str(tmp_path))
  assert [(r["step"], r["train/skipped_steps"]) for r in records] == [(3, 1.0), (6, 2.0)]
  assert all(np.isfinite(r["train/loss"]) for r in records)


# -- Damaged checkpoints ------------------------------------------------------------------------


def _truncate_data_files(step_dir):
  """Cuts every array data file of a checkpoint to its first 16 bytes (as a full disk would).

  Not to half its size: which arrays share a data file, and in which order, changes from run to
  run, so the parameters can all lie in the halves that are kept."""
  data = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
  for name in os.listdir(data):
    with open(os.path.join(data, name), "r+b") as f:
      f.truncate(min(16, os.path.getsize(os.path.join(data, name)) // 2))
  return data


@pytest.mark.parametrize("damage", ["truncated_data", "deleted_manifest"])
def test_damaged_checkpoint_is_named_and_training_falls_back(shared, unbroken, tmp_path, damage):
  expected = unbroken("vit")
  workdir = _copy(expected, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", str(TOTAL_STEPS))
  if damage == "truncated_data":
    data = _truncate_data_files(step_dir)
    said = rf"{re.escape(data)}/\w+ is truncated \(OUT_OF_RANGE: .*\)"
  else:
    broken = os.path.join(step_dir, "default", "manifest.ocdbt")
    os.remove(broken)
    said = rf"{re.escape(broken)} is missing"
  sentence = (rf"the checkpoint at step {TOTAL_STEPS} in {re.escape(workdir)}/checkpoints is "
              rf"damaged: {said}")

  # Reading parameters (eval, export, sample, probe, init_from): one sentence, no fall back.
  reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
  with pytest.raises(checkpoint_lib.DamagedCheckpoint, match=sentence):
    reader.read_params()
  if damage == "deleted_manifest":
    with pytest.raises(checkpoint_lib.DamagedCheckpoint, match=sentence):
      reader.params_metadata()
  reader.close()

  # Training falls back to the newest intact checkpoint, moves the damaged one aside and redoes
  # the steps after it exactly.
  result = _run(shared, "vit", workdir, f"--config.total_steps={TOTAL_STEPS}")
  moved = os.path.join(workdir, checkpoint_lib.DAMAGED_DIRECTORY, str(TOTAL_STEPS))
  assert re.search(sentence + rf"; moved it to {re.escape(moved)} and resuming from step "
                   rf"{TOTAL_STEPS - 10}, the newest intact one.\n", result.stdout), result.stdout
  assert os.path.isdir(moved)  # kept, never deleted
  assert _steps(workdir) == _steps(expected)
  _assert_bitwise_equal(_state(expected, TOTAL_STEPS), _state(workdir, TOTAL_STEPS))
  _assert_logged_once(workdir, TOTAL_STEPS)


def test_without_an_intact_checkpoint_nothing_moves_and_another_model_is_refused(tmp_path):
  state = {"params": {"w": jax.numpy.arange(4.0)}, "step": jax.numpy.zeros((), "int32")}
  writer = checkpoint_lib.Checkpointer(str(tmp_path), asynchronous=False)
  for step in (1, 2):
    writer.save(step, state)
  writer.close()
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path))
  with pytest.raises(ValueError, match=re.escape(
      "the checkpoint at step 2 in " f"{tmp_path}/checkpoints does not fit this model (params/w "
      "has shape (4,) there but (5,) here); use a new --workdir or the config the checkpoint "
      "was written with.")) as refused:
    checkpointer.restore_newest_intact(dict(state, params={"w": jax.numpy.arange(5.0)}))
  assert not isinstance(refused.value, checkpoint_lib.DamagedCheckpoint)
  for step in (1, 2):
    os.remove(tmp_path / "checkpoints" / str(step) / "default" / "manifest.ocdbt")
  with pytest.raises(checkpoint_lib.DamagedCheckpoint, match=re.escape(
      "manifest.ocdbt is missing; no checkpoint there restores (tried steps [2, 1]), so nothing "
      "was moved aside: use a new --workdir to start over, or repair or remove the damaged "
      "files.")):
    checkpointer.restore_newest_intact(state)
  checkpointer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert not os.path.exists(tmp_path / checkpoint_lib.DAMAGED_DIRECTORY)


def test_eval_mode_names_a_damaged_checkpoint_in_one_line(shared, unbroken, tmp_path):
  workdir = _copy(unbroken("vit"), tmp_path)
  os.remove(os.path.join(workdir, "checkpoints", str(TOTAL_STEPS), "default", "manifest.ocdbt"))
  result = _run(shared, "vit", workdir, "--mode=eval", expect=2)
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith(f"error: the checkpoint at step {TOTAL_STEPS} in {workdir}/"
                              "checkpoints is damaged: "), result.stderr
  assert "Traceback" not in result.stderr


# -- Failed saves, errors while a save is in flight ----------------------------------------------


def test_failed_save_stops_at_once_and_keeps_the_previous_checkpoint(shared, unbroken, tmp_path):
  workdir = _copy(unbroken("vit"), tmp_path)
  kept = _state(workdir, TOTAL_STEPS)
  # 16 KiB per file: metrics and events fit, a checkpoint's data files do not (a full disk).
  result = _run(shared, "vit", workdir, f"--config.total_steps={TOTAL_STEPS + 30}",
                "--config.allow_config_change=true", file_size_limit=16 * 1024, expect=None)
  output = result.stdout + result.stderr
  assert result.returncode not in (0, EXIT_DIVERGED), output
  assert re.search(rf"saving the checkpoint at step {TOTAL_STEPS + 10} to {re.escape(workdir)}/"
                   r"checkpoints failed \(File too large writing .*\); the run stops and the "
                   rf"checkpoint at step {TOTAL_STEPS} is kept: free disk space or fix the "
                   r"directory, then run the same command again.$", result.stderr, re.M), output
  # At once: before the next checkpoint is due, not a checkpoint interval later.
  assert f"step {TOTAL_STEPS + 20}/" not in output and "done at step" not in output
  assert _steps(workdir)[-1] == TOTAL_STEPS
  _assert_bitwise_equal(kept, _state(workdir, TOTAL_STEPS))


def test_error_in_the_final_evaluation_waits_for_the_final_save(tmp_path):
  def eval_data():
    raise ValueError("the images of image_folder:/data differ in size")

  with pytest.raises(ValueError, match="differ in size"):
    train.train_and_evaluate(
        _tiny_vit(), loop=train.LoopConfig(total_steps=3, batch_size=16, log_every=0,
                                           eval_every=0, checkpoint_every=0),
        optimizer=optim.OptimizerConfig(), mesh_config=sharding.MeshConfig(),
        workdir=str(tmp_path), train_data=_batches(), eval_data=eval_data, tensorboard=False)
  # Right after the error: the final checkpoint is committed, not a temporary directory.
  assert os.listdir(tmp_path / "checkpoints") == ["3"]
  assert checkpoint_lib.Checkpointer(str(tmp_path), read_only=True).read_params()


# -- Restoring onto another mesh ----------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_devices(shared, tmp_path_factory):
  """family -> workdir of a 40-step run on 8 devices (data parallel), checkpoints 20, 30, 40."""
  runs = {}

  def get(family):
    if family not in runs:
      workdir = str(tmp_path_factory.mktemp(f"eight_{family}") / "w")
      _run(shared, family, workdir, "--config.total_steps=40", devices=8)
      runs[family] = workdir
    return runs[family]

  return get


def _final_loss(workdir):
  return [r for r in _records(workdir) if r["step"] == 40 and "train/loss" in r][-1]["train/loss"]


def _assert_close(expected, actual, rtol=1e-4, atol=1e-6):
  """Equal to float tolerance, but for the ViT attention key bias: its true gradient is zero
  (softmax ignores a shift shared by all keys), so Adam turns the summation-order noise of that
  zero into steps of ~1e-5 that differ from mesh to mesh."""
  assert expected.keys() == actual.keys()
  for key in expected:
    if key[-2:] == ("key", "bias"):
      continue
    np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=atol, err_msg=str(key))


@pytest.mark.slow
@pytest.mark.parametrize("devices, mesh", [(8, "fsdp"), (2, "data"), (1, "data")])
def test_checkpoint_of_8_devices_continues_on_another_mesh(
    shared, eight_devices, tmp_path, devices, mesh):
  expected = eight_devices("vit")
  workdir = _copy(expected, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "40"))  # resume from step 30
  flags = ["--config.mesh.data=1", "--config.mesh.fsdp=-1"] if mesh == "fsdp" else []
  result = _run(shared, "vit", workdir, "--config.total_steps=40", *flags, devices=devices)
  assert "at step 30" in result.stdout
  np.testing.assert_allclose(_final_loss(workdir), _final_loss(expected), rtol=1e-5)
  _assert_close(_state(expected, 40), _state(workdir, 40))


# -- Several processes --------------------------------------------------------------------------


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _processes(shared, family, workdir, *extra, env=None):
  """Two processes of 4 CPU devices each, process 0 first; stdout and stderr together."""
  port = _free_port()
  return [subprocess.Popen(
      _command(shared, family, workdir, *extra, "--jax_distributed",
               f"--coordinator_address=localhost:{port}", "--num_processes=2",
               f"--process_id={index}"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(_env(shared, 4), **(env or {})), cwd=ROOT)
      for index in range(2)]


def _finish(processes):
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  return [p.returncode for p in processes], outputs


@pytest.mark.slow
@pytest.mark.parametrize("preemption_service", [True] + ([False] if LONG else []))
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    shared, eight_devices, tmp_path, preemption_service):
  # A SIGTERM to process 1 only, while both train: both stop at the same step, with one
  # checkpoint (saving is a collective: a process stepping on would hang it). Without JAX's
  # preemption service the processes compare their stop flags every stopping.AGREE_EVERY steps.
  workdir = str(tmp_path / "vit")
  service = {"JAX_ENABLE_PREEMPTION_SERVICE": str(preemption_service).lower()}
  processes = _processes(shared, "vit", workdir, "--config.total_steps=40",
                         "--config.checkpoint_every=0", env=service)
  lines = []
  for line in processes[0].stdout:
    lines.append(line)
    if line.startswith("step 5/"):
      processes[1].send_signal(signal.SIGTERM)
      break
  codes, outputs = _finish(processes)
  output = "".join(lines) + outputs[0]
  assert codes[0] == codes[1] and codes[0] in (0, 75), outputs
  stopped = re.search(r"a stop request \(SIGTERM or SIGINT to one of the 2 processes\) received: "
                      r"saved a checkpoint at step (\d+)", output)
  assert stopped, output
  assert _steps(workdir) == [int(stopped.group(1))] and 5 <= int(stopped.group(1)) < 40
  # Resumed by both, the run ends where one process of 8 devices ends.
  codes, outputs = _finish(_processes(shared, "vit", workdir, "--config.total_steps=40",
                                      "--config.checkpoint_every=0"))
  assert codes == [0, 0], outputs
  _assert_close(_state(eight_devices("vit"), 40), _state(workdir, 40))


@pytest.mark.slow
def test_two_processes_train_igpt_like_one(shared, eight_devices, tmp_path):
  # With the palette of the one-process run: fitting it is the family's business, and
  # igpt_jax.family.fit_palette fits on process 0's share of the data only (reported).
  expected = eight_devices("igpt")
  workdir = str(tmp_path / "igpt")
  codes, outputs = _finish(_processes(shared, "igpt", workdir, "--config.total_steps=40",
                                      f"--config.palette={expected}/palette.npy"))
  assert codes == [0, 0], outputs
  _assert_close(_state(expected, 40), _state(workdir, 40))
