#!/usr/bin/env bash
# N CPU processes on one machine through jax.distributed (localhost), each with fake CPU devices:
# the multi-host code path without a cluster. Works from any directory.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [key=value ...]
#
# Defaults: 2 processes x 4 devices, configs/tiny_cpu.yaml, run_dir=runs/multiprocess, the mesh
# data=2 x fsdp=2 x tensor=2 (the batch axes must give each process its own rows: mesh.data x
# mesh.fsdp a multiple of the process count). Logs: RUN_DIR.process<i>.log. Waits for every process;
# if one fails, the others are stopped and the script exits with the first failure's status.
set -euo pipefail
procs=2; devices=4
while getopts "n:d:" opt; do
  case $opt in n) procs=$OPTARG ;; d) devices=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=$(command -v python3); fi
"$py" -c "import dpok_jax" 2>/dev/null || {
  echo "error: dpok_jax is not importable with $py; install it first (see README.md)" >&2; exit 2; }
port=$("$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
run_dir=runs/multiprocess
for arg in "$@"; do case $arg in run_dir=*) run_dir=${arg#run_dir=} ;; esac; done
mkdir -p "$(dirname "$run_dir")"
pids=()
for ((i = 0; i < procs; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$py" -m dpok_jax.cli train --config configs/tiny_cpu.yaml run_dir="$run_dir" \
    mesh.data=2 mesh.fsdp=2 mesh.tensor=2 train.progress=false \
    mesh.distributed=true mesh.coordinator_address=127.0.0.1:$port mesh.num_processes=$procs \
    mesh.process_id=$i "$@" > "$run_dir.process$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
remaining=("${pids[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
  set +e; wait -n -p done_pid "${remaining[@]}"; rc=$?; set -e
  left=()
  for p in "${remaining[@]}"; do if [ "$p" != "$done_pid" ]; then left+=("$p"); fi; done
  remaining=("${left[@]+"${left[@]}"}")
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then
    status=$rc
    echo "process with pid $done_pid failed (exit $rc); stopping the others. Logs: $run_dir.process*.log" >&2
    kill "${remaining[@]}" 2>/dev/null || true
  fi
done
[ $status -eq 0 ] && echo "all $procs processes finished; logs: $run_dir.process*.log"
exit $status
