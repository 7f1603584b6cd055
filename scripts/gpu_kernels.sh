#!/usr/bin/env bash
# The GPU half of the fused DCFT kernels (issue 12), in one run of at most 9.5 minutes (about 5 expected) on one GPU:
#   1. the kernel tests compiled on CUDA (every interpreter case, then one autotuned), and the
#      method's layer and math tests on the GPU (the real-weights ones left out);
#   2. the layer benchmark, torch path vs Triton kernels, bf16 on every model's shapes, then fp32 on MiniLM's;
#   3. the whole-model benchmark's smoke run on CUDA in bf16, once per kernel mode (tiny random models:
#      the serving model end to end through the kernels; its times say little).
# Usage: bash scripts/gpu_kernels.sh OUT_DIR     (needs torch with CUDA, triton, transformers, pydantic)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import pydantic" || { echo "pydantic is missing: install its wheels first"; exit 2; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" \
    | tee "$out/gpu_kernels_env.txt" || exit 2
status=0
timeout 180 python3 -m pytest -q -p no:cacheprovider -m "not real" tests/adapters/test_kernels.py tests/adapters/test_functional.py \
    tests/adapters/test_layer.py 2>&1 | tee "$out/gpu_kernels_tests.log" || status=1
timeout 210 python3 -m benchmarks.kernels --dtype bfloat16 --out "$out" 2>&1 | tee "$out/gpu_kernels_bf16.log" || status=1
timeout 60 python3 -m benchmarks.kernels --dtype float32 --models minilm --out "$out" 2>&1 \
    | tee "$out/gpu_kernels_fp32.log" || status=1
for mode in triton triton-fused torch; do
    timeout 40 python3 -m benchmarks.forward --smoke --device cuda --dtype bfloat16 --kernels "$mode" \
        --name "forward_smoke_cuda_$mode" --out "$out" 2>&1 | tee "$out/gpu_forward_smoke_$mode.log" || status=1
done
exit $status
