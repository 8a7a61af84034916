#!/usr/bin/env bash
# Install lmms-eval for the visionzip plugin and `python -m visionzip_tune eval`, next to any torch build.
#   bash tools/install_eval.sh          (into the active Python; PYTHON=... to choose another)
# setup.cfg's `eval` extra (pip install ".[eval]") is the plain route where torch comes with CUDA. This script is
# for a CPU-only torch: lmms-eval requires torchvision, and PyPI's torchvision wheels need a CUDA torch, so pip
# would replace the CPU torch with a multi-GB CUDA build or add a torchvision that fails to load (and breaks
# transformers' imports). So: lmms-eval without its declared dependencies, the rest of the `eval` extra, and
# what lmms-eval imports on our path (tools/eval-requirements.txt).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
mapfile -t extra < <("$PYTHON" - "$root/setup.cfg" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
print("\n".join(line for line in cfg["options.extras_require"]["eval"].splitlines() if line.strip()))
PY
)
lmms=()
rest=()
for requirement in "${extra[@]}"; do
    case "$requirement" in lmms-eval*) lmms+=("$requirement") ;; *) rest+=("$requirement") ;; esac
done
[ "${#lmms[@]}" -eq 1 ] || { echo "[install_eval] setup.cfg's eval extra names no lmms-eval" >&2; exit 1; }
"$PYTHON" -m pip install --quiet --no-deps "${lmms[0]}"
"$PYTHON" -m pip install --quiet "${rest[@]}" -r "$root/tools/eval-requirements.txt"
