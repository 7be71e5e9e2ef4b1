"""The job around the ranks: who is who (`env`), which GPU each takes (`gpu`), the checks before and while the process
group starts (`preflight`), the process group itself (`group`) and a CUDA rank's speed settings (`device`)."""
