# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# The venv is rebuilt only when pyproject.toml changes, so a second run is quick.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_DIR ?= runs/demo

export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
# One ninja for every build of DeepSpeed's JIT op: the venv's and the system's hash build commands
# differently, and a mix rebuilds the op (~1 min) on every switch.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv demo story test clean gpu-wheels

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@# DeepSpeed compiles its CPU comm op on first use (~50 s); do it once here, cached afterwards.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

DEMO_PORT ?= 29511
DEMO_ARGS := --ds_config ds_configs/bs4.json --config recipes/demo_cpu.yaml

# The main job: the demo corpus, the plan card, then a real 2-rank DeepSpeed training on CPU.
demo: $(STAMP)
	$(BIN)/python -m data.demo runs/demo_corpus
	$(BIN)/python -m launcher.plan $(DEMO_ARGS)
	rm -rf runs/demo
	$(BIN)/deepspeed --num_gpus 2 --master_port $(DEMO_PORT) launcher/train.py $(DEMO_ARGS)
	$(BIN)/python -m launcher.report runs/demo --out runs/demo/loss.png

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs

# The story, reproduced: batch 4 × accumulation 3 and batch 12 × 1 at the same global batch of 24,
# trained on the demo corpus; runs/story.png shows the two loss curves against samples seen.
story: $(STAMP)
	$(BIN)/python -m data.demo runs/demo_corpus
	rm -rf runs/story_bs4 runs/story_bs12
	$(BIN)/deepspeed --num_gpus 2 --master_port $(DEMO_PORT) launcher/train.py --ds_config ds_configs/base.json --config recipes/story_bs4.yaml train.progress_bar=false
	$(BIN)/deepspeed --num_gpus 2 --master_port $(DEMO_PORT) launcher/train.py --ds_config ds_configs/base.json --config recipes/story_bs12.yaml train.progress_bar=false
	$(BIN)/python -m launcher.report runs/story_bs4 runs/story_bs12 --out runs/story.png

# The wheels that bench/gpu_check.sh and bench/gpu_train_check.sh carry to a lent GPU box, pinned in
# bench/gpu_wheels.txt: downloaded for CPython 3.12 on manylinux x86_64 (DeepSpeed's built here), then checked
# complete against every wheel's Requires-Dist and the box's packages. Carry .whl (git-ignored) to the box.
gpu-wheels:
	@test -x $(BIN)/python || { echo "gpu-wheels builds DeepSpeed's wheel with $(BIN)/python (it needs torch): run make venv first"; exit 1; }
	$(BIN)/python bench/gpu_wheels.py download .whl
