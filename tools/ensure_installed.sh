#!/usr/bin/env bash
# Make visionzip_tune importable in the current Python, installing only what is missing.
# Usage: source tools/ensure_installed.sh [EXTRAS]     e.g. EXTRAS=test
# torch is installed only when absent, and then as the CPU build that lies on the package index here
# (torch==2.13.0): a GPU user's own torch build is never replaced.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_extras="${1:-}"
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[visionzip_tune] torch not found: installing torch==2.13.0 (CPU build)" >&2
    "$PYTHON" -m pip install --progress-bar on "torch==2.13.0"
fi

_probe="import visionzip_tune, transformers, deepspeed, peft, datasets, matplotlib"
[ "$_extras" = "test" ] && _probe="$_probe, pytest, pytest_timeout, wandb, av"
# Reinstall when an import fails, when another checkout is installed, or when the install predates the lmms-eval
# entry point (setup.cfg), which only an install registers.
if ! (cd /tmp && "$PYTHON" -c "$_probe" >/dev/null 2>&1) \
   || ! "$PYTHON" -c "import visionzip_tune, sys, os; sys.exit(0 if os.path.realpath(visionzip_tune.__path__[0]).startswith(os.path.realpath('$_root')) else 1)" >/dev/null 2>&1 \
   || ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(0 if m.entry_points(group='lmms_eval.models', name='visionzip') else 1)" >/dev/null 2>&1; then
    _spec="$_root"
    [ -n "$_extras" ] && _spec="$_root[$_extras]"
    echo "[visionzip_tune] installing $_spec and what it needs (a few minutes the first time)" >&2
    "$PYTHON" -m pip install --progress-bar on -e "$_spec"
fi

# DeepSpeed JIT-builds its C++ CPU ops (ZeRO-Offload's CPU Adam: about a minute; the launcher builds it before the
# ranks start) on first use: keep them per user and per Python environment, so every later run reuses them and two
# virtualenvs (different torch headers) never rebuild each other's.
if [ -z "${TORCH_EXTENSIONS_DIR:-}" ]; then
    _env_id="$("$PYTHON" -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])')"
    export TORCH_EXTENSIONS_DIR="$HOME/.cache/visionzip_tune/torch_extensions/$_env_id"
fi
