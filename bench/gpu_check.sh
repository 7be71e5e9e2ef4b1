#!/usr/bin/env bash
# GPU check for a lent H100/H200 (issue 7, item 6): the full MossFormer2 at batch 12 × 4 s, 48 kHz, fp32 /
# tf32 / bf16 (/ bf16 + torch.compile), features on the GPU: s/batch, samples/s, TFLOP/s, MFU, peak memory per
# ZeRO stage on one rank. Finishes in under 5 minutes; writes $OUT/gpu_check.json (+ .log, nvidia-smi.txt).
#
# The box has Python 3.12 with torch and torchaudio 2.11 (and einops, numpy, rich, pyyaml, msgpack, ninja,
# psutil, py-cpuinfo, tqdm, packaging, nvidia-ml-py); the rest travels as wheels in .whl/ (git-ignored).
# Prepare them HERE, in the repo root, once (.gitignore keeps /.whl/ out of git):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#       hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing-extensions==4.16.0 rotary-embedding-torch==0.9.1 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
#   # DeepSpeed is published as a source archive only; build its pure-Python wheel (no ops, ~15 s):
#   .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
#
# (pydantic-core must be the version this pydantic pins: `unzip -p .whl/pydantic-2*.whl '*/METADATA' | grep
# pydantic-core`; that pydantic-core needs typing_extensions.Sentinel, hence a recent typing-extensions.
# soundfile (with its libsndfile) and cffi are for bench/gpu_train_check.sh, which reads WAV files.
# Installed into a bare Python 3.12 here, these import.) Then, with the device tool, from the repo root
# (carry .whl, 5 MB):
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=320)
#
# Without a GPU, the same phases in a reduced form (to know the script runs before device time is spent):
#
#   OUT=/tmp/gpu_check bash bench/gpu_check.sh --device cpu --preset tiny --batch 2 --seconds 1 --steps 2 --warmup 1
#
# Extra arguments go to bench/gpu_check.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
source bench/_gpu_env.sh

# 270 s hard stop: with the install and imports above, the whole script stays under 5 minutes.
bounded_run 270 gpu_check "$@"
