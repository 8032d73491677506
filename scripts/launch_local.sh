#!/usr/bin/env bash
# N processes of run.py on this machine, connected by JAX's multi-controller runtime: what a
# multi-host run does, on one machine (each process gets its own CPU devices; collectives go
# over gloo). For trying a multi-process run, or debugging one, without a cluster.
#
#   scripts/launch_local.sh 2 --config=configs/vit_digits.py --workdir=/tmp/digits2
#
# Process 0's output comes to this terminal; process i's goes to LOG_DIR/process_i.log. The
# script waits for all processes and exits with the first non-zero status; when one process
# fails, or on Ctrl-C / SIGTERM, the others get SIGTERM (run.py saves a checkpoint and stops),
# then SIGKILL after the grace period.
set -euo pipefail

usage() {
  cat <<EOF
usage: scripts/launch_local.sh [-h] [-d DEVICES] [-p PORT] [-l LOG_DIR] [-g GRACE] N [run.py args...]

Runs N processes of run.py on this machine with --jax_distributed
--coordinator_address=localhost:PORT --num_processes=N --process_id=i.

  N            number of processes
  -d DEVICES   CPU devices per process (JAX_NUM_CPU_DEVICES; default: \$JAX_NUM_CPU_DEVICES or 1)
  -p PORT      coordinator port on localhost (default: a free one)
  -l LOG_DIR   where the output of processes 1..N-1 goes (default: a new temporary directory)
  -g GRACE     seconds between SIGTERM and SIGKILL when stopping the processes (default: 60)
  -h           this message

Runs from the repository root (relative paths in run.py args are relative to it), with
\$PYTHON (default: .venv/bin/python, else python3). Set JAX_PLATFORMS=cpu on a machine with
accelerators to split CPU devices as above.
EOF
}

devices="${JAX_NUM_CPU_DEVICES:-1}"
port=""
log_dir=""
grace=60
while getopts ":hd:p:l:g:" option; do
  case "$option" in
    h) usage; exit 0 ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) log_dir="$OPTARG" ;;
    g) grace="$OPTARG" ;;
    :) echo "error: -$OPTARG needs a value." >&2; usage >&2; exit 2 ;;
    *) echo "error: unknown option -$OPTARG." >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: the first argument must be the number of processes N (a positive integer)." >&2
  usage >&2
  exit 2
fi
num_processes="$1"
shift
for value in "$devices" "$grace" ${port:+"$port"}; do
  if [[ ! "$value" =~ ^[0-9]+$ ]]; then
    echo "error: '$value' is not a number (-d, -g and -p take whole numbers)." >&2
    exit 2
  fi
done

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}"
if [[ -z "$port" ]]; then
  # A port the system calls free now (any Python will do: the system's, else $PYTHON).
  picker="$(command -v python3 || echo "$PYTHON")"
  port="$("$picker" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
log_dir="${log_dir:-$(mktemp -d "${TMPDIR:-/tmp}/launch_local.XXXXXX")}"
mkdir -p "$log_dir"

command=("$PYTHON" run.py "$@" --jax_distributed "--coordinator_address=localhost:$port"
         "--num_processes=$num_processes")
echo "launch_local: $num_processes processes of $devices CPU device(s); logs of processes 1..$((num_processes - 1)) in $log_dir"
echo "launch_local: JAX_NUM_CPU_DEVICES=$devices $(printf '%q ' "${command[@]}")--process_id=<0..$((num_processes - 1))>"

pids=()
stopping=""  # the time the processes were told to stop, once they were
stop_all() {  # SIGTERM to the processes still running; SIGKILL once the grace period is over
  local signal=TERM
  if [[ -z "$stopping" ]]; then
    stopping="$SECONDS"
  elif ((SECONDS - stopping >= grace)); then
    signal=KILL
  else
    return 0
  fi
  for pid in "${pids[@]}"; do
    if [[ -n "$pid" ]]; then kill "-$signal" "$pid" 2>/dev/null || true; fi
  done
}
interrupted=0
# shellcheck disable=SC2329  # called by the traps below
on_signal() {  # Ctrl-C or SIGTERM to this script: stop the processes (a second one kills them)
  interrupted="$1"
  if [[ -n "$stopping" ]]; then stopping=$((SECONDS - grace)); fi
  stop_all
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

for ((index = 0; index < num_processes; index++)); do
  if ((index == 0)); then
    JAX_NUM_CPU_DEVICES="$devices" "${command[@]}" "--process_id=$index" &
  else
    JAX_NUM_CPU_DEVICES="$devices" "${command[@]}" "--process_id=$index" \
      >"$log_dir/process_$index.log" 2>&1 &
  fi
  pids+=("$!")
done

# Poll rather than `wait -n`, which needs bash >= 4.3 and does not say which process ended.
status=0
remaining="$num_processes"
while ((remaining > 0)); do
  for index in "${!pids[@]}"; do
    pid="${pids[index]}"
    if [[ -z "$pid" ]] || kill -0 "$pid" 2>/dev/null; then continue; fi
    code=0
    wait "$pid" || code=$?
    pids[index]=""
    remaining=$((remaining - 1))
    if ((code != 0 && status == 0)); then
      status="$code"
      if ((interrupted == 0)); then
        echo "launch_local: process $index exited with status $code; stopping the others." >&2
        if ((index > 0)); then
          echo "launch_local: the end of $log_dir/process_$index.log:" >&2
          tail -n 20 "$log_dir/process_$index.log" >&2 || true
        fi
      fi
      stop_all
    fi
  done
  if ((remaining > 0)); then
    if [[ -n "$stopping" ]]; then stop_all; fi
    sleep 0.2
  fi
done
if ((interrupted != 0 && status == 0)); then status="$interrupted"; fi
exit "$status"
