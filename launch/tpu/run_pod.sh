#!/usr/bin/env bash
# AdvGame on a Cloud TPU VM pod slice: every worker runs the same command (JAX's
# multi-controller model); jax.distributed finds the peers by itself on TPU VMs
# (advgame_jax.distributed detects TPU_WORKER_HOSTNAMES).
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a bash launch/tpu/run_pod.sh setup   # install, once
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a bash launch/tpu/run_pod.sh train   # run the game
#   DRY_RUN=1 TPU_NAME=x ZONE=y bash launch/tpu/run_pod.sh train          # print only
#
# Environment: TPU_NAME, ZONE (required), PROJECT [gcloud default], REPO_DIR [~/advgame_jax,
# the checkout on every worker], CONFIG [configs/qwen_dpo_md.py], TRAIN_ARGS [extra --config.*
# flags: model paths, judge endpoints reachable from the pod, mesh sizes, e.g.
# --config.mesh.fsdp=-1], WORKDIR [a path every worker can write; checkpoints must be on a
# filesystem all workers share, e.g. a GCS-fuse mount or gs:// path].
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-'~/advgame_jax'}
CONFIG=${CONFIG:-configs/qwen_dpo_md.py}
TRAIN_ARGS=${TRAIN_ARGS:-}
WORKDIR=${WORKDIR:-runs/$TPU_NAME}
PROJECT_FLAG=()
if [ -n "${PROJECT:-}" ]; then PROJECT_FLAG=(--project "$PROJECT"); fi

on_all_workers() {
  local cmd=$1
  printf '+ gcloud compute tpus tpu-vm ssh %s --zone %s --worker=all --command %q\n' \
    "$TPU_NAME" "$ZONE" "$cmd"
  if [ "${DRY_RUN:-0}" != 1 ]; then
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
      --worker=all --command "$cmd"
  fi
}

case "${1:-}" in
  setup)
    on_all_workers "cd $REPO_DIR && python3 -m pip install -e . 'jax[tpu]'"
    ;;
  train)
    on_all_workers "cd $REPO_DIR && python3 launch/train.py --config=$CONFIG --config.workdir=$WORKDIR $TRAIN_ARGS"
    ;;
  *)
    echo "usage: run_pod.sh setup|train (see the header for the environment)" >&2
    exit 2
    ;;
esac
