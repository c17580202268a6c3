#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, put this code on every worker (copy this checkout, or
# clone a git repository), install, start launch/train.py on all workers at once (one JAX process
# per worker, detached so a dropped ssh does not stop it), follow worker 0's log until training
# ends, then delete the slice.
#
#   launch/tpu_pod.sh [OPTIONS] NAME ZONE TYPE -- TRAIN_ARGS...
#
#   NAME   TPU VM name, e.g. nl-v5p16          ZONE  e.g. us-east5-a
#   TYPE   accelerator type, e.g. v5p-16, v5litepod-16, v6e-16, v4-16
#   TRAIN_ARGS  go to launch/train.py; --workdir must be storage every worker sees at the same
#          path (a GCS bucket mounted with gcsfuse, or NFS): checkpoints are written by all.
#
# OPTIONS
#   --dry-run        print every command, run none
#   --clone URL      git clone URL on the workers instead of copying this checkout
#   --ref REF        with --clone: the branch or tag to check out (default: the default branch)
#   --skip-create    the slice exists already (e.g. a second run, or after --keep)
#   --keep           do not delete the slice at the end
#   --logs           only follow worker 0's log of a run already started (NAME ZONE TYPE; no --)
#
# Example (prints the commands only):
#   launch/tpu_pod.sh --dry-run nl-v5p16 us-east5-a v5p-16 -- \
#       --config=experiments/lm.py:hope_340m --workdir=/mnt/runs/hope340m --config.mesh.fsdp=-1 \
#       --config.mesh.data=1
#
# Environment: PROJECT (gcloud project; default: gcloud's), TPU_VERSION (runtime image; default
# per TYPE below), SPOT=1 (spot capacity), JAX_EXTRA (default "jax[tpu]", pin it to the jax the
# project uses). Before a long run, check the memory per chip from any machine with:
#   python launch/train.py --config=... --compile_only --topology=v5p:2x2x4
set -euo pipefail

DRY=0 KEEP=0 CREATE=1 LOGS_ONLY=0 CLONE="" REF=""
while [[ $# -gt 0 && "$1" == --* && "$1" != "--" ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --keep) KEEP=1 ;;
    --skip-create) CREATE=0 ;;
    --logs) LOGS_ONLY=1 ;;
    --clone) CLONE="${2:?--clone needs a repository URL}"; shift ;;
    --ref) REF="${2:?--ref needs a branch or tag}"; shift ;;
    *) echo "unknown option $1 (allowed: --dry-run --clone URL --ref REF --skip-create --keep" \
         "--logs)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $LOGS_ONLY == 1 && $# -eq 3 ]]; then
  set -- "$@" --
fi
if [[ $# -lt 4 || "$4" != "--" ]]; then
  sed -n '2,31p' "$0" >&2
  exit 2
fi
if [[ -n "$REF" && -z "$CLONE" ]]; then
  echo "--ref only makes sense with --clone" >&2
  exit 2
fi
NAME="$1" ZONE="$2" TYPE="$3"
shift 4
TRAIN_ARGS=("$@")
if [[ $LOGS_ONLY == 0 && ${#TRAIN_ARGS[@]} -eq 0 ]]; then
  echo "no TRAIN_ARGS after --: give at least --config=... and --workdir=..." >&2
  exit 2
fi

case "$TYPE" in
  v5p-*) DEFAULT_VERSION="v2-alpha-tpuv5" ;;
  v5litepod-*) DEFAULT_VERSION="v2-alpha-tpuv5-lite" ;;
  v6e-*) DEFAULT_VERSION="v2-alpha-tpuv6e" ;;
  v4-*) DEFAULT_VERSION="tpu-ubuntu2204-base" ;;
  *) echo "unknown accelerator type $TYPE (v5p-N, v5litepod-N, v6e-N, v4-N)" >&2; exit 2 ;;
esac
VERSION="${TPU_VERSION:-$DEFAULT_VERSION}"
JAX_EXTRA="${JAX_EXTRA:-jax[tpu]}"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && WHERE+=(--project "$PROJECT")
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="/tmp/nl_jax_${NAME}.tar.gz"
# On every worker: the code in ~/nl_jax; the run's output in ~/nl_jax/train.log, its process id
# and exit status beside it (train.pid, train.rc).

run() {  # print the command; run it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY == 0 ]]; then "$@"; fi
}

on_workers() {  # on_workers all|0 COMMAND
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" "--worker=$1" --command "$2"
}

follow_log() {  # worker 0's log until its training process ends; exits with training's status
  on_workers 0 "cd ~/nl_jax && tail -n +1 -F --pid=\$(cat train.pid) train.log; \
exit \$(cat train.rc 2>/dev/null || echo 1)"
}

if [[ $LOGS_ONLY == 1 ]]; then
  follow_log
  exit 0
fi

if [[ $CREATE == 1 ]]; then
  SPOT_FLAG=()
  [[ "${SPOT:-0}" == 1 ]] && SPOT_FLAG=(--spot)
  run "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type "$TYPE" \
    --version "$VERSION" "${SPOT_FLAG[@]}"
fi
delete() { run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }
if [[ $KEEP == 0 && $DRY == 0 ]]; then
  trap delete EXIT
fi

if [[ -n "$CLONE" ]]; then
  BRANCH=""
  [[ -n "$REF" ]] && BRANCH=" --branch $(printf '%q' "$REF")"
  on_workers all "rm -rf ~/nl_jax && git clone --depth 1$BRANCH $(printf '%q' "$CLONE") ~/nl_jax"
else
  # The tracked files of this checkout (no .venv, no runs).
  run bash -c "cd '$ROOT' && git ls-files -z | xargs -0 tar czf '$TARBALL'"
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:~/nl_jax.tar.gz" "${WHERE[@]}" --worker=all
  on_workers all "rm -rf ~/nl_jax && mkdir -p ~/nl_jax && tar xzf ~/nl_jax.tar.gz -C ~/nl_jax"
fi
on_workers all "cd ~/nl_jax && python3 -m venv .venv && .venv/bin/pip install -q -e . \
'$JAX_EXTRA'"

# --distributed=on: every worker joins one JAX run (the coordinator comes from TPU metadata).
# nohup + setsid: the run outlives the ssh session that starts it.
TRAIN="$(printf ' %q' .venv/bin/python launch/train.py --distributed=on "${TRAIN_ARGS[@]}")"
DETACHED="$TRAIN; echo \$? > train.rc"
# Single quotes keep the printed command readable; arguments with quotes of their own get %q.
if [[ "$DETACHED" == *"'"* ]]; then
  DETACHED="$(printf '%q' "$DETACHED")"
else
  DETACHED="'$DETACHED'"
fi
on_workers all "cd ~/nl_jax && rm -f train.rc && setsid nohup sh -c $DETACHED > train.log 2>&1 \
< /dev/null & echo \$! > ~/nl_jax/train.pid"
echo "# training started on every worker; follow it again with: $0 --logs $NAME $ZONE $TYPE"
# Ctrl-C while following stops following, not training: the slice is kept.
trap 'trap - EXIT; echo "# stopped following; $NAME keeps training. Delete it with:" \
  "${GCLOUD[*]} delete $NAME ${WHERE[*]} --quiet"; exit 130' INT
follow_log
trap - INT
if [[ $KEEP == 1 ]]; then
  echo "# kept $NAME; delete it with: ${GCLOUD[*]} delete $NAME ${WHERE[*]} --quiet"
elif [[ $DRY == 1 ]]; then
  delete  # done by the EXIT trap for real
fi
