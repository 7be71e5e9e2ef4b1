"""A compiled training step inside a DeepSpeed 0.19.8 engine on the CPU: which ways work, and what they buy.

Two modes, both building the model as the trainer does (``model.build_model(preset)``, ``deepspeed.initialize``
with a config written out below the way ds_configs/ renders it, batch keys included):

``matrix`` (2 ranks, gloo):

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        bench/bench_compile.py matrix --out bench/results/compile_matrix.json

For each ZeRO stage x precision, an eager engine and one engine per compile method train the same micro-batches
(accumulation 2, five optimizer steps, one validation forward in eval mode, one more step) from the same weights
and random streams; per method: does it run, graph breaks, graphs compiled (and whether the eval forward or the
step after it compiled anything), the state-dict key prefix, and how far its losses and fp32 master weights
are from the eager engine's.

``step`` (1 process, 1 thread, a 1-rank ZeRO-0 fp32 engine, the reference's setting):

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python bench/bench_compile.py step \\
        --preset tiny --methods model,blocks,whole --repeats 7 --out bench/results/compile_step_tiny.json

Per method, side by side with the eager engine in the same process (alternating, medians of per-round ratios):
step time (forward, backward, optimizer step) compiled / eager, compile time (first step), kernels launched
per step, and the first optimizer step's loss, gradients and updated weights against eager.

Methods (what is compiled):
- ``engine``: ``engine.compile()`` after ``deepspeed.initialize`` (DeepSpeed's own API: nn.Module.compile of
  the model, in place, so parameter names stay plain), with DeepSpeed's throughput timer off (see ``ds_config``);
  the engine's post-forward hook, compiled with the model, recompiles on every micro-batch (model/compile.py);
- ``engine_timer``: ``engine`` with the throughput timer on, DeepSpeed's default;
- ``torch``: ``torch.compile(model)`` before ``deepspeed.initialize`` (the engine wraps an OptimizedModule:
  parameter names gain ``_orig_mod.``);
- ``model`` and ``blocks``: model/compile.py's regions, what the trainer would run: the mask network as one region,
  or each attention unit and FSMN block on its own, compiled in place below the engine's hooks; features and
  loss compiled as functions;
- ``whole``: features, mask network and loss in one forward (``LossModel``, a MossFormer2 whose forward returns
  the loss: same parameter names), compiled with ``engine.compile()``: one region.

Kernels launched per step (device-independent counts), split into the micro-batch (features, forward, loss,
backward with DeepSpeed's gradient hooks) and the optimizer step: eager, the ATen operators dispatched
(BENCHMARKS §5's count: every operator below autograd, views included) and the ATen calls (operators called from
Python, no ATen operator above them, that are not views or allocations: each at least one kernel on a GPU);
compiled, the generated kernels called (each a C++ function here, a Triton launch on a GPU) plus the ATen calls
left (from inductor's output code: matrix products, convolutions, FFTs, random numbers; and outside the compiled
regions: DeepSpeed, Adam).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from model import MossFormer2, build_model, compute_features, mask_loss  # noqa: E402
from model.compile import compile_regions, compiled_step_functions, configure_inductor, eager  # noqa: E402
from model.features import SAMPLE_RATE_HZ  # noqa: E402

METHODS = ("engine", "engine_timer", "torch", "model", "blocks", "whole")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fullgraph: a graph break is an error, not a silent split; dynamic=False: a new shape recompiles a static graph
# instead of turning the first one dynamic (the training shapes never change).
COMPILE_KWARGS = {"fullgraph": True, "dynamic": False}


def ds_config(stage: int, precision: str, micro: int, accumulation: int, world: int, lr: float = 5e-4,
              throughput_timer: bool = False, foreach: bool | None = None) -> dict:
    """What ds_configs/base.json + zeroN.json (+ bf16.json) render to, with the plan's batch triple and LR.

    ``throughput_timer`` is DeepSpeed's default (on). engine.compile() compiles the module's whole call, the
    engine's forward hooks included, and the throughput timer's start in the pre-hook calls time.time() once the
    engine has taken a few steps: a graph break, an error under fullgraph. Off, the pre-hook traces to nothing
    (the post-hook still reads the micro-step counter: see model/compile.py)."""
    cfg = {
        "train_batch_size": micro * accumulation * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 10.0,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                                 "adam_w_mode": False, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 500000000, "allgather_bucket_size": 500000000,
                              "contiguous_gradients": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
    }
    if precision == "fp16":  # ds_configs/fp16.json
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    if not throughput_timer:
        cfg["timers"] = {"throughput": {"enabled": False}}
    if foreach is not None:  # torch.optim.Adam's own default: foreach on CUDA, a loop over parameters on the CPU
        cfg["optimizer"]["params"]["foreach"] = foreach
    if stage == 3:
        cfg["zero_optimization"].update({"stage3_prefetch_bucket_size": 50000000,
                                         "stage3_param_persistence_threshold": 100000,
                                         "stage3_max_live_parameters": 1000000000,
                                         "stage3_gather_16bit_weights_on_model_save": False})
    if precision == "bf16" and stage > 0:  # bf16.json; DeepSpeed refuses fp32 accumulation at ZeRO 0
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    return cfg


class LossModel(MossFormer2):
    """The whole micro-batch in one forward: waveforms -> features -> mask -> loss. A subclass, not a wrapper, so
    that parameter names stay those of MossFormer2 (``mossformer.``)."""

    def forward(self, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        feats = compute_features(noisy, dither=1.0).to(self.mossformer.norm.weight.dtype)
        return mask_loss(super().forward(feats), noisy, clean)


def build(preset: str, method: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(preset)
    if method == "whole":
        whole = LossModel(model.config)
        whole.load_state_dict(model.state_dict())
        model = whole
    if method == "torch":
        model = torch.compile(model, **COMPILE_KWARGS)
    return model


class Step:
    """One method's micro-batch on one engine: features, forward, loss, backward (the trainer's sequence)."""

    def __init__(self, engine, method: str, dtype: torch.dtype) -> None:
        self.engine, self.method, self.dtype = engine, method, dtype
        self.features, self.loss = compute_features, mask_loss
        if method in ("engine", "engine_timer", "whole"):
            engine.compile(compile_kwargs=dict(COMPILE_KWARGS))
        if method in ("model", "blocks"):
            compile_regions(engine.module, method)
            self.features, self.loss = compiled_step_functions()

    def micro(self, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        if self.method == "whole":
            loss = self.engine(noisy, clean)
        else:
            loss = self.loss(self.engine(self.features(noisy, dither=1.0).to(self.dtype)), noisy, clean)
        self.engine.backward(loss)
        return loss

    def validate(self, noisy: torch.Tensor) -> torch.Tensor:
        """The trainer's validation forward: eval mode, no gradients, features without dither, eager features;
        model/compile.py's regions run eagerly there (its ``eager()``), the other methods compile an eval graph."""
        self.engine.eval()
        try:
            with torch.no_grad(), (eager() if self.method in ("model", "blocks") else nullcontext()):
                feats = compute_features(noisy, dither=0.0).to(self.dtype)
                module = self.engine.module
                # LossModel's forward is the loss; its mask network is MossFormer2's forward.
                return (MossFormer2.forward(module, feats) if self.method == "whole" else self.engine(feats)).float()
        finally:
            self.engine.train()


