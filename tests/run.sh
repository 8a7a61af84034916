#!/usr/bin/env bash
# The test command: installs the package with its test extras if missing, then runs the whole suite.
#   bash tests/run.sh               # everything, slow DeepSpeed/torchrun tests included (as CI does)
#   bash tests/run.sh -m "not slow" # the quick subset
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/tools/ensure_installed.sh" test
cd "$root"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python -m pytest "$@"
