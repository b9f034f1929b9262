#!/usr/bin/env bash
# TPU pod slice: the same command on every host; jax.distributed.initialize() discovers the slice.
# Usage: launch/tpu_pod.sh TPU_NAME ZONE [key=value ...]
set -euo pipefail
name=$1; zone=$2; shift 2
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd dpok_jax && pip install -q -e '.[tpu]' && dpok train --config configs/llama3_1_8b_tpu_pod.yaml $*"
