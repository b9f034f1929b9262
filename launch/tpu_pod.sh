#!/usr/bin/env bash
# TPU pod slice: copy this repository to every worker, install it into a virtual environment with a
# supported Python (3.11-3.13; the venv lives in ~/dpok_venv and survives code updates), and run the same command on every host; jax.distributed.initialize()
# discovers the slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [key=value ...]      (run from anywhere)
#
# Environment: PYTHON (the interpreter on the workers, default python3.11, else python3 if it is
# 3.11-3.13), CONFIG (default configs/llama3_1_8b_tpu_pod.yaml), REMOTE_DIR (default ~/dpok_jax).
# run_dir must be a place every worker reaches: a gs://bucket/path URL (then install gcsfs and
# google-cloud-storage into ~/dpok_venv as well; see docs/training.md), NFS/Filestore or gcsfuse:
# orbax writes each host's shards into the same checkpoint.
# Preemption (spot/preemptible TPU VMs): the VM gets SIGTERM; dpok saves a checkpoint after the step
# in flight and exits with status 143. Run the same command again when the slice is back: it resumes
# exactly from the saved step.
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 TPU_NAME ZONE [key=value ...]" >&2; exit 2; fi
name=$1; zone=$2; shift 2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote=${REMOTE_DIR:-dpok_jax}
config=${CONFIG:-configs/llama3_1_8b_tpu_pod.yaml}
archive=$(mktemp -t dpok_jax.XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git -C "$root" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$name":dpok_jax.tar.gz --zone "$zone" --worker=all
setup="set -e; rm -rf $remote && mkdir -p $remote && tar -xzf dpok_jax.tar.gz -C $remote && cd $remote
py=\${PYTHON:-python3.11}; command -v \$py >/dev/null || py=python3
\$py -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 13), sys.version' \
  || { echo \"need Python 3.11-3.13 on the TPU VM (set PYTHON=...)\" >&2; exit 2; }
[ -d ~/dpok_venv ] || \$py -m venv ~/dpok_venv
~/dpok_venv/bin/pip install -q -e '.[tpu]'"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$setup"
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd $remote && ~/dpok_venv/bin/dpok train --config $config mesh.distributed=true $*"
