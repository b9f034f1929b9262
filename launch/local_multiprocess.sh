#!/usr/bin/env bash
# Two CPU processes on one machine, to exercise the multi-host code path without a cluster.
set -euo pipefail
for i in 0 1; do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i \
    dpok train --config configs/tiny_cpu.yaml mesh.distributed=true run_dir=runs/multiprocess "$@" &
done
wait
