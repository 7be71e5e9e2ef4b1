#!/usr/bin/env bash
# GPU training check for a lent H100/H200: launcher/train.py itself on one GPU (torchrun, NCCL, bf16, 4 workers +
# prefetch thread on generated 48 kHz WAV files, validation, checkpoints, resume, ZeRO-3), full preset, batch
# 12 × 4 s. See bench/gpu_train_check.py for the runs. Finishes in under 8 minutes; writes
# $OUT/gpu_train_check.json (+ one .log per run, nvidia-smi.txt).
#
# Same preparation as bench/gpu_check.sh (the wheels in .whl/, see its header), then with the device tool:
#
#   run(command="bash bench/gpu_train_check.sh", carry=[".whl"], timeout_s=540)
#
# Together with bench/gpu_check.sh (5 minutes), as two calls: one call may run 10 minutes at most, and the
# second finds the machine still warm if it follows at once.
#
# Without a GPU, the same runs in a reduced form (to know the script runs before device time is spent):
#
#   OUT=/tmp/gpu_train bash bench/gpu_train_check.sh --device cpu --preset tiny --seconds 1 --steps 8
#
# Extra arguments go to bench/gpu_train_check.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
source bench/_gpu_env.sh

bounded_run 450 gpu_train_check "$@"
