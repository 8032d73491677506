#!/usr/bin/env bash
# One run.py command on every worker of a Cloud TPU VM or pod slice: creates the TPU VM when it
# does not exist (reuses it when it does), ships this checkout to every worker, installs it there
# once, and runs the command with --jax_distributed on all workers at once (JAX reads the
# coordinator, the number of processes and each worker's id from the TPU metadata).
#
#   scripts/launch_tpu_vm.sh --name=my-v4-32 --accelerator-type=v4-32 \
#       --config=configs/vit_pretrain.py:B/16,imagenet2012 --workdir=/mnt/shared/run
#   scripts/launch_tpu_vm.sh --dry-run ...   # print the commands instead of running them
set -euo pipefail

usage() {
  cat <<EOF
usage: scripts/launch_tpu_vm.sh [options] [--] run.py args...

Creates or reuses the TPU VM, copies (or git-pulls) the code to all its workers, and runs
  python run.py <run.py args> --jax_distributed
on all workers (gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...).
Options (environment defaults in brackets; --opt VALUE and --opt=VALUE both work):
  --name NAME                 TPU VM name [\$TPU_NAME, else vit-igpt]
  --zone ZONE                 [\$TPU_ZONE, else us-central2-b]
  --accelerator-type TYPE     used on creation, e.g. v4-8, v4-32, v5litepod-16
                              [\$TPU_ACCELERATOR_TYPE, else v4-8]
  --version VERSION           TPU software version, used on creation
                              [\$TPU_VERSION, else tpu-ubuntu2204-base]
  --project PROJECT           [\$TPU_PROJECT, else gcloud's configured project]
  --spot                      create a Spot VM (run.py saves a checkpoint on preemption)
  --code copy|git             copy: this checkout's files, uncommitted changes included
                              (git ls-files, scp to all workers); git: clone the origin remote
                              and check out this commit (HEAD) on each worker [copy]
  --repo URL                  the repository --code git clones [the origin remote's URL]
  --ref REF                   what --code git checks out [this checkout's HEAD commit]
  --dir DIR                   the code's folder on the workers, relative to the home
                              directory [vit-igpt-jax]
  --setup COMMAND             run in DIR on all workers before run.py [\$TPU_SETUP, else:
                              when .venv is missing, create it with uv (Python 3.11) and
                              install the package and jax[tpu] into it]
  --no-setup                  skip the set-up
  --dry-run                   print the commands, run nothing
  -h, --help                  this message
The workdir must be one that every worker sees (README, "Multi-host").
EOF
}

name="${TPU_NAME:-vit-igpt}"
zone="${TPU_ZONE:-us-central2-b}"
accelerator_type="${TPU_ACCELERATOR_TYPE:-v4-8}"
version="${TPU_VERSION:-tpu-ubuntu2204-base}"
project="${TPU_PROJECT:-}"
spot=0
code=copy
remote_dir=vit-igpt-jax
repository=""
ref=""
jax_version=0.10.2  # pyproject.toml's pin: jax[tpu] brings the matching libtpu
# uv brings a Python >= 3.11 (pyproject.toml) where the TPU image's python3 is older.
default_setup="test -x .venv/bin/python || { python3 -m pip install --quiet --user uv && ~/.local/bin/uv venv --quiet --python 3.11 .venv && ~/.local/bin/uv pip install --quiet --python .venv/bin/python -e . \"jax[tpu]==$jax_version\"; }"
setup="${TPU_SETUP:-$default_setup}"
dry_run=0

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
    --spot) spot=1; shift; continue ;;
    --no-setup) setup=""; shift; continue ;;
    --) shift; break ;;
    --name) name="$(value "$@")" ;;
    --zone) zone="$(value "$@")" ;;
    --accelerator-type) accelerator_type="$(value "$@")" ;;
    --version) version="$(value "$@")" ;;
    --project) project="$(value "$@")" ;;
    --code) code="$(value "$@")" ;;
    --dir) remote_dir="$(value "$@")" ;;
    --repo) repository="$(value "$@")" ;;
    --ref) ref="$(value "$@")" ;;
    --setup) setup="$(value "$@")" ;;
    *) break ;;  # the first run.py argument
  esac
  shift "$shift_by"
done
if [[ "$code" != copy && "$code" != git ]]; then
  echo "error: --code is '$code'; use copy or git." >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "error: no run.py arguments; give at least --config=... (and a --workdir every worker sees)." >&2
  usage >&2
  exit 2
fi

cd "$(dirname "$0")/.."

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
run() {  # print the command; run it unless --dry-run
  if ((dry_run)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
if [[ -n "$project" ]]; then where+=("--project=$project"); fi
on_all_workers() {  # run the shell command $1 on every worker
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$1"
}

# 1. The TPU VM: reuse it when it exists.
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator_type"
        "--version=$version")
if ((spot)); then create+=(--spot); fi
if ((dry_run)); then
  quote "${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format=value\(state\)
  echo "# only when the describe above fails (no such TPU VM):"
  quote "${create[@]}"
elif "${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' >/dev/null 2>&1; then
  echo "launch_tpu_vm: reusing the TPU VM $name in $zone." >&2
else
  run "${create[@]}"
fi

# 2. The code on every worker.
if [[ "$code" == copy ]]; then
  archive="${TMPDIR:-/tmp}/vit-igpt-jax-$$.tar.gz"
  if ((dry_run)); then
    echo "git ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$archive") --null -T -"
  else
    trap 'rm -f "$archive"' EXIT
    git ls-files -z --cached --others --exclude-standard | tar -czf "$archive" --null -T -
  fi
  run "${gcloud_tpu[@]}" scp "$archive" "$name:vit-igpt-jax.tar.gz" "${where[@]}" --worker=all
  on_all_workers "mkdir -p $(quote "$remote_dir") && tar -xzf vit-igpt-jax.tar.gz -C $(quote "$remote_dir")"
else
  if [[ -z "$repository" ]] && ! repository="$(git remote get-url origin 2>/dev/null)"; then
    echo "error: --code git needs --repo URL (this checkout has no 'origin' remote)." >&2
    exit 2
  fi
  ref="${ref:-$(git rev-parse HEAD)}"
  if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
    echo "launch_tpu_vm: warning: uncommitted changes are not shipped with --code git." >&2
  fi
  on_all_workers "{ test -d $(quote "$remote_dir")/.git || git clone --quiet $(quote "$repository") $(quote "$remote_dir"); } && cd $(quote "$remote_dir") && git fetch --quiet origin $(quote "$ref") && git checkout --quiet FETCH_HEAD"
fi

# 3. The same command on all workers, at once.
python_command=(.venv/bin/python run.py "$@" --jax_distributed)
echo "launch_tpu_vm: on every worker of $name: $(quote "${python_command[@]}")" >&2
remote="cd $(quote "$remote_dir")"
if [[ -n "$setup" ]]; then remote+=" && { $setup; }"; fi
on_all_workers "$remote && $(quote "${python_command[@]}")"
