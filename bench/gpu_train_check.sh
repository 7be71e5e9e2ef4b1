#!/usr/bin/env bash
# GPU training check for a lent H100/H200: launcher/train.py itself on one GPU (torchrun, NCCL, bf16, 4 workers +
# prefetch thread on generated 48 kHz WAV files, validation, checkpoints, resume, ZeRO-3), full preset, batch
# 12 × 4 s. See bench/gpu_train_check.py for the runs. Done within BUDGET_S = 270 s, set-up included; writes
# $OUT/gpu_train_check.json (+ one .log per run, nvidia-smi.txt).
#
# The second of the two device calls (the order and the preparation are in bench/gpu_check.sh's header):
#
#   run(command="bash bench/gpu_train_check.sh", carry=[".whl"], timeout_s=300)
#   then give_back()
#
# Each torchrun runs in a session of its own: the driver gives each run the time left before the deadline and
# stops its whole process tree when that is spent (or when `timeout` sends SIGTERM); runs that no longer fit
# are reported as skipped.
#
# Without a GPU, the same runs in a reduced form (to know the script runs before device time is spent):
#
#   OUT=/tmp/gpu_train bash bench/gpu_train_check.sh --device cpu --preset tiny --seconds 1 --steps 8
#
# Extra arguments go to bench/gpu_train_check.py (--help lists them); the compiled step (run 5, ~1 min of cold compile)
# starts only with 120 s left: for it alone, run(command="bash bench/gpu_train_check.sh --runs bf16,bf16_compile", ...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
BUDGET_S="${BUDGET_S:-270}"
source bench/_gpu_env.sh

bounded_run gpu_train_check "$@"
