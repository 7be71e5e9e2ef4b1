"""mossformer2-launcher: train MossFormer2 48 kHz with DeepSpeed, from a dry run to SLURM clusters.

Entry points (what users run), thin: `train.py`, `evaluate.py`, `export.py`, `report.py`, `hostfile.py` (for
slurm/launch.sh) and the dry run `python -m launcher.plan`. Below them, packages by concern, each importing only
the ones beneath it (tests/test_layout.py parses the imports to keep it so):

    training/    the run: set-up, the loop, its components          (torch, DeepSpeed)
    scoring/     evaluation as a library: batches, enhancement, metrics  (torch)
    dist/        ranks, GPUs, preflight checks, the process group
    plan/        the pure planner, presets, memory estimate, card, dry run  (torch-free)
    checkpoint/  markers (torch-free), store, resume, weights in and out
    config/      the recipe's typed sections and their loading          (torch-free)
    testing/     fault injection, loaded only when MF2_TEST_FAULT is set
"""