def batch(rank: int, index: int, micro: int, seconds: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic synthetic pair per rank and micro-batch: speech-like clean plus noise."""
    gen = torch.Generator().manual_seed(1000 * rank + index)
    samples = int(seconds * SAMPLE_RATE_HZ)
    clean = torch.randn(micro, samples, generator=gen).cumsum(-1) * 1e-3
    clean = clean - clean.mean(-1, keepdim=True)
    return clean + 0.05 * torch.randn(micro, samples, generator=gen), clean


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "break_reasons": sorted(counters["graph_break"])[:5]}


def first_line(e: BaseException) -> str:
    text = (str(e).strip() or "-").splitlines()
    return f"{type(e).__name__}: {text[0][:400]}"


# ---- kernel counting --------------------------------------------------------------------------------------------

# Operators that allocate or change metadata only: no kernel runs.
_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
              "aten::lift_fresh", "aten::resize_", "aten::set_", "aten::as_strided_", "aten::_local_scalar_dense",
              "aten::item", "aten::is_nonzero", "aten::result_type", "aten::resolve_conj", "aten::resolve_neg"}
# Views returned as lists, which the schema check below does not see.
_LIST_VIEWS = {"aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::tensor_split",
               "aten::unsafe_split", "aten::unsafe_chunk"}
_view_cache: dict[str, bool] = {}


def _is_view(name: str) -> bool:
    """An operator whose tensor-returning overloads all return aliases of an input without writing them (views,
    detach); overloads on lists or strings (aten::slice.str) do not count."""
    if name in _LIST_VIEWS:
        return True
    if name not in _view_cache:
        packet = getattr(torch.ops.aten, name.split("::", 1)[1], None)
        verdicts = []
        if packet is not None:
            for overload in packet.overloads():
                returns = getattr(packet, overload)._schema.returns
                if returns and all(str(r.type) == "Tensor" for r in returns):
                    verdicts.append(all(r.alias_info is not None and not r.alias_info.is_write for r in returns))
        _view_cache[name] = bool(verdicts) and all(verdicts)
    return _view_cache[name]


def aten_calls(events) -> int:
    """ATen operators called from Python or from inductor's output code (no ATen operator above them) that do
    work: not a view or an allocation. aten::linear counts once (its addmm is below it), aten::view not at all."""
    def is_aten(e) -> bool:
        return e.name.startswith("aten::")

    def top_level(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if is_aten(parent):
                return False
            parent = parent.cpu_parent
        return True

    return sum(1 for e in events if is_aten(e) and e.name not in _NO_KERNEL and not _is_view(e.name) and top_level(e))


class GeneratedKernelCounter:
    """Counts calls of inductor's generated kernels: the given wrapper modules (inductor's output code) get their
    ``cpp_fused_*`` (``triton_*`` on a GPU) names wrapped while the block runs, so every call through a wrapper is
    counted."""

    PREFIXES = ("cpp_fused_", "triton_")

    def __init__(self, modules: list) -> None:
        self.calls = 0
        self.modules = modules
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> "GeneratedKernelCounter":
        for module in self.modules:
            for name, fn in list(vars(module).items()):
                if name.startswith(self.PREFIXES) and callable(fn):
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc) -> None:
        for module, name, fn in self._saved:
            setattr(module, name, fn)


class DispatchCounter:
    """ATen operators dispatched below autograd (BENCHMARKS §5's count). Only for eager code: torch.compile's
    frames do not run as compiled under a dispatch mode."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self.mode = _Mode()

    def __enter__(self) -> "DispatchCounter":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def count_launches(run, wrappers: list, prepare=None) -> dict:
    """Kernels one call of ``run`` launches (``prepare``, uncounted, before each call); ``wrappers``: the inductor
    output code of its compiled regions (none: eager, then also the ATen operators dispatched)."""
    from torch.profiler import ProfilerActivity, profile

    out: dict = {}
    if not wrappers:
        if prepare:
            prepare()
        with DispatchCounter() as d:
            run()
        out["aten_dispatched"] = d.count
    if prepare:
        prepare()
    with GeneratedKernelCounter(wrappers) as g, profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    out["generated_kernels"] = g.calls
    out["aten_calls"] = aten_calls(prof.events())
    out["launches"] = out["generated_kernels"] + out["aten_calls"]
    return out


# ---- distributed set-up ------------------------------------------------------------------------------------------

def init_distributed() -> tuple[int, int]:
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=600))
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def initialize(model: torch.nn.Module, config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    return engine


def fp32_weights(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's fp32 master value (gathered at ZeRO 3; a collective at ZeRO >= 1)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            hp = safe_get_full_fp32_param(p)
            out[name.removeprefix("_orig_mod.")] = (hp if hp is not None else p.detach().float()).clone()
    return out


def full_grads(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter's reduced gradient, at an accumulation boundary before the optimizer step."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            out[name.removeprefix("_orig_mod.")] = (g if g is not None else torch.zeros_like(p, dtype=torch.float32)).float().clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def max_abs(a: dict[str, torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in a.values())


@contextmanager
def same_randomness(seed: int):
    """Every engine draws dither and dropout from the same stream; inductor then uses ATen's generator too."""
    torch.manual_seed(seed)
    yield


# ---- matrix -----------------------------------------------------------------------------------------------------

def run_matrix_cell(preset: str, stage: int, precision: str, method: str, rank: int, world: int, seconds: float,
                    steps: int) -> dict:
    """Train ``steps`` optimizer steps (accumulation 2, micro-batch 1), validate once, one more step."""
    micro, accumulation = 1, 2
    dtype = DTYPES[precision]
    out: dict = {"method": method, "stage": stage, "precision": precision}
    torch._dynamo.reset()
    before = dynamo_counts()
    t0 = time.perf_counter()
    engine = initialize(build(preset, method), ds_config(stage, precision, micro, accumulation, world,
                                                         throughput_timer=method == "engine_timer"))
    step = Step(engine, method, dtype)
    torch.manual_seed(7 + rank)
    losses, times = [], []
    index = 0
    for s in range(steps):
        t = time.perf_counter()
        total = 0.0
        for _ in range(accumulation):
            noisy, clean = batch(rank, index, micro, seconds)
            index += 1
            total += float(step.micro(noisy, clean).detach())
            engine.step()
        losses.append(total / accumulation)
        times.append(time.perf_counter() - t)
    after_train = dynamo_counts()
    noisy, _ = batch(rank, 999, micro, seconds)
    mask = step.validate(noisy)
    after_eval = dynamo_counts()
    for _ in range(accumulation):
        noisy, clean = batch(rank, index, micro, seconds)
        index += 1
        step.micro(noisy, clean)
        engine.step()
    after_more = dynamo_counts()
    out.update({
        "ok": True, "losses": losses, "first_step_s": times[0], "later_step_s": times[1:],
        "total_s": time.perf_counter() - t0,
        "graphs_train": after_train["graphs"] - before["graphs"],
        "graphs_added_by_eval": after_eval["graphs"] - after_train["graphs"],
        "graphs_added_after_eval": after_more["graphs"] - after_eval["graphs"],
        "graph_breaks": after_more["graph_breaks"] - before["graph_breaks"],
        "break_reasons": after_more["break_reasons"],
        "state_dict_prefix": sorted({k.split(".")[0] for k in engine.module.state_dict()}),
        "eval_mask_sum": float(mask.sum()),
        "weights": fp32_weights(engine),
    })
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, step
    gc.collect()
    return out


def matrix(args) -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # On the CPU random ops then call ATen's generator: eager and compiled engines draw identical dither and dropout.
    configure_inductor("cpu")
    if args.allow_breaks:
        COMPILE_KWARGS["fullgraph"] = False
    rank, world = init_distributed()
    stages = [int(s) for s in args.stages.split(",")]
    precisions = args.precisions.split(",")
    methods = args.methods.split(",")
    results = []
    for precision in precisions:
        for stage in stages:
            reference = None
            for method in ["eager", *methods]:
                try:
                    r = run_matrix_cell(args.preset, stage, precision, method, rank, world, args.seconds, args.steps)
                except Exception as e:  # noqa: BLE001 - a failing combination is a finding, the next one still runs
                    r = {"method": method, "stage": stage, "precision": precision, "ok": False, "error": first_line(e)}
                    gc.collect()
                    torch._dynamo.reset()
                # Every rank must reach the same verdict, or the next cell's collectives would hang.
                flag = torch.tensor([0.0 if r["ok"] else 1.0])
                dist.all_reduce(flag)
                if r["ok"] and flag.item() > 0:
                    r = {**r, "ok": False, "error": "failed on another rank"}
                weights = r.pop("weights", None)
                if method == "eager":
                    reference = (r, weights)
                elif r["ok"] and reference and reference[1] is not None:
                    ref, ref_weights = reference
                    r["loss_max_diff"] = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
                    r["weights_max_diff"] = max_diff(weights, ref_weights)
                if r["ok"]:
                    both = torch.tensor([sum(float(w.double().sum()) for w in weights.values())], dtype=torch.float64)
                    gathered = [torch.zeros_like(both) for _ in range(world)]
                    dist.all_gather(gathered, both)
                    r["ranks_agree"] = all(float(g) == float(both) for g in gathered)
                if rank == 0:
                    print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "later_step_s")}), flush=True)
                results.append(r)
                if rank == 0 and args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(
                        {"mode": "matrix", "preset": args.preset, "seconds": args.seconds, "world": world,
                         "torch": torch.__version__, "deepspeed": _ds_version(), "compile_kwargs": COMPILE_KWARGS,
                         "results": results}, indent=1))
    dist.destroy_process_group()
    return 0


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


