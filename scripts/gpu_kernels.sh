#!/usr/bin/env bash
# The GPU checks of the fused DCFT kernels (issue 12), in one run of at most 8 minutes on one GPU:
#   1. the fast tests of the method, backbones, training and engine on CUDA (the real-weights ones left out);
#   2. the whole-model benchmark at GPU sizes in bf16 (random weights of MiniLM's, SmolLM2's and
#      Llama-3.2-1B's shapes): bare vs DCFT through the kernels, eager and replayed from CUDA graphs,
#      with host and device profiles where DCFT is short of its target: forward_cuda.{json,md,png};
#   3. the layer benchmark, torch path vs each Triton kernel mode, bf16 on every model's shapes;
#   4. PEFT's mixed LoRA on the classify and prefill workloads, if time is left (forward_cuda_peft.*).
# Usage: bash scripts/gpu_kernels.sh OUT_DIR     (needs torch with CUDA, triton, transformers, peft, pydantic)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
log="$out/gpu.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
quiet() { grep -v -e USDT -e FutureWarning -e 'return forward_call' -e 'Loading weights' -e 'Writing model'; }
python3 -c "import pydantic" || { echo "pydantic is missing: install its wheels first"; exit 2; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))" | tee "$log" || exit 2
status=0
timeout 120 python3 -m pytest -q -p no:cacheprovider -n 8 -m "not real and not slow" --continue-on-collection-errors \
    -rfE --tb=line tests/adapters tests/backbones tests/training tests/serving/test_engine.py tests/serving/test_graphs.py \
    tests/benchmarks/test_bench_forward.py 2>&1 | tail -60 \
    | tee -a "$log" || status=1
timeout 200 python3 -m benchmarks.forward --gpu-sizes --systems dcft --device cuda --name forward_cuda --out "$out" \
    2>&1 | quiet | tee -a "$log" || status=1
timeout 120 python3 -m benchmarks.kernels --dtype bfloat16 --out "$out" 2>&1 | tee -a "$log" || status=1
timeout 90 python3 -m benchmarks.forward --gpu-sizes --systems peft-lora --workloads classify prefill --device cuda \
    --name forward_cuda_peft --out "$out" 2>&1 | quiet | tee -a "$log" || status=1
exit $status
