"""What `train.compile` did in this run, in metrics.jsonl: the graphs compiled by the first optimizer step, the time
that step took against the watchdog's budget, and any graph compiled after it.

Compilation happens inside the first optimizer step after every start (a resume compiles again; inductor's cache on
disk makes that faster), which the watchdog already treats as a slow phase (`train.slow_phase_timeout_s`, launcher/
training/watchdog.py): the `compile` record says how much of that budget it used, and a warning is printed when it
used more than half, before a slower node or a bigger model runs out of it. After the first step the count of
graphs must not move: training shapes are static and validation runs eagerly (model/compile.py), so a later graph is
a recompilation, which costs a compile's time in a fast phase and hints at a shape or a guard that changes; it is
recorded (`recompile`) and printed with the way to see why.

The counts are dynamo's own (`torch._dynamo.utils.counters`), process-wide: every graph this rank compiled.
"""

from __future__ import annotations

import time

from torch._dynamo.utils import counters


def compiled_graphs() -> int:
    """Graphs dynamo compiled in this process so far (each recompilation adds one)."""
    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    """Graph breaks dynamo met so far (under fullgraph=True a break is an error before it is counted here)."""
    return int(sum(counters["graph_break"].values()))


class CompileWatch:
    """Created right before the training loop starts; `after_step` after every optimizer step."""

    def __init__(self, regions: str, slow_phase_timeout_s: float, log) -> None:
        self.regions, self.slow_phase_timeout_s, self.log = regions, slow_phase_timeout_s, log
        self.t0 = time.perf_counter()
        self.graphs: int | None = None  # after the last step; None before the first

    @property
    def compiles_next(self) -> bool:
        """The next optimizer step compiles the regions: the first after a start, with train.compile on."""
        return self.regions != "off" and self.graphs is None

    def after_step(self, step: int) -> None:
        if self.regions == "off":
            return
        graphs = compiled_graphs()
        if self.graphs is None:
            self._first(step, graphs, time.perf_counter() - self.t0)
        elif graphs > self.graphs:
            self.log.log({"kind": "recompile", "step": step, "graphs": graphs, "new_graphs": graphs - self.graphs},
                         f"warning: step {step} compiled {graphs - self.graphs} more graph(s) (train.compile="
                         f"{self.regions}, {graphs} in all): a recompilation, which a static training step should "
                         "never need; TORCH_LOGS=recompiles says which guard failed")
        self.graphs = graphs

    def _first(self, step: int, graphs: int, seconds: float) -> None:
        budget = self.slow_phase_timeout_s
        self.log.log({"kind": "compile", "step": step, "regions": self.regions, "graphs": graphs,
                      "graph_breaks": graph_breaks(), "first_step_s": seconds, "slow_phase_timeout_s": budget},
                     f"[compile] train.compile={self.regions}: {graphs} graphs compiled in the first optimizer step, "
                     f"{seconds:.1f} s of the watchdog's {budget:g} s for it (train.slow_phase_timeout_s)")
        if seconds > budget / 2:
            self.log.print(f"warning: the first optimizer step, compilation included, took {seconds:.0f} s, more "
                           f"than half of train.slow_phase_timeout_s ({budget:g} s): a slower node, a cold compile "
                           f"cache or a bigger model may exceed it and be ended as a hang; raise "
                           f"train.slow_phase_timeout_s, or use train.compile=blocks (one graph per block kind)")
