#!/bin/bash
# Every GPU check and benchmark in one device call, most valuable first; each part has its own time limit,
# so one failure or hang costs only its slot. Tables go to stdout and to $OUT/*.md.
# Before spending device time: `python -m pytest -m slow tests/test_benchmarks.py` runs every script on the CPU.
# Usage (repo root, on the GPU machine; bench_local/ holds the fla wheel copied from ../shared/bench/wheels):
#   bash benchmarks/run_gpu.sh [lightning grouped_matmul moe decode_parts generate decode_flags train softmax_attention
#                               train_long]
set -o pipefail
OUT=${OUT:-/tmp/m1jax_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fla-site bench_local/*.whl \
  && export PYTHONPATH=$PWD:/tmp/fla-site:${PYTHONPATH:-} || export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, triton; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'triton', triton.__version__, jax.devices())" 2>&1 | tee -a "$OUT/env.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/env.txt"

part() {  # part NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  echo; echo "=== $name (limit ${secs}s) ==="
  local t0=$(date +%s)
  timeout --kill-after=5 "$secs" "$@" 2>&1 | grep -v -i -E "warn|^\s*$" | tee "$OUT/$name.md"
  echo "=== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 ))s ==="
}

# Parts to run: the arguments, or all of them.
for p in ${@:-lightning grouped_matmul moe decode_parts generate train}; do
  case $p in
    lightning) part lightning "${T_LIGHTNING:-290}" python3 benchmarks/lightning_attention.py ;;
    grouped_matmul) part grouped_matmul "${T_GMM:-70}" python3 benchmarks/grouped_matmul.py ;;
    moe) part moe "${T_MOE:-70}" python3 benchmarks/moe.py ;;
    decode_parts) part decode_parts "${T_DECODE_PARTS:-60}" python3 benchmarks/decode_parts.py ;;
    generate) part generate "${T_GENERATE:-110}" python3 benchmarks/generate.py ;;
    decode_flags)  # batch-1 decode with XLA's command buffers (CUDA graphs) off, default, and over while loops
      for variant in "off:--xla_gpu_enable_command_buffer=" "default:" \
          "while:--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"; do
        part "decode_flags_${variant%%:*}" "${T_DECODE_FLAGS:-50}" env XLA_FLAGS="${variant#*:}" \
          python3 benchmarks/generate.py --batches 1 --dispatch auto --no-transformers --budget-s 35
      done ;;
    train) part train "${T_TRAIN:-80}" python3 benchmarks/train_step.py ;;
    softmax_attention) part softmax_attention "${T_SOFTMAX:-90}" python3 benchmarks/softmax_attention.py ;;
    train_long)  # one 32K-token sequence: blockwise softmax layers (their scores would take 68 GB)
      part train_long "${T_TRAIN_LONG:-120}" python3 benchmarks/train_step.py --seq 32768 --batch 1 ;;
    *) echo "unknown part $p" ;;
  esac
done
