#!/usr/bin/env bash
# The GPU checks of DCFT's serving path, in one run of at most 8 minutes on one GPU:
#   1. the fast tests of the method, the one-op layer, the model runner, the classify graphs and the engine
#      on CUDA (the real-weights ones left out);
#   2. the decode benchmark in bf16 (random weights in SmolLM2-135M's and Llama-3.2-1B's shapes): the decoder's
#      runner on the bare model, DCFT with every row bare and with 64 distinct adapters, 1/8/32 rows at
#      contexts 128 and 512, eager and replayed from CUDA graphs, with the dispatch table:
#      decode_cuda_{smollm2,llama-1b}[_graphs].{json,md};
#   3. the whole-model benchmark at GPU sizes in bf16 (MiniLM classify, SmolLM2 and Llama-1B prefill and
#      decode): bare vs DCFT, eager and replayed from CUDA graphs: forward_cuda.{json,md,png};
#   4. the layer benchmark, torch path vs each Triton kernel mode, if time is left.
# Usage: bash scripts/gpu_kernels.sh OUT_DIR     (needs torch with CUDA, triton, transformers, pydantic)
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
# the CPU kernel builds once per machine (~25 s), here rather than in eight test workers at once
timeout 120 python3 -c "from adapters.kernels import ops; print('CPU kernel:', ops.cpu_kernel())" 2>&1 | tee -a "$log"
timeout 100 python3 -m pytest -q -p no:cacheprovider -n 8 -m "not real and not slow" --continue-on-collection-errors \
    -rfE --tb=line tests/adapters tests/serving/test_runner.py tests/serving/test_engine.py \
    tests/serving/test_graphs.py tests/benchmarks/test_bench_decode.py 2>&1 | tail -60 | tee -a "$log" || status=1
for lm in smollm2 llama-1b; do
    for graphs in "" graphs; do
        name="decode_cuda_${lm}${graphs:+_graphs}"
        timeout 75 python3 -m benchmarks.decode --device cuda --dtype bfloat16 --lm "$lm" --random-weights \
            --rounds 5 --mode ${graphs:-eager} --name "$name" --out "$out" 2>&1 | quiet | tee -a "$log" || status=1
    done
done
timeout 150 python3 -m benchmarks.forward --gpu-sizes --systems dcft --device cuda --name forward_cuda --out "$out" \
    2>&1 | quiet | tee -a "$log" || status=1
if (( SECONDS < 400 )); then
    timeout 60 python3 -m benchmarks.kernels --dtype bfloat16 --out "$out" 2>&1 | tee -a "$log" || status=1
fi
echo "done in ${SECONDS}s" | tee -a "$log"
exit $status
