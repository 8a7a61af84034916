#!/usr/bin/env bash
# Train with a recipe under torchrun:   bash train.sh [RECIPE] [key.sub=value ...]
#   bash train.sh                                   the CPU demo (recipes/tiny/demo.yaml)
#   bash train.sh output.dir=runs/my-demo           the demo into another run directory
#   NPROC_PER_NODE=8 bash train.sh recipes/llava-1.5-7b/projector.yaml visionzip.dominant=108 visionzip.contextual=20
# One node: NPROC_PER_NODE processes (default: the visible GPUs; 1 on the CPU) and a free rendezvous port.
# Several nodes: the same command on every node with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set.
# Rerunning the same command resumes from the run directory's latest checkpoint (train.resume=auto).
# Exit status: 0 done; 2 bad input (one paragraph says what and where); 75 stopped by a signal (SIGTERM, SIGINT,
# SIGUSR1) after a checkpoint: run the same command to resume.
# Waits: a start phase (weights, data, ops, rendezvous, first batch) that lasts over VZT_WAIT_REPORT_S seconds
# (default 30) is reported with what it waits on, for every rank; ranks stop after VZT_PROCESS_GROUP_TIMEOUT_S
# seconds (default: torch's 30 minutes) without a peer, naming it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$root/tools/ensure_installed.sh" ""  # no extras (a bare source would pass this script's arguments)

args=("$@")
if [ $# -eq 0 ] || [[ "$1" == *=* ]]; then
    args=("$root/recipes/tiny/demo.yaml" "$@")
fi
exec python -m visionzip_tune launch "${args[@]}"
