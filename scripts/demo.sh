#!/usr/bin/env bash
# The main job on a fresh machine: install, then train -> publish -> serve -> query -> shut down.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/dcft ] || bash scripts/install.sh
exec .venv/bin/dcft demo "$@"
