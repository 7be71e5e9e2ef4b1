"""Evaluation as a library: which files go together in a batch and on which rank (`batches`), audio in and out
(`audio`), enhancement and the metric worker pool (`score`), rows, means and tables (`results`), and the model a
checkpoint holds (`model`). No command line and no process group: launcher/evaluate.py and evaluation during
training (launcher/training/evaluation.py) use it.
"""
