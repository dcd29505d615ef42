#!/usr/bin/env bash
# Runs capi_jax pretraining on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [CONFIG] [extra --config.* flags...]
#   e.g. launch/tpu_pod.sh capi-v5p-64 us-east5-a gs://my-bucket/capi_vitl configs/vitl.py \
#            --config.data.dataset=tfds:imagenet2012 --config.data.data_dir=gs://my-bucket/tfds
#
# Every worker runs the same `python -m capi_jax.main` with CAPI_JAX_DISTRIBUTED=1, for which
# capi_jax.engine.distributed calls `jax.distributed.initialize()` with no arguments: on Cloud
# TPU, JAX finds the other workers itself, and each worker drives all its chips. WORKDIR must
# be shared by all workers, a gs:// bucket: checkpoints hold every worker's shards and
# data-iterator position, process 0 holds the workdir's lock and writes the logs. A local path
# is refused (each worker would write its own disk) unless SHARED_WORKDIR=1 says it is a
# filesystem every worker mounts. Pre-emption: a TPU VM maintenance event sends SIGTERM,
# capi_jax checkpoints and exits 0; rerun this script (or a queued-resource retry loop) with
# the same WORKDIR to resume exactly where it stopped. Multi-slice runs (queued resources with
# --node-count) also need --config.sharding.dcn_mesh (README). Tested without a TPU by
# tests/test_launch.py (a fake gcloud runs the remote command on 2 local "workers").
#
# Assumes the repository is checked out at ~/$REPO_DIR (default capi_jax) on every worker, set
# up with `bash launch/setup_env.sh && .venv/bin/pip install -U 'jax[tpu]'`. Copy it with e.g.
#   gcloud compute tpus tpu-vm scp --recurse . TPU_NAME:~/capi_jax --worker=all --zone=ZONE
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,22p' "$0"
  exit 2
fi
TPU_NAME=$1 ZONE=$2 WORKDIR=$3
CONFIG=${4:-configs/vitl.py}
shift $(( $# < 4 ? $# : 4 ))
REPO_DIR=${REPO_DIR:-capi_jax}  # Relative to the home directory, where ssh starts.
if [[ $WORKDIR != gs://* && ${SHARED_WORKDIR:-0} != 1 ]]; then
  echo "error: WORKDIR=$WORKDIR is not gs://: every worker would write its own disk. Use a" \
       "gs:// bucket, or SHARED_WORKDIR=1 for a filesystem all workers mount." >&2
  exit 2
fi

# Quote every argument so that it survives the remote shell unchanged.
ARGS=$(printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd $(printf '%q' "$REPO_DIR") && CAPI_JAX_DISTRIBUTED=1 .venv/bin/python -m capi_jax.main$ARGS
"
