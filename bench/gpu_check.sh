#!/usr/bin/env bash
# GPU check for a lent H100/H200: the full MossFormer2 at batch 12 × 4 s, 48 kHz, fp32 / tf32 / bf16
# (/ bf16 + torch.compile if time is left), features on the GPU: s/batch, samples/s, TFLOP/s, MFU, peak memory
# per ZeRO stage on one rank. Done within BUDGET_S = 180 s, set-up included; writes $OUT/gpu_check.json
# (+ .log, nvidia-smi.txt).
#
# The two device calls, in this order, from the repo root, with nothing else in between:
#
#   0. here, once: make gpu-wheels          # fills .whl/ (git-ignored, ~6 MB) from bench/gpu_wheels.txt
#   1. run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=210)
#   2. run(command="bash bench/gpu_train_check.sh", carry=[".whl"], timeout_s=300)
#   then give_back() at once, unless one of them is rerun straight away.
#
# Start (2–3 min) + 180 s + 270 s ≈ 10–11 minutes of the 15: a rerun of either script still fits. Each script
# stops itself by its budget and keeps what finished; `timeout_s` is 30 s above the budget. Without .whl/ (or
# with an incomplete one) a script stops within seconds with exit 3 and says what is missing.
#
# Without a GPU, the same phases in a reduced form (to know the script runs before device time is spent):
#
#   OUT=/tmp/gpu_check bash bench/gpu_check.sh --device cpu --preset tiny --batch 2 --seconds 1 --steps 2 --warmup 1
#
# Extra arguments go to bench/gpu_check.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
BUDGET_S="${BUDGET_S:-180}"
source bench/_gpu_env.sh

bounded_run gpu_check "$@"