# ---- step -------------------------------------------------------------------------------------------------------

def step_bench(args) -> int:
    """Each (preset, method) in a process of its own, beside an eager engine: its compile starts cold, and no
    method's compiled code shares dynamo's per-code-object cache (nn.Module.compile compiles Module._call_impl,
    one code object for every module; its recompile limit is 8 entries) with another's."""
    import subprocess

    from _common import machine  # bench/_common.py

    methods = [m for m in args.methods.split(",") if m]
    result: dict = {"mode": "step", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                    "threads": args.threads, "torch": torch.__version__, "deepspeed": _ds_version(),
                    "seconds": args.seconds, "repeats": args.repeats, "presets": {}}
    for preset in args.preset.split(","):
        runs = result["presets"].setdefault(preset, {})
        for method in methods:
            with tempfile.TemporaryDirectory(dir=args.cache_root) as folder:
                part = Path(folder) / "part.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "step_one", "--preset", preset, "--method",
                       method, "--seconds", str(args.seconds), "--repeats", str(args.repeats), "--threads",
                       str(args.threads), "--out", str(part)]
                if args.warm_cache:
                    cmd.append("--warm_cache")
                env = dict(os.environ)
                if not args.warm_cache:  # nothing an earlier run left on disk
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder) / "inductor")
                proc = subprocess.run(cmd, env=env)
                runs[method] = (json.loads(part.read_text()) if part.exists()
                                else {"ok": False, "error": f"exit status {proc.returncode}"})
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
    return 0


