#!/usr/bin/env bash
# The classification part of the quality protocol (issue 14) on one GPU, many runs at once, in at most 9 minutes.
# By default every classification run is redone there, so those figures all come from one machine; the
# causal-LM runs (which need SmolLM2) are kept from benchmarks/results/quality_protocol_runs.json. With
# KEEP=all every finished run is kept and only the missing ones run there (each row names its machine).
# Runs finished before the time limit stay in OUT_DIR/quality_protocol_runs.json, which `--resume --out`
# continues from.
# Where the shipped packages cannot be installed, put the folder scripts/portable_assets.sh writes on PYTHONPATH.
# Usage: bash scripts/gpu_quality.sh OUT_DIR [WORKERS]     (needs torch with CUDA, transformers, peft, pydantic)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash scripts/gpu_quality.sh OUT_DIR [WORKERS]}"
workers="${2:-12}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - "$out" "${KEEP:-lm}" <<'PY' || exit 2
import json, sys
out, keep = sys.argv[1:]
runs = json.load(open("benchmarks/results/quality_protocol_runs.json"))["runs"]
kept = runs if keep == "all" else [r for r in runs if r["task"] == "lm"]
json.dump({"runs": kept}, open(f"{out}/quality_protocol_runs.json", "w"), indent=2)
print(f"kept {len(kept)} of {len(runs)} finished runs (KEEP={keep}); the others run here")
PY
# the unfinished runs' epoch checkpoints stay on this machine, out of what comes back
timeout 530 python3 -m benchmarks.quality --resume --workers "$workers" --out "$out" \
    --checkpoints "${TMPDIR:-/tmp}/quality_checkpoints" 2>&1 \
    | grep --line-buffered -v -e "it/s" -e "Loading weights" -e "Writing model" | tee "$out/gpu_quality.log"
