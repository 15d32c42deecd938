#!/usr/bin/env bash
# One host, several GPUs: one process sees every GPU and the stages spread
# over them (experts' expert axis, the distillation minibatch, evaluation's
# seeds; ccdd_jax/devices/sharding.py). See launch/README.md.
#
#   bash launch/multi_gpu.sh                        # digits, every GPU of this host
#   CONFIG=cifar10_ipc10 DATA=/data/cifar10-jpeg.tar.gz NUM_DEVICES=4 bash launch/multi_gpu.sh
#
# CONFIG    a shipped config's name or a get_config() file (default digits)
# DATA      the data set's path (config.data.root; digits needs none)
# WORKDIR   where every output lands (default runs/multi_gpu)
# NUM_DEVICES  GPUs to use (default 0 = all that CUDA_VISIBLE_DEVICES shows)
# EXTRA     more flags, e.g. "--config.experts.num_experts=16"
# DRY_RUN=1 print the command line and jax.distributed's settings (one JSON
#           line, --dry_run) instead of running: no JAX, nothing written
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-digits}
WORKDIR=${WORKDIR:-runs/multi_gpu}
NUM_DEVICES=${NUM_DEVICES:-0}
EXTRA=${EXTRA:-}
DATA_FLAG=()
if [[ -n "${DATA:-}" ]]; then
  DATA_FLAG=("--config.data.root=$DATA")
fi
DRY=()
if [[ -n "${DRY_RUN:-}" ]]; then
  DRY=(--dry_run)
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Let XLA take the memory it needs as it goes, not 75% of each GPU up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
if [[ -z "${DRY_RUN:-}" ]]; then
  python -c "import jax; print('devices:', jax.devices())"
fi
# shellcheck disable=SC2086  # EXTRA is a list of flags.
python -m ccdd_jax.main --workdir "$WORKDIR" --config "$CONFIG" "${DATA_FLAG[@]}" \
  --num_devices="$NUM_DEVICES" --distributed=off $EXTRA "${DRY[@]}"
if [[ -z "${DRY_RUN:-}" ]]; then
  echo "results in $WORKDIR (report.md, report.json, distilled.npz, ...)"
fi