def step_one(args) -> int:
    torch.set_num_threads(args.threads)
    configure_inductor("cpu")
    init_distributed()
    out = {"load_before": os.getloadavg(), **bench_preset(args.preset, args.method, args), "load_after": os.getloadavg()}
    args.out.write_text(json.dumps(out, indent=1))
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


def bench_preset(preset: str, method: str, args) -> dict:
    from torch._inductor.codecache import PyCodeCache

    config = ds_config(0, "fp32", 1, 1, 1)
    noisy, clean = batch(0, 0, 1, args.seconds)
    steps: dict[str, Step] = {}
    out: dict = {"methods": {}}

    def one_step(name: str, seed: int) -> torch.Tensor:
        s = steps[name]
        with same_randomness(seed):
            loss = s.micro(noisy, clean)
        s.engine.step()
        return loss

    # The eager reference and its first optimizer step: loss, gradients (before the step), weights after.
    steps["eager"] = Step(initialize(build(preset, "eager"), config), "eager", torch.float32)
    reference = first_step_state(steps["eager"], noisy, clean)
    wrappers: dict[str, list] = {"eager": []}
    for name in [method]:
        load = os.getloadavg()[0]
        loaded_before = len(PyCodeCache.modules)
        graphs_before = dynamo_counts()["graphs"]
        t = time.perf_counter()
        try:
            steps[name] = Step(initialize(build(preset, name), config), name, torch.float32)
            state = first_step_state(steps[name], noisy, clean)
        except Exception as e:  # noqa: BLE001
            out["methods"][name] = {"ok": False, "error": first_line(e)}
            steps.pop(name, None)
            print(f"{preset} {name}: {first_line(e)}", flush=True)
            continue
        compile_s = time.perf_counter() - t
        wrappers[name] = list(PyCodeCache.modules)[loaded_before:]
        counts = dynamo_counts()
        out["methods"][name] = {
            "ok": True, "first_step_s": compile_s, "load_at_compile": load,
            "graphs": counts["graphs"] - graphs_before, "graph_breaks": counts["graph_breaks"],
            "loss_diff": abs(state["loss"] - reference["loss"]),
            "grad_max_diff": max_diff(state["grads"], reference["grads"]),
            "grad_max_abs": max_abs(reference["grads"]),
            "weight_max_diff": max_diff(state["weights"], reference["weights"]),
            "grad_at_worst_weight": grad_at_worst(state["weights"], reference),
        }
        print(f"{preset} {name}: first step (compile) {compile_s:.1f} s, {json.dumps(out['methods'][name])}", flush=True)
    out["first_step_loss"] = reference["loss"]
    # Warm every engine once more, then count, then time alternating rounds.
    for name in steps:
        one_step(name, 1)
    for name in steps:
        s = steps[name]
        m = out["methods"].setdefault(name, {"ok": True})
        with same_randomness(2):
            micro = count_launches(lambda: s.micro(noisy, clean), wrappers[name])
        s.engine.step()
        optimizer = count_launches(s.engine.step, [], prepare=lambda: s.micro(noisy, clean))
        m["launches"] = {"micro_batch": micro, "optimizer_step": optimizer,
                         "launches": micro["launches"] + optimizer["launches"]}
        if name == "eager":
            m["launches"]["aten_dispatched"] = micro["aten_dispatched"] + optimizer["aten_dispatched"]
        print(f"{preset} {name}: launches {m['launches']}", flush=True)
    # What Adam launches where it runs foreach (torch's default on CUDA): one call per foreach operator.
    foreach = Step(initialize(build(preset, "eager"), ds_config(0, "fp32", 1, 1, 1, foreach=True)), "eager",
                   torch.float32)
    out["optimizer_step_foreach"] = count_launches(foreach.engine.step, [], prepare=lambda: foreach.micro(noisy, clean))
    foreach = None  # its engine freed before the timings
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        for name in list(steps):
            t = time.perf_counter()
            try:
                one_step(name, 3 + r)
            except Exception as e:  # noqa: BLE001 - e.g. a recompile limit hit after some steps: a finding
                out["methods"][name].update(ok=False, error=f"step {r + 3}: {first_line(e)}")
                print(f"{preset} {name}: {out['methods'][name]['error']}", flush=True)
                steps.pop(name)
                continue
            times[name].append(time.perf_counter() - t)
    for name in steps:
        m = out["methods"][name]
        m["step_s_median"] = statistics.median(times[name])
        m["step_s"] = times[name]
        m["ratio_vs_eager"] = statistics.median(a / b for a, b in zip(times[name], times["eager"]))
        if "first_step_s" in m:
            m["compile_s"] = m["first_step_s"] - m["step_s_median"]
        m["launch_ratio_eager_dispatched_over"] = (out["methods"]["eager"]["launches"]["aten_dispatched"]
                                                   / m["launches"]["launches"])
        m["launch_ratio_eager_calls_over"] = (out["methods"]["eager"]["launches"]["launches"]
                                                   / m["launches"]["launches"])
        print(f"{preset} {name}: {m['step_s_median']:.3f} s/step, ratio {m['ratio_vs_eager']:.3f}", flush=True)
    for s in steps.values():
        if hasattr(s.engine, "destroy"):
            s.engine.destroy()
    steps.clear()
    gc.collect()
    return out


