#!/usr/bin/env bash
# Train on several GPU hosts as one JAX job: one launch/train.py process per host, every one
# driving all the GPUs of its host (see launch/gpu_multihost.md).
#
#   launch/gpu_multihost.sh [--dry-run] slurm NODES GPUS_PER_NODE -- TRAIN_ARGS...
#       srun, one task per node; JAX reads the SLURM variables itself. Run it inside an
#       allocation (salloc / an sbatch script) from this checkout on the shared file system.
#   launch/gpu_multihost.sh [--dry-run] hosts HOST0,HOST1,... -- TRAIN_ARGS...
#       ssh to every host and start it with the explicit variables JAX_COORDINATOR_ADDRESS
#       (HOST0:PORT), JAX_NUM_PROCESSES and JAX_PROCESS_ID; waits for all, and stops the others
#       as soon as one fails.
#
# TRAIN_ARGS go to launch/train.py; --workdir must be storage every host sees at the same path.
# Environment: PORT (coordinator port on HOST0, default 8476), REMOTE_DIR (the checkout on every
# host, default: this checkout's path), PYTHON (default .venv/bin/python in that checkout).
# Example (prints the commands only):
#   launch/gpu_multihost.sh --dry-run hosts 10.0.0.1,10.0.0.2 -- \
#       --config=experiments/lm.py:hope_760m --workdir=/shared/runs/hope760m \
#       --config.mesh.data=2 --config.mesh.fsdp=8
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
usage() { sed -n '2,20p' "$0" >&2; exit 2; }
MODE="${1:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${REMOTE_DIR:-$ROOT}"
PY="${PYTHON:-.venv/bin/python}"

show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

run() {  # print the command; run it unless --dry-run
  show "$@"
  if [[ $DRY == 0 ]]; then "$@"; fi
}

case "$MODE" in
  slurm)
    [[ $# -ge 4 && "$4" == "--" ]] || usage
    NODES="$2" GPUS="$3"
    shift 4
    [[ $# -gt 0 ]] || usage
    cd "$ROOT"
    # --kill-on-bad-exit: one failed task ends the whole job at once.
    run srun --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS" --kill-on-bad-exit=1 \
      --chdir="$DIR" "$PY" launch/train.py "$@"
    ;;
  hosts)
    [[ $# -ge 3 && "$3" == "--" ]] || usage
    IFS=, read -r -a HOSTS <<< "$2"
    shift 3
    [[ $# -gt 0 && ${#HOSTS[@]} -ge 1 ]] || usage
    ADDRESS="${HOSTS[0]}:${PORT:-8476}"
    PIDS=()
    for i in "${!HOSTS[@]}"; do
      REMOTE="cd $(printf '%q' "$DIR") && JAX_COORDINATOR_ADDRESS=$ADDRESS \
JAX_NUM_PROCESSES=${#HOSTS[@]} JAX_PROCESS_ID=$i$(printf ' %q' "$PY" launch/train.py "$@")"
      show ssh "${HOSTS[$i]}" "$REMOTE"
      if [[ $DRY == 0 ]]; then
        ssh "${HOSTS[$i]}" "$REMOTE" &
        PIDS+=($!)
      fi
    done
    STATUS=0
    for _ in "${PIDS[@]}"; do
      # A failure stops the local ssh of the others; their remote processes are aborted by
      # JAX once the failed one misses its heartbeats (NL_JAX_HEARTBEAT_TIMEOUT_S).
      if ! wait -n; then
        STATUS=1
        kill "${PIDS[@]}" 2>/dev/null || true
      fi
    done
    exit $STATUS
    ;;
  *) usage ;;
esac
