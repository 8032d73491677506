#!/usr/bin/env bash
# Multi-node GPU training under Slurm: one run.py process per node (all its GPUs) by default, or
# one per GPU with --per-gpu, connected by JAX's multi-controller runtime.
#
#   sbatch --nodes=4 scripts/launch_slurm.sh --config=configs/vit_pretrain.py:B/16,imagenet2012 \
#       --workdir=/shared/runs/b16          # from the repository root, on a shared file system
#   scripts/launch_slurm.sh --nodes=4 ...   # the same: calls sbatch for you
#   scripts/launch_slurm.sh --dry-run --nodes=4 ...   # print the commands; no Slurm needed
#
# The script passes --coordinator_address (first host of SLURM_JOB_NODELIST, through
# `scontrol show hostnames`, and a port from the job id), --num_processes (SLURM_NTASKS) and
# --process_id (SLURM_PROCID) itself rather than relying on JAX's Slurm auto-detection, so the
# port can be chosen and the printed command is the one that runs. JAX still reads Slurm's
# variables for what is left unset: given no local_device_ids, it would restrict every process
# to one GPU (number SLURM_LOCALID), so the script sets JAX_LOCAL_DEVICE_IDS to the GPUs each
# process should use (all the node's, or its own one with --per-gpu).
#
# Edit the defaults below (or override them on the sbatch command line) for your cluster; add
# --partition, --account and --time as it requires.
#SBATCH --job-name=vit-igpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --output=slurm-%j.out
set -euo pipefail

usage() {
  cat <<EOF
usage: sbatch [sbatch options] scripts/launch_slurm.sh [--per-gpu] [--port PORT] run.py args...
       scripts/launch_slurm.sh [--nodes N] [--gpus-per-node G] [--per-gpu] [--port PORT]
                               [--dry-run] run.py args...

Inside a Slurm job: srun runs, once per task,
  \$PYTHON run.py <run.py args> --jax_distributed --coordinator_address=<first node>:PORT
      --num_processes=\$SLURM_NTASKS --process_id=\$SLURM_PROCID
Outside one: submits this script with sbatch (from the repository root, which every node must
see, as must the workdir).
  --nodes N            nodes to ask for [the #SBATCH line: 2]
  --gpus-per-node G    GPUs per node [the #SBATCH line: 8]
  --per-gpu            one process per GPU (G tasks per node) instead of one per node
  --port PORT          the coordinator's port [\$LAUNCH_PORT, else 20000 + job id % 20000]
  --dry-run            print the sbatch and srun command lines and each task's run.py command,
                       run nothing. Slurm's variables are simulated: SLURM_JOB_NODELIST
                       [node[001-00N]], SLURM_JOB_ID [12345]; set them to see other values.
  -h, --help           this message
\$PYTHON: default .venv/bin/python in the repository, else python3.
EOF
}

nodes=""
gpus_per_node=""
per_gpu=0
port="${LAUNCH_PORT:-}"
dry_run=0
task=0            # internal: this process is one srun task
coordinator=""    # internal, with --task
num_processes=""  # internal, with --task

value() {  # the value of the option $1, given as "--option=VALUE" ($1) or "--option VALUE" ($1 $2)
  if [[ "$1" == *=* ]]; then
    printf '%s' "${1#*=}"
  elif [[ $# -ge 2 ]]; then
    printf '%s' "$2"
  else
    echo "error: $1 needs a value." >&2
    exit 2
  fi
}
while [[ $# -gt 0 ]]; do
  option="${1%%=*}"
  shift_by=1
  [[ "$1" != *=* ]] && shift_by=2
  case "$option" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --per-gpu) per_gpu=1; shift; continue ;;
    --task) task=1; shift; continue ;;
    --) shift; break ;;
    --nodes) nodes="$(value "$@")" ;;
    --gpus-per-node) gpus_per_node="$(value "$@")" ;;
    --port) port="$(value "$@")" ;;
    --coordinator) coordinator="$(value "$@")" ;;
    --num-processes) num_processes="$(value "$@")" ;;
    *) break ;;  # the first run.py argument
  esac
  shift "$shift_by"