def grad_at_worst(weights: dict[str, torch.Tensor], reference: dict) -> float:
    """|gradient| where the updated weights differ most. Adam's first update is lr * g / (|g| + eps): +-lr for
    |g| >> eps whatever g's rounding, but for |g| near eps (1e-8) a rounding of g moves it by up to ~lr."""
    name = max(weights, key=lambda k: float((weights[k] - reference["weights"][k]).abs().max()))
    index = int((weights[name] - reference["weights"][name]).abs().argmax())
    return float(reference["grads"][name].flatten()[index].abs())


def first_step_state(step: Step, noisy: torch.Tensor, clean: torch.Tensor) -> dict:
    with same_randomness(0):
        loss = float(step.micro(noisy, clean).detach())
    grads = full_grads(step.engine)
    step.engine.step()
    return {"loss": loss, "grads": grads, "weights": fp32_weights(step.engine)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("matrix", help="2 ranks: ZeRO stage x precision x method")
    m.add_argument("--preset", default="tiny")
    m.add_argument("--seconds", type=float, default=1.0)
    m.add_argument("--stages", default="0,1,2,3")
    m.add_argument("--precisions", default="fp32,bf16")
    m.add_argument("--methods", default=",".join(METHODS))
    m.add_argument("--steps", type=int, default=5,
                   help="optimizer steps before validation (x2 micro-batches): more than dynamo's recompile limit "
                        "of 8, so a method that recompiles every micro-batch fails here")
    m.add_argument("--allow_breaks", action="store_true",
                   help="fullgraph=False: see how far a combination gets with graph breaks (counted)")
    m.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    m.add_argument("--out", type=Path, default=None)
    s = sub.add_parser("step", help="1 process: eager vs compiled step time, compile time, kernel launches")
    s.add_argument("--preset", default="tiny", help="comma-separated presets")
    s.add_argument("--seconds", type=float, default=4.0)
    s.add_argument("--methods", default="model,blocks,whole")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--warm_cache", action="store_true",
                   help="reuse inductor's cache (TORCHINDUCTOR_CACHE_DIR or its default); by default every method "
                        "compiles cold, in a fresh cache folder")
    s.add_argument("--cache_root", default=None, help="where the fresh cache folders go (default: the temp dir)")
    s.add_argument("--out", type=Path, default=None)
    o = sub.add_parser("step_one", help="(run by step) one preset and method beside eager, in this process")
    o.add_argument("--preset", required=True)
    o.add_argument("--method", required=True, choices=METHODS)
    o.add_argument("--seconds", type=float, required=True)
    o.add_argument("--repeats", type=int, required=True)
    o.add_argument("--threads", type=int, required=True)
    o.add_argument("--warm_cache", action="store_true")
    o.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    return {"matrix": matrix, "step": step_bench, "step_one": step_one}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
