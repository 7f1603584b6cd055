#!/usr/bin/env bash
# The GPU checks of the fused DCFT kernels (issue 12), in one run of at most 9 minutes on one GPU:
#   1. the fast tests of the method, backbones, training and engine on CUDA (the real-weights ones left out);
#   2. the whole-model benchmark at GPU sizes in bf16 (random weights of MiniLM's, SmolLM2's and
#      Llama-3.2-1B's shapes; bare vs DCFT through the kernels vs PEFT LoRA): forward_cuda.{json,md,png};
#   3. the layer benchmark, torch path vs each Triton kernel mode, bf16 on every model's shapes: kernels.*.
# Usage: bash scripts/gpu_kernels.sh OUT_DIR     (needs torch with CUDA, triton, transformers, peft, pydantic)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import pydantic" || { echo "pydantic is missing: install its wheels first"; exit 2; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))" | tee "$out/gpu.log" || exit 2
status=0
timeout 130 python3 -m pytest -q -p no:cacheprovider -n 8 -m "not real and not slow" --continue-on-collection-errors \
    tests/adapters tests/backbones tests/training tests/serving/test_engine.py 2>&1 | tail -40 \
    | tee -a "$out/gpu.log" || status=1
timeout 250 python3 -m benchmarks.forward --gpu-sizes --device cuda --name forward_cuda --out "$out" 2>&1 \
    | grep -v -e USDT -e FutureWarning -e 'return forward_call' | tee -a "$out/gpu.log" || status=1
timeout 170 python3 -m benchmarks.kernels --dtype bfloat16 --out "$out" 2>&1 | tee -a "$out/gpu.log" || status=1
exit $status