done
for number in ${nodes:+"$nodes"} ${gpus_per_node:+"$gpus_per_node"} ${port:+"$port"}; do
  if [[ ! "$number" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: '$number' is not a positive whole number (--nodes, --gpus-per-node, --port)." >&2
    exit 2
  fi
done
if [[ $# -eq 0 ]]; then
  echo "error: no run.py arguments; give at least --config=... and a --workdir every node sees." >&2
  usage >&2
  exit 2
fi

# The repository: where this file lies, unless sbatch ran a copy of it (then the directory
# sbatch was called from, or the one the submitting call of this script exported).
here="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -n "${LAUNCH_REPO_DIR:-}" ]]; then
  repo="$LAUNCH_REPO_DIR"
elif [[ -f "$here/run.py" ]]; then
  repo="$here"
elif [[ -f "${SLURM_SUBMIT_DIR:-}/run.py" ]]; then
  repo="$SLURM_SUBMIT_DIR"
else
  echo "error: cannot find run.py; call sbatch from the repository root." >&2
  exit 2
fi
PYTHON="${PYTHON:-$(test -x "$repo/.venv/bin/python" && echo "$repo/.venv/bin/python" || echo python3)}"

quote() {  # the arguments as one line a shell reads back as the same words
  local word out=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

hostnames() {  # the hosts of the Slurm node list $1, one a line
  if command -v scontrol >/dev/null; then
    scontrol show hostnames "$1"
    return
  fi
  # Without Slurm (--dry-run): the forms "a,b" and "prefix[001-003,7]" of a node list.
  local list="$1" entry prefix ranges range first last width number
  while [[ -n "$list" ]]; do
    if [[ "$list" =~ ^([^,\[]+)\[([^]]*)\](.*)$ ]]; then
      prefix="${BASH_REMATCH[1]}" ranges="${BASH_REMATCH[2]}" list="${BASH_REMATCH[3]#,}"
      IFS=, read -ra entry <<<"$ranges"
      for range in "${entry[@]}"; do
        first="${range%-*}" last="${range#*-}" width="${#first}"
        for ((number = 10#$first; number <= 10#$last; number++)); do
          printf '%s%0*d\n' "$prefix" "$width" "$number"
        done
      done
    else
      echo "${list%%,*}"
      [[ "$list" == *,* ]] && list="${list#*,}" || list=""
    fi
  done
}

# The GPUs process `local_id` of its node uses, as JAX_LOCAL_DEVICE_IDS: CUDA ordinals after
# CUDA_VISIBLE_DEVICES (which Slurm may have set to the job's GPUs, or to the task's own one).
local_device_ids() {
  local local_id="$1" visible count
  IFS=, read -ra visible <<<"${CUDA_VISIBLE_DEVICES:-}"
  if ((per_gpu)); then
    if ((${#visible[@]} == 1)); then echo 0; else echo "$local_id"; fi
    return
  fi
  count="${#visible[@]}"
  if ((count == 0)); then count="${SLURM_GPUS_ON_NODE:-0}"; fi
  if ((count == 0)) && command -v nvidia-smi >/dev/null; then
    count="$(nvidia-smi -L | grep -c '^GPU' || true)"
  fi
  if ((count > 0)); then seq -s, 0 $((count - 1)); fi
}

# The command of one task.
task_command() {  # process_id local_id -> the array `command`
  local ids
  ids="$(local_device_ids "$2")"
  command=(env)
  if [[ -n "$ids" ]]; then command+=("JAX_LOCAL_DEVICE_IDS=$ids"); fi
  command+=("$PYTHON" "$repo/run.py" "${run_args[@]}" --jax_distributed
            "--coordinator_address=$coordinator" "--num_processes=$num_processes"
            "--process_id=$1")
}
run_args=("$@")

if ((task)); then  # one srun task: exec run.py
  if [[ -z "$coordinator" || -z "$num_processes" || -z "${SLURM_PROCID:-}" ]]; then
    echo "error: --task is this script's own, for srun within a job." >&2
    exit 2
  fi
  task_command "$SLURM_PROCID" "${SLURM_LOCALID:-0}"
  echo "launch_slurm: task $SLURM_PROCID on $(hostname): $(quote "${command[@]}")"
  cd "$repo"
  exec "${command[@]}"
fi

# The sbatch command that submits this script, and the srun command inside the job.
task_options=()  # this script's options that the tasks need
if ((per_gpu)); then task_options+=(--per-gpu); fi
own_options=("${task_options[@]}")
if [[ -n "$port" ]]; then own_options+=("--port=$port"); fi
sbatch_command=(sbatch)
if [[ -n "$nodes" ]]; then sbatch_command+=("--nodes=$nodes"); fi
if [[ -n "$gpus_per_node" ]]; then sbatch_command+=("--gpus-per-node=$gpus_per_node"); fi
if ((per_gpu)); then sbatch_command+=("--ntasks-per-node=${gpus_per_node:-8}"); fi
sbatch_command+=("--chdir=$repo" "--export=ALL,LAUNCH_REPO_DIR=$repo"
                 "$repo/scripts/launch_slurm.sh" "${own_options[@]}" "${run_args[@]}")

if ((dry_run)); then
  # Simulated job: the nodes asked for, or those of SLURM_JOB_NODELIST.
  nodes="${nodes:-${SLURM_JOB_NUM_NODES:-2}}"
  tasks_per_node=1
  if ((per_gpu)); then tasks_per_node="${gpus_per_node:-8}"; fi
  export SLURM_GPUS_ON_NODE="${gpus_per_node:-8}"
  unset CUDA_VISIBLE_DEVICES
  node_list="${SLURM_JOB_NODELIST:-$(printf 'node[%03d-%03d]' 1 "$nodes")}"
  mapfile -t hosts < <(hostnames "$node_list")
  nodes="${#hosts[@]}"
  job_id="${SLURM_JOB_ID:-12345}"
  num_processes=$((nodes * tasks_per_node))
else
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then  # not in a job: submit one
    echo "launch_slurm: $(quote "${sbatch_command[@]}")"
    exec "${sbatch_command[@]}"
  fi
  mapfile -t hosts < <(hostnames "$SLURM_JOB_NODELIST")
  job_id="$SLURM_JOB_ID"
  num_processes="${SLURM_NTASKS:-${#hosts[@]}}"
  if ((!per_gpu && num_processes > ${#hosts[@]})); then
    echo "error: $num_processes tasks on ${#hosts[@]} nodes would each use all GPUs of their node; add --per-gpu (one process per GPU) or submit with --ntasks-per-node=1." >&2
    exit 2
  fi
fi
coordinator="${hosts[0]}:${port:-$((20000 + job_id % 20000))}"
srun_command=(srun --kill-on-bad-exit=1 "$repo/scripts/launch_slurm.sh" --task
              "--coordinator=$coordinator" "--num-processes=$num_processes" "${task_options[@]}"
              -- "${run_args[@]}")

if ((dry_run)); then
  echo "# submit (outside a job):"
  quote "${sbatch_command[@]}"
  echo "# in the job (on the first node, $num_processes tasks on $nodes nodes):"
  quote "${srun_command[@]}"
  echo "# each task runs:"
  for ((process_id = 0; process_id < num_processes; process_id++)); do
    task_command "$process_id" $((process_id % tasks_per_node))
    echo "task $process_id on ${hosts[process_id / tasks_per_node]}: $(quote "${command[@]}")"
  done
  exit 0
fi

# shellcheck disable=SC2016  # printed as they are: each task has its own values
task_command '$SLURM_PROCID' '$SLURM_LOCALID'
echo "launch_slurm: $num_processes tasks on ${#hosts[@]} nodes, each: $(quote "${command[@]}")"
echo "launch_slurm: $(quote "${srun_command[@]}")"
exec "${srun_command[@]}"
