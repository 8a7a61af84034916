#!/usr/bin/env bash
# Train with a recipe under torchrun:   bash train.sh [RECIPE] [key.sub=value ...]
#   bash train.sh                                   the CPU demo (recipes/tiny/demo.yaml)
#   bash train.sh output.dir=runs/my-demo           the demo into another run directory
#   NPROC_PER_NODE=8 bash train.sh recipes/llava-1.5-7b/projector.yaml visionzip.dominant=108 visionzip.contextual=20
# Multi-node: run on every node with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set (passed to torchrun).
# NPROC_PER_NODE defaults to the number of visible GPUs (1 without GPUs; then DeepSpeed runs on the CPU).
# Rerunning the same command resumes from the run directory's latest checkpoint (train.resume=auto).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$root/tools/ensure_installed.sh" ""  # "": no extras (a bare source would hand it this script's arguments)

recipe="$root/recipes/tiny/demo.yaml"
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then
    recipe="$1"
    shift
fi

# Bad config or missing inputs: a one-paragraph message and exit 2 here, before torchrun starts anything.
run_dir="$(python -m visionzip_tune train "$recipe" "$@" --check)"

gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "$gpus" = "0" ]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
nproc="${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}"

torchrun \
    --nproc_per_node="$nproc" \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${MASTER_PORT:-29500}" \
    -m visionzip_tune train "$recipe" "$@"

echo "run directory: $run_dir"
