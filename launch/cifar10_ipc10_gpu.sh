#!/usr/bin/env bash
# CIFAR-10 IPC 10 with the paper's settings (configs/cifar10_ipc10.py), experts
# reduced to fit one ~12-minute GPU slot: keygen, experts, distill, evaluate,
# verify, then the report, logs and images are copied to $OUT_DIR.
#
#   bash launch/cifar10_ipc10_gpu.sh                        # the GPU run
#   SMOKE=1 bash launch/cifar10_ipc10_gpu.sh                # minutes-long CPU check
#
# Data: the image-folder tarball at $DATA (default data/cifar10-jpeg.tar.gz,
# git-ignored: copy ../shared/data/cifar10-jpeg.tar.gz there and carry `data`).
# On a machine without ml-collections / scikit-learn their wheels in
# gpu_wheels/ (git-ignored) are installed offline first.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/cifar10-jpeg.tar.gz}
OUT_DIR=${OUT_DIR:-${OUT:-runs}/cifar10_ipc10_gpu}
WORK=${WORK:-$(mktemp -d)}
# What the slot allows (the paper: 100 experts x 50 epochs, 5000 iterations).
EXPERTS=${EXPERTS:-4}
EXPERT_EPOCHS=${EXPERT_EPOCHS:-22}  # max_start_epoch 20 + expert_epochs 2.
ITERATIONS=${ITERATIONS:-2000}
EVAL_EPOCHS=${EVAL_EPOCHS:-1000}
REAL_EPOCHS=${REAL_EPOCHS:-20}
EXTRA=${EXTRA:-}
if [[ -n "${SMOKE:-}" ]]; then  # Tiny everything: checks the script, not the method.
  EXTRA="--config.data.train_subset_per_class=20 --config.data.test_subset_per_class=20 \
--config.model.width=8 --config.distill.max_start_epoch=1 --config.distill.syn_steps=3 \
--config.watermark.queries_per_pattern=10 --config.eval.num_seeds=2 $EXTRA"
  EXPERTS=1 EXPERT_EPOCHS=3 ITERATIONS=3 EVAL_EPOCHS=2 REAL_EPOCHS=1
fi
if [[ ! -f "$DATA" ]]; then
  echo "no CIFAR-10 tarball at $DATA: copy ../shared/data/cifar10-jpeg.tar.gz there" >&2
  exit 1
fi
if ! python -c "import ml_collections, sklearn" 2>/dev/null && compgen -G "gpu_wheels/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps gpu_wheels/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
CACHE_DIR=${CACHE_DIR:-$WORK/cache}
mkdir -p "$OUT_DIR"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT_DIR/device.txt"
git rev-parse HEAD 2>/dev/null | tee "$OUT_DIR/commit.txt" || true
FLAGS="--config=configs/cifar10_ipc10.py --workdir=$WORK/run --config.data.name=folder \
--config.data.root=$DATA --config.data.cache_dir=$CACHE_DIR \
--config.experts.num_experts=$EXPERTS --config.experts.epochs=$EXPERT_EPOCHS \
--config.distill.iterations=$ITERATIONS --config.eval.epochs=$EVAL_EPOCHS \
--config.eval.real_epochs=$REAL_EPOCHS $EXTRA"
start=$(date +%s)
for stage in keygen experts distill evaluate verify; do
  t0=$(date +%s)
  # shellcheck disable=SC2086
  python -m ccdd_jax.main $FLAGS --stage=$stage 2>&1 | tr '\r' '\n' \
    | grep -v -E "^I[0-9]{4}|it/s\]$" | tee -a "$OUT_DIR/run.log"
  echo "stage $stage: $(( $(date +%s) - t0 )) s" | tee -a "$OUT_DIR/run.log"
  for f in report.json report.md experts.json distill.json evaluation.json distilled.png \
           clean_distilled.png timings.json; do
    [[ -f "$WORK/run/$f" ]] && cp "$WORK/run/$f" "$OUT_DIR/"
  done
done
echo "total: $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/run.log"
