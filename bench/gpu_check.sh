#!/usr/bin/env bash
# One prepared GPU check: bash bench/gpu_check.sh OUT_DIR [--work DIR] [--demo-steps N] [--demo-samples N]
# Runs bench/gpu_check.py (see --help): on a CUDA machine the GPU figures, without one the CPU parts at small sizes.
# The device command for a lent GPU machine (offline, wheels carried in .whl/) is in bench/gpu_check.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
# Install only when something is missing: a lent GPU machine is offline and gets the project and its wheels on
# PYTHONPATH, so pip must not be reached when everything already imports (from /tmp: not merely from this folder).
if ! (cd /tmp && "$PYTHON" -c "import visionzip_tune, transformers, deepspeed, datasets") >/dev/null 2>&1; then
    # "": no extras, not our arguments. A failed install is not the end: each part that cannot import what it needs
    # fails on its own and says so in the report, and the others still give their figures.
    source "$root/tools/ensure_installed.sh" "" || echo "[gpu_check] installing failed; running what imports" >&2
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$root/bench/gpu_check.py" "$@"
