"""Why a training stops that is neither a bad input (refused before the process group) nor a bug."""


class TrainingAborted(RuntimeError):
    """The run cannot go on (bad data found after start, too many non-finite steps); every rank exits with 1."""
