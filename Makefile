# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# The venv is rebuilt only when pyproject.toml changes, so a second run is quick.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_DIR ?= runs/demo

export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test test-fast test-slurm bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
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
