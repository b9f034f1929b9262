#!/usr/bin/env bash
# Two CPU processes on one machine, to exercise the multi-host code path without a cluster.
set -euo pipefail
for i in 0 1; do
  JAX_PLATFORMS=cpu dpok train --config configs/tiny_cpu.yaml run_dir=runs/multiprocess \
    mesh.distributed=true mesh.coordinator_address=127.0.0.1:12355 mesh.num_processes=2 \
    mesh.process_id=$i "$@" &
done
wait
