#!/usr/bin/env bash
# Does longer distillation close the Acc / Acc_W gap on digits? Trains the
# default experts once, then distils, evaluates and verifies for each number
# of iterations and each beta, and copies the reports to $OUT_DIR.
#
#   OUT_DIR=runs/iters ITERS="200 1000 3000" BETAS="0 0.5" bash launch/digits_iterations.sh
#
# On a machine without ml-collections / scikit-learn, put their wheels in
# gpu_wheels/ (git-ignored) and they are installed offline first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-runs/iterations}
ITERS=${ITERS:-"200 1000 3000"}
BETAS=${BETAS:-"0 0.5"}
EXTRA=${EXTRA:-}
WORK=${WORK:-$(mktemp -d)}
if ! python -c "import ml_collections, sklearn" 2>/dev/null && compgen -G "gpu_wheels/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps gpu_wheels/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT_DIR"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT_DIR/device.txt"
base=$WORK/base
python -m ccdd_jax.main --workdir "$base" --stage=keygen $EXTRA
python -m ccdd_jax.main --workdir "$base" --stage=experts $EXTRA 2>&1 | grep -v "^I1" | tee "$OUT_DIR/experts.log"
cp "$base/experts.json" "$OUT_DIR/"
for beta in $BETAS; do
  for it in $ITERS; do
    run=$WORK/beta${beta}_it${it}
    mkdir -p "$run"
    cp -p "$base/owner.key" "$run/"
    ln -sfn "$base/trajectories" "$run/trajectories"
    cp "$base/experts.json" "$run/"
    start=$(date +%s)
    for stage in distill evaluate verify; do
      python -m ccdd_jax.main --workdir "$run" --stage=$stage --config.distill.iterations=$it \
        --config.distill.beta=$beta $EXTRA 2>&1 | tr '\r' '\n' | grep -E "eq. 10|Acc|verified" || true
    done
    echo "beta $beta iterations $it: $(( $(date +%s) - start )) s"
    mkdir -p "$OUT_DIR/beta${beta}_it${it}"
    cp "$run"/report.json "$run"/report.md "$run"/distilled.png "$OUT_DIR/beta${beta}_it${it}/"
  done
done
