#!/usr/bin/env bash
# A/B benches of this build against parity-before (4449bee), one device call.
# (The ad-hoc script of the 2026-12-06 H200 lease, kept as it ran; its
# successor in the repository is scripts/gpu-ab.)
cd "$(dirname "$0")/../.."
M=/tmp/model.gguf
B=.device/bin
export PARITY_FIXTURES=$PWD/fixtures
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
bench() { echo "== $*"; "$@" 2>&1 | grep -E "median|arithmetic|steps with|rror" ; }
for exe in parity-before parity; do
  bench $B/$exe bench --backend cuda --model $M --numerics exact --tokens 512 --checkpoints none,all --repeat 5
  bench $B/$exe bench --backend cuda --model $M --numerics exact --tokens 1 --decode 128 --checkpoints none,all --repeat 5
done
bench env QWEN2_PARITY_CUDA_GEMV_STAGE=0 $B/parity bench --backend cuda --model $M --numerics exact --tokens 1 --decode 128 --checkpoints none --repeat 5
bench env QWEN2_PARITY_CUDA_MATMUL=f16 $B/parity bench --backend cuda --model $M --numerics exact --tokens 512 --decode 128 --checkpoints none --repeat 5
bench env QWEN2_PARITY_CUDA_MATMUL=tf32 $B/parity bench --backend cuda --model $M --numerics exact --tokens 512 --checkpoints none --repeat 5
echo "== f16 run vs llama.cpp (ggml numerics)"; QWEN2_PARITY_CUDA_MATMUL=f16 timeout 120 $B/parity run --model $M --backend cuda --prompt "Write a haiku about GPU computing" --decode 8 2>&1 | grep -v "^ours-cuda \[\|^llama.cpp:\|^sha256" | tail -14
echo "== exact run vs llama.cpp"; timeout 120 $B/parity run --model $M --backend cuda --prompt "Write a haiku about GPU computing" --decode 8 2>&1 | grep -v "^ours-cuda \[\|^llama.cpp:\|^sha256" | tail -14
