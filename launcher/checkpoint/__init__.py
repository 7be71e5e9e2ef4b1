"""Checkpoints: the torch-free marker (`marker`: tags, COMPLETE.json, what --resume means) and file records
(`integrity`), the store (`store`: save, retention, RNG, universal format), the choice of a checkpoint to resume
(`resume`), weights in (`weights`: init_from and evaluation read ClearerVoice files, exports and run checkpoints)
and out (`export`: the fp32 weights of any ZeRO stage and precision).

Import the modules themselves: this package's __init__ imports nothing, so the planner can read a marker
without loading torch.
"""
