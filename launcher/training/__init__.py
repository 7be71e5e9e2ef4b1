"""Training: from a command line to a run (`launch`), its set-up (`setup`: process group, data in `datasets`,
engine in `engine`, run record), the loop (`trainer`) over the optimizer steps the data feed hands over (`feed`),
and the parts it calls: non-finite steps (`nonfinite`), validation (`validation`), evaluation during training
(`evaluation`), checkpoints (`checkpoints`), the LR schedule (`schedule`), records and logs (`metrics`, `curves`),
the hang watchdog (`watchdog`), preemption (`preempt`) and init_from on the engine (`init_from`)."""
