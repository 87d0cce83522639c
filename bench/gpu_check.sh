#!/usr/bin/env bash
# GPU check (issue: real models on real hardware): one line per check, <= 8 minutes on one GPU.
#   bash bench/gpu_check.sh            # every check; prints CHECK <name>: ok|FAIL ...
# bf16 autocast training, 4-bit and 8-bit QLoRA on SmolLM2 (loss falls over 20 steps), one worker
# per CUDA device with CUDA_VISIBLE_DEVICES set to one device and to all, peak GPU memory per
# worker, training and generation tokens/s next to the CPU.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "CHECK nvidia-smi: FAIL"
fail=0
for c in bf16 4bit 8bit; do timeout 150 "$PY" bench/gpu_check.py --check "$c" 2>/dev/null | grep '^CHECK' || { echo "CHECK $c: FAIL (crashed or timed out)"; fail=1; }; done
all=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
CUDA_VISIBLE_DEVICES=0 timeout 120 "$PY" bench/gpu_check.py --check workers 2>/dev/null | sed 's/^CHECK workers/CHECK workers (CUDA_VISIBLE_DEVICES=0)/' || fail=1
CUDA_VISIBLE_DEVICES=$all timeout 120 "$PY" bench/gpu_check.py --check workers 2>/dev/null | sed "s/^CHECK workers/CHECK workers (CUDA_VISIBLE_DEVICES=$all)/" || fail=1
timeout 150 "$PY" bench/gpu_check.py --check speed 2>/dev/null | grep '^CHECK' || { echo "CHECK speed: FAIL"; fail=1; }
exit $fail
