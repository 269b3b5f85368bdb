#!/bin/bash
# The GPU checks of issue 12 in one run of about 8 minutes on one H100/H200, on random-init models of the real
# shapes (no weights needed): the fused prefix kernel against the reference, throughput per shape with each
# prefix kernel, and one seed of the `gpu` profile (its rows are marked random_init).
#
#     benchmarks/gpu_checks.sh OUT_DIR [PYTHON]        # or: make bench-gpu OUT=OUT_DIR
#
# Writes OUT_DIR/*.json and *.log, and OUT_DIR/timeline.log (seconds since the start, per step). Each step has
# a time limit and the script goes on when one fails or times out. $LLMFT_RANDOM_TOKENIZER (a tokenizer
# directory) is used where set; otherwise the embedded SmolLM2 tokenizer.
set -u
OUT=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR [PYTHON]}
PY=${2:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
TOK=()
[ -n "${LLMFT_RANDOM_TOKENIZER:-}" ] && TOK=(--tokenizer "$LLMFT_RANDOM_TOKENIZER")
F="Convert\|Loading\|Warning\|warn\|it/s\]"
S=$(date +%s)
el() { echo "[$(( $(date +%s) - S )) s] $*" | tee -a "$OUT/timeline.log"; }
bench() {  # bench LIMIT_S NAME ARGS...: bench_gpu.py at tf32, output appended to bench.log
  local limit=$1 name=$2; shift 2
  timeout "$limit" "$PY" benchmarks/bench_gpu.py --dtype tf32 "${TOK[@]}" --json "$OUT/bench_$name.json" "$@" 2>&1 \
    | grep -v "$F" | tee -a "$OUT/bench.log"
  el "$name"
}
el start
timeout 60 "$PY" benchmarks/check_split_kernels.py --json "$OUT/kernels_check.json" 2>&1 | grep -v "$F" \
  | tee "$OUT/kernels_check.log"
el kernel check
bench 45 smollm2_math --shapes smollm2-135m --only icl --ks 0,16 --split-kernel auto
bench 120 smollm2_fused --shapes smollm2-135m --split-kernel fused --kernels 14 --n-teacher 4096 \
  --train 256:bf16:ckpt,1024:bf16:ckpt,256:bf16:-
bench 60 opt125m_fused --shapes opt-125m --split-kernel fused --n-teacher 4096 --train 1024:bf16:ckpt
bench 70 opt13b_fused --shapes opt-1.3b --split-kernel fused --n 2000 --n-full 200 --n-teacher 2048 \
  --train 256:bf16:ckpt
RUN=$(mktemp -d)
LLMFT_SPLIT_KERNEL=fused timeout 150 "$PY" tools/study_direct.py run --profile gpu --out "$RUN" \
  --model random:smollm2-135m --seeds 0 --deadline 130 2>&1 | grep -v "$F" | tee "$OUT/gpu_profile_seed0.log"
cp "$RUN/direct_run.json" "$OUT/gpu_profile_seed0_steps.json" 2>/dev/null
el gpu profile seed 0
