"""torch.compile for the training micro-batch: which regions are compiled, and how they stay one compilation each.

``compile_regions(model, regions)`` compiles parts of a MossFormer2 in place and ``compiled_step_functions()``
returns compiled versions of ``compute_features`` and ``mask_loss``; the trainer calls the model through its
DeepSpeed engine between the two, as it does in eager mode. What the benchmark measured (bench/bench_compile.py,
BENCHMARKS.md) decided the choices below:

- **In place, names unchanged.** ``nn.Module.compile`` compiles a module's call where it stands, so parameter and
  state-dict names stay those of the model (``mossformer.``) and checkpoints, exports and ``init_from`` see no
  difference. ``torch.compile(module)`` would return a wrapper whose names all start with ``_orig_mod.``.
- **Below the root.** DeepSpeed's ``engine.compile()`` compiles the model's whole call, and with it the forward
  hooks the engine puts on the model: the pre-hook's throughput timer calls ``time.time()`` once the engine has
  taken a few steps (a graph break, an error under ``fullgraph``), and the post-hook reads the engine's micro-step
  counter (``is_gradient_accumulation_boundary``), a guard that fails on every micro-batch: a recompilation each
  time until dynamo's limit of 8, then an error. Compiling the model's children leaves the hooks outside.
- **Regions.** ``"blocks"`` compiles each gated attention unit and each gated FSMN block on its own: the layers of
  one kind share one graph, so compile time does not grow with the depth (the full model: 64 s on the CPU here,
  against 237 s for ``"model"``, BENCHMARKS.md §10). ``"model"`` compiles the mask network as one region: the most
  fusion and the fewest launches (3,401 against 3,561 per full-model micro-batch), and the longest compile.
- **One compilation per region.** Shapes are static in training (fixed crops, fixed micro-batch), so regions are
  compiled with ``dynamic=False`` (a new shape would compile a second static graph rather than make the first one
  dynamic) and ``fullgraph=True`` (a graph break is an error, not a silent split). Validation runs eagerly under
  ``torch.compiler.set_stance("force_eager")`` (see ``eager``): eval mode and no_grad would otherwise compile a
  second graph per region (for ``"model"`` the whole network's forward once more) to speed up a pass that runs
  once per epoch. nn.Module.compile compiles ``Module._call_impl``, one code object for every compiled module, so
  its graphs share dynamo's recompile limit of 8: ``"blocks"`` holds two.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .features import compute_features
from .loss import mask_loss
from .network import MossFormer2

REGIONS = ("off", "blocks", "model")

# A graph break is an error; a new shape compiles a new static graph (training shapes never change).
COMPILE_OPTIONS = {"fullgraph": True, "dynamic": False}


def configure_inductor(device_type: str) -> None:
    """Process-wide inductor settings for a device type; call once before the first compiled call.

    On the CPU random ops (dither, dropout) call ATen's generator: the same streams as eager, so a compiled step
    draws what an eager one would and the RNG states a checkpoint saves continue exactly; inductor's own
    per-element generator was also the slowest part of a tiny compiled step in a profile here. On a GPU inductor's
    Philox random numbers are generated inside the fused kernels, where ATen's would add a launch each.
    """
    torch._inductor.config.fallback_random = device_type == "cpu"


def compile_regions(model: MossFormer2, regions: str, mode: str | None = None) -> list[nn.Module]:
    """Compile ``regions`` ("off", "blocks" or "model", see the module docstring) of ``model`` in place; returns
    the modules compiled. Call it on the module before or after ``deepspeed.initialize`` (the engine keeps the
    same module object), on every rank alike. ``mode`` is torch.compile's (None: its default); with
    "reduce-overhead" (CUDA graphs) call ``torch.compiler.cudagraph_mark_step_begin()`` before every micro-batch."""
    if regions not in REGIONS:
        raise ValueError(f"unknown compile regions {regions!r}; valid: {', '.join(REGIONS)}")
    if not isinstance(model, MossFormer2):
        raise TypeError(f"expected a MossFormer2, got {type(model).__name__} (compile the model, not a wrapper)")
    if regions == "off":
        return []
    if regions == "model":
        modules: list[nn.Module] = [model.mossformer]
    else:
        blocks = model.mossformer.mdl.intra_mdl.mossformerM
        modules = [*blocks.layers, *blocks.fsmn]
    for module in modules:
        module.compile(**COMPILE_OPTIONS, mode=mode)
    return modules


def compiled_step_functions(mode: str | None = None) -> tuple[Callable, Callable]:
    """(compute_features, mask_loss), each compiled as its own region: the fbank's and the loss's elementwise
    work fuses into a few kernels around their FFTs."""
    return (torch.compile(compute_features, **COMPILE_OPTIONS, mode=mode),
            torch.compile(mask_loss, **COMPILE_OPTIONS, mode=mode))


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled regions eagerly inside the block (validation, evaluation): nothing is compiled there, and the
    training graphs are untouched."""
    with torch.compiler.set_stance("force_eager"):
        yield


__all__ = ["COMPILE_OPTIONS", "REGIONS", "compile_regions", "compiled_step_functions", "configure_inductor", "eager"]
