#!/usr/bin/env bash
# A Cloud TPU VM pod slice (e.g. v4-16: 2 hosts x 4 chips): the same command
# on every worker; jax.distributed.initialize() finds the pod by itself
# (--distributed=on), process 0 writes the files. See launch/README.md.
#
#   TPU=my-pod ZONE=us-central2-b WORKDIR=/mnt/shared/runs/digits bash launch/tpu_pod.sh
#
# Runs from your workstation with gcloud. Expects: the repository at
# $REMOTE_DIR on every worker with its dependencies (pip install -e . and
# jax[tpu]), and WORKDIR (and DATA, if any) on a file system mounted at the
# same path on every worker (Filestore NFS or a gcsfuse mount): TPU VMs do not
# share disks, and every process reads the checkpoints.
#
# DRY_RUN=1 runs the same commands on the workers with --dry_run: each prints
# its command line and what reaches jax.distributed.initialize (one JSON line;
# from TPU_WORKER_HOSTNAMES / TPU_WORKER_ID where the workers set them, else
# JAX's own detection from the TPU metadata); no JAX starts, nothing is written.
set -euo pipefail
: "${TPU:?set TPU to the name of the pod}"
: "${ZONE:?set ZONE to its zone}"
: "${WORKDIR:?set WORKDIR to a directory every worker mounts}"
REMOTE_DIR=${REMOTE_DIR:-ccdd_jax}
CONFIG=${CONFIG:-digits}
EXTRA=${EXTRA:-}
DATA_FLAG=""
if [[ -n "${DATA:-}" ]]; then
  DATA_FLAG="--config.data.root=$DATA"
fi
DRY=""
if [[ -n "${DRY_RUN:-}" ]]; then
  DRY="--dry_run"
fi
COMMON="cd $REMOTE_DIR && PYTHONPATH=\$PWD python -m ccdd_jax.main --workdir $WORKDIR \
--config $CONFIG $DATA_FLAG $EXTRA $DRY"
run_on() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker="$1" --command "$2"
}
# 1. The key, once, on worker 0 alone (a multi-process run refuses to make it),
#    on its CPU: one host of a pod does not bring up the TPU without the others.
run_on 0 "test -f $WORKDIR/owner.key || (export JAX_PLATFORMS=cpu; $COMMON --stage=keygen \
--distributed=off)"
# 2. Every stage on every worker at once. Rerunning resumes where a run stopped.
#    A worker that dies stops the others within --heartbeat_timeout (60 s).
run_on all "$COMMON --distributed=on"
if [[ -z "${DRY_RUN:-}" ]]; then
  echo "results in $WORKDIR on the shared mount (written by process 0, worker 0)"
fi
