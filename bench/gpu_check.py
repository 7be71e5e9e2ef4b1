"""GPU check: the full MossFormer2 at batch 12 × 4 s on one GPU — speed, TFLOP/s, MFU, peak memory per ZeRO stage.

Run through bench/gpu_check.sh on a lent H100/H200 (it installs the carried wheels first and passes the
deadline); on a machine without a GPU, `python bench/gpu_check.py --device cpu --preset tiny --batch 2
--seconds 1 --steps 2` runs every phase in a reduced form, to know the script works before device time is
spent on it. A phase that would not finish by the deadline (--budget_s, --deadline) is reported as skipped.

Phases, in this order, each written to the JSON as soon as it is done (so a timeout keeps what finished):
1. device, torch and the peak table: the card's dense datasheet peaks (bf16, tf32, fp32) and what an
   8192³ matrix product achieves here (bf16, tf32);
2. FLOPs of one training step (fbank features on the device → mask network → mask loss → backward),
   counted once with torch.utils.flop_counter.FlopCounterMode (matrix products and convolutions);
3. plain PyTorch training steps (Adam, the features on the device) in each of: fp32 (TF32 off), tf32
   (TF32 on for matmul and cuDNN), bf16 (autocast, fp32 weights), and last, if the time budget allows,
   bf16 + torch.compile as the trainer compiles (model/compile.py: each attention unit and FSMN block, the
   features and the loss) and the same with CUDA graphs (``bf16_compile_cg``, mode="reduce-overhead"; CUDA
   only): s/batch (median over --steps after --warmup), samples/s, audio-seconds/s, achieved TFLOP/s, MFU
   against the datasheet peak of that precision and against the measured matmul peak, peak memory (CUDA
   allocator) next to launcher/plan/memory.py's estimate, and the first step (the compile);
4. DeepSpeed engines on one rank (world size 1) at each ZeRO stage, bf16 then fp32, the rendered
   ds_configs/zeroN[+bf16].json presets: memory allocated after deepspeed.initialize, peak over the
   steps, launcher/plan/memory.py's estimate, and s/batch (bf16 at ZeRO 0 is refused by the presets: skipped);
5. with --zero_compile, those compiled variants once more inside a bf16 DeepSpeed engine at
   --zero_compile_stage (ZeRO 1 by default), last (``zero_compile`` in the JSON).

torch.compile needs a C compiler and Python's headers on the box (Triton builds its launchers with them); where
either is missing, or the compile fails for any other reason, that variant is reported as skipped with the
reason, and the script still succeeds.

Goal (issue 7): bf16 on an H100 at ≤ 0.10 s/batch (the reference reports 0.80 s/batch at batch 12 on an
unnamed GPU, fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

# DeepSpeed's ZeRO stages call deprecated torch.distributed names on every step; keep the log readable.
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense (no sparsity) datasheet peaks in TFLOP/s, NVIDIA H100/H200 datasheets. Matched on the device name
# in this order; --peak_tflops overrides.
DATASHEET = [
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 (nvidia-smi: "H100 80GB HBM3")
]
VARIANTS = ("fp32", "tf32", "bf16", "bf16_compile", "bf16_compile_cg")


class Budget:
    """Seconds from now (--budget_s), cut short by an absolute deadline (--deadline, Unix time) if sooner."""

    # Kept back for the last JSON write, the table and the interpreter's exit.
    RESERVE_S = 5.0

    def __init__(self, seconds: float, deadline: float | None = None) -> None:
        self.start, self.seconds = time.perf_counter(), seconds
        if deadline is not None:
            self.seconds = min(seconds, deadline - time.time() - self.RESERVE_S)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, need_s: float) -> bool:
        return self.elapsed() + need_s <= self.seconds


def compile_blocker(device) -> str | None:
    """Why torch.compile cannot build here, or None: inductor compiles C (Triton's launchers on CUDA, C++ kernels
    on the CPU) against Python's headers."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return f"no Python headers ({headers} missing)"
    names = (("CC", "gcc", "clang", "cc") if device.type == "cuda" else ("CXX", "g++", "clang++", "c++"))
    compiler = os.environ.get(names[0]) or next((c for c in map(shutil.which, names[1:]) if c), None)
    if not compiler or not shutil.which(compiler):
        return f"no C{'' if device.type == 'cuda' else '++'} compiler (${names[0]} or {', '.join(names[1:])})"
    return None


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def matmul_tflops(device, dtype, tf32: bool, n: int) -> float:
    import torch

    set_tf32(tf32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    del a, b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def batch_on(device, batch: int, seconds: float, seed: int):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    noisy = (torch.randn(batch, int(seconds * 48000), generator=gen) * 0.1).to(device)
    clean = noisy * 0.5 + 0.01 * torch.randn(noisy.shape, generator=gen).to(device)
    return noisy, clean


def count_flops(preset: str, device, batch: int, seconds: float) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model import build_model, compute_features, mask_loss

    set_tf32(False)
    torch.manual_seed(0)
    model = build_model(preset).to(device).train()
    noisy, clean = batch_on(device, batch, seconds, 0)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = mask_loss(model(compute_features(noisy, dither=1.0)), noisy, clean)
        loss.backward()
    total = counter.get_total_flops()
    del model, loss
    return int(total)


def compile_mode(name: str) -> str | None:
    """torch.compile's mode for a variant: CUDA graphs for the ``_cg`` ones."""
    return "reduce-overhead" if name.endswith("_cg") else None


def run_variant(name: str, preset: str, device, batch: int, seconds: float, steps: int, warmup: int) -> dict:
    import torch

    from model import build_model, compute_features, mask_loss
    from model.compile import compile_regions, compiled_step_functions, configure_inductor

    set_tf32(name == "tf32")
    torch.manual_seed(0)
    model = build_model(preset).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.999), eps=1e-8)
    features, loss_fn = compute_features, mask_loss
    compiled = "compile" in name
    if compiled:  # what the trainer compiles (model/compile.py): each layer's blocks, the features, the loss
        configure_inductor(device.type)
        compile_regions(model, "blocks", mode=compile_mode(name))
        features, loss_fn = compiled_step_functions(mode=compile_mode(name))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=name.startswith("bf16"))
    noisy, clean = batch_on(device, batch, seconds, 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        if compile_mode(name):
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten now
        with amp:
            mask = model(features(noisy, dither=1.0))
        loss = loss_fn(mask.float(), noisy, clean)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    out = {"s_per_batch": statistics.median(times[warmup:]), "first_step_s": times[0],
           "all_step_s": times, "loss": float(loss.detach())}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del model, opt, mask, loss
    if compiled:
        torch._dynamo.reset()  # the next compiled variant starts from nothing, not from this one's graphs
    return out


def zero_engine(preset: str, stage: int, precision: str, device, batch: int, seconds: float, steps: int,
                compile_as: str | None = None) -> dict:
    """One DeepSpeed engine on one rank; ``compile_as`` a compiled variant's name ("bf16_compile",
    "bf16_compile_cg"): model/compile.py's blocks regions, features and loss compiled, as the trainer would."""
    import deepspeed
    import torch

    from launcher.plan.ds_config import load_preset
    from model import build_model, compute_features, mask_loss
    from model.compile import compile_regions, compiled_step_functions, configure_inductor

    set_tf32(False)
    spec = f"ds_configs/zero{stage}.json" + ("+ds_configs/bf16.json" if precision == "bf16" else "")
    cfg = load_preset(spec)
    cfg.update({"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1})
    cfg["optimizer"]["params"]["lr"] = 5e-4
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    model = build_model(preset)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=cfg)
    out = {"stage": stage, "precision": precision, "spec": spec}
    features, loss_fn = compute_features, mask_loss
    mode = compile_mode(compile_as) if compile_as else None
    if compile_as:
        configure_inductor(device.type)
        compile_regions(engine.module, "blocks", mode=mode)
        features, loss_fn = compiled_step_functions(mode=mode)
        out["compile"] = compile_as
    if device.type == "cuda":
        out["allocated_after_init_bytes"] = torch.cuda.memory_allocated(device) - before
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    noisy, clean = batch_on(device, batch, seconds, 2)
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        if mode:
            torch.compiler.cudagraph_mark_step_begin()
        mask = engine(features(noisy, dither=1.0).to(dtype))
        loss = loss_fn(mask, noisy, clean)
        engine.backward(loss)
        engine.step()
        sync(device)
        times.append(time.perf_counter() - t)
    out["s_per_batch"] = statistics.median(times[1:]) if len(times) > 1 else times[0]
    out["all_step_s"] = times
    out["first_step_s"] = times[0]
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - before
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, model, mask, loss
    if compile_as:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def init_single_rank(device) -> None:
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29795")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--preset", default="mossformer2_se_48k")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=4.0, help="crop length")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--zero_stages", default="0,1,2,3")
    ap.add_argument("--zero_precisions", default="bf16,fp32")
    ap.add_argument("--zero_steps", type=int, default=3)
    ap.add_argument("--zero_compile", default="",
                    help="compiled variants (bf16_compile, bf16_compile_cg) to run once more as a DeepSpeed engine "
                         "at --zero_compile_stage in bf16, last")
    ap.add_argument("--zero_compile_stage", type=int, default=1, choices=(1, 2),
                    help="ZeRO 3 cannot compile (bench/bench_compile.py); bf16 at ZeRO 0 is refused")
    ap.add_argument("--budget_s", type=float, default=175.0, help="skip phases that would overrun this")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time by which the script must be done (bench/_gpu_env.sh passes it)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="bf16 dense peak, if the card is not in the table")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "gpu_check.json")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    budget = Budget(args.budget_s, args.deadline)
    # `timeout` (bench/_gpu_env.sh's backstop) sends SIGTERM: leave through SystemExit, so that whatever the
    # JSON already holds stays and the exit status says so.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))

    import torch

    from launcher.plan import memory

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for the reduced check")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = next((p for key, p in DATASHEET if key in name), None) if device.type == "cuda" else None
    if args.peak_tflops:  # Hopper-like ratio: tf32 half of bf16; fp32 (no tensor cores) unknown
        peaks = {"bf16": args.peak_tflops, "tf32": args.peak_tflops / 2}
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "preset": args.preset, "batch": args.batch, "seconds": args.seconds,
        "steps": args.steps, "warmup": args.warmup, "datasheet_peak_tflops": peaks,
        "goal": "bf16 <= 0.10 s/batch on an H100 (reference: 0.80 s/batch at batch 12, fp32, unnamed GPU)",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result.update({"memory_total_bytes": props.total_memory, "sm_count": props.multi_processor_count,
                       "capability": f"{props.major}.{props.minor}"})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["elapsed_s"] = budget.elapsed()
        args.out.write_text(json.dumps(result, indent=1))

    n = 8192 if device.type == "cuda" else 512
    result["matmul_tflops"] = {"bf16": matmul_tflops(device, torch.bfloat16, False, n),
                               "tf32": matmul_tflops(device, torch.float32, True, n),
                               "fp32": matmul_tflops(device, torch.float32, False, n), "n": n}
    save()
    print(f"{name}: matmul {n}³ bf16 {result['matmul_tflops']['bf16']:.1f}, tf32 {result['matmul_tflops']['tf32']:.1f}, "
          f"fp32 {result['matmul_tflops']['fp32']:.1f} TFLOP/s", flush=True)

    flops = count_flops(args.preset, device, args.batch, args.seconds)
    result["flops_per_step"] = flops
    save()
    print(f"FLOPs per training step (batch {args.batch} × {args.seconds:g} s): {flops / 1e12:.2f} TFLOP", flush=True)

    num_params = memory.preset_params(args.preset)
    result["variants"] = {}
    variants = [v for v in args.variants.split(",") if v]

    def variant(v: str) -> None:
        compiled = "compile" in v
        need = (150.0 if device.type == "cuda" else 90.0) if compiled else (20.0 if device.type == "cuda" else 2.0)
        blocker = compile_blocker(device) if compiled else None
        if blocker is None and compile_mode(v) and device.type != "cuda":
            blocker = "CUDA graphs need a CUDA device"
        if blocker is None and not budget.allows(need):
            blocker = f"time budget ({budget.elapsed():.0f} s used of {budget.seconds:.0f}; needs about {need:.0f})"
        if blocker is None:
            try:
                r = run_variant(v, args.preset, device, args.batch, args.seconds, args.steps, args.warmup)
            except Exception as e:  # noqa: BLE001 - whatever inductor raises, the other variants stand
                if not compiled:
                    raise
                blocker = f"torch.compile failed: {type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:300]}"
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if blocker is not None:
            result["variants"][v] = {"skipped": blocker}
            save()
            print(f"{v:13s} skipped: {blocker}", flush=True)
            return
        kind = "bf16" if v.startswith("bf16") else v
        r["samples_per_s"] = args.batch / r["s_per_batch"]
        r["audio_seconds_per_s"] = args.batch * args.seconds / r["s_per_batch"]
        r["tflops"] = flops / r["s_per_batch"] / 1e12
        if peaks and kind in peaks:
            r["mfu_datasheet"] = r["tflops"] / peaks[kind]
        r["mfu_vs_matmul"] = r["tflops"] / result["matmul_tflops"][kind]
        precision = "fp32" if kind in ("fp32", "tf32") else "bf16"
        est = memory.estimate(args.preset, 0, precision, 1, args.batch, args.seconds)
        # autocast keeps fp32 weights, grads and Adam moments (16Ψ), not DeepSpeed bf16's layout
        r["estimate_bytes"] = 16 * num_params + est.activations if precision == "bf16" else est.total
        result["variants"][v] = r
        save()
        print(f"{v:13s} {r['s_per_batch']:.4f} s/batch  {r['samples_per_s']:.2f} samples/s  {r['tflops']:.2f} TFLOP/s"
              + (f"  MFU {100 * r['mfu_datasheet']:.1f} %" if "mfu_datasheet" in r else "")
              + (f"  peak {r['peak_memory_bytes'] / 2**30:.2f} GiB (estimate {r['estimate_bytes'] / 2**30:.2f})"
                 if "peak_memory_bytes" in r else "")
              + f"  first step {r['first_step_s']:.2f} s", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for v in variants:
        if "compile" not in v:
            variant(v)

    import torch.distributed as dist

    result["zero"] = []
    stages = [int(s) for s in args.zero_stages.split(",") if s != ""]
    if stages:
        init_single_rank(device)
    for precision in [p for p in args.zero_precisions.split(",") if p]:
        for stage in stages:
            if precision == "bf16" and stage == 0:
                result["zero"].append({"stage": stage, "precision": precision,
                                       "skipped": "refused: bf16 sums gradients in fp32 only at ZeRO >= 1"})
                save()
                continue
            if not budget.allows(25.0 if device.type == "cuda" else 5.0):
                result["zero"].append({"stage": stage, "precision": precision, "skipped": "time budget"})
                save()
                continue
            r = zero_engine(args.preset, stage, precision, device, args.batch, args.seconds, args.zero_steps)
            est = memory.estimate(args.preset, stage, precision, 1, args.batch, args.seconds, _rendered(r["spec"]))
            r["estimate_bytes"] = est.total
            r["estimate_states_and_buffers_bytes"] = est.total_without_activations
            result["zero"].append(r)
            save()
            print(f"ZeRO {stage} {precision}: {r['s_per_batch']:.4f} s/batch"
                  + (f", after init {r['allocated_after_init_bytes'] / 2**30:.2f} GiB (estimate states+buckets "
                     f"{est.total_without_activations / 2**30:.2f}), peak {r['peak_memory_bytes'] / 2**30:.2f} GiB "
                     f"(estimate {est.total / 2**30:.2f})" if "peak_memory_bytes" in r else ""), flush=True)

    for v in variants:  # torch.compile last: its compile time is the least predictable
        if "compile" in v:
            variant(v)
    # A compiled training step inside a DeepSpeed engine, as the trainer would run it (model/compile.py).
    result["zero_compile"] = []
    for v in [c for c in args.zero_compile.split(",") if c]:
        blocker = compile_blocker(device)
        if blocker is None and compile_mode(v) and device.type != "cuda":
            blocker = "CUDA graphs need a CUDA device"
        if blocker is None and not budget.allows(150.0 if device.type == "cuda" else 90.0):
            blocker = f"time budget ({budget.elapsed():.0f} s used of {budget.seconds:.0f})"
        r = {"stage": args.zero_compile_stage, "precision": "bf16", "compile": v}
        if blocker is None:
            if not dist.is_initialized():
                init_single_rank(device)
            try:
                r = zero_engine(args.preset, args.zero_compile_stage, "bf16", device, args.batch, args.seconds,
                                args.zero_steps + 2, compile_as=v)
            except Exception as e:  # noqa: BLE001 - a compile that fails is a finding, not the end of the check
                blocker = f"failed: {type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:300]}"
                torch._dynamo.reset()
        if blocker is not None:
            r["skipped"] = blocker
        result["zero_compile"].append(r)
        save()
        print(f"ZeRO {args.zero_compile_stage} bf16 + {v}: "
              + (r["skipped"] if "skipped" in r else f"{r['s_per_batch']:.4f} s/batch, first step {r['first_step_s']:.1f} s"),
              flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()  # not left to interpreter exit, where gloo can abort the process
    save()
    _table(result)
    print(f"wrote {args.out} after {budget.elapsed():.0f} s")
    return 0


def _rendered(spec: str) -> dict:
    from launcher.plan.ds_config import load_preset

    return load_preset(spec)


def _table(result: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    gib = 2 ** 30
    t = Table(title=f"{result['device']}: {result['preset']}, batch {result['batch']} × {result['seconds']:g} s")
    for col in ("run", "s/batch", "samples/s", "TFLOP/s", "MFU", "peak GiB", "estimate GiB"):
        t.add_column(col, justify="right")
    for name, r in result.get("variants", {}).items():
        if "skipped" in r:
            t.add_row(name, r["skipped"], "", "", "", "", "")
            continue
        t.add_row(name, f"{r['s_per_batch']:.4f}", f"{r['samples_per_s']:.2f}", f"{r['tflops']:.2f}",
                  f"{100 * r['mfu_datasheet']:.1f} %" if "mfu_datasheet" in r else "-",
                  f"{r['peak_memory_bytes'] / gib:.2f}" if "peak_memory_bytes" in r else "-",
                  f"{r['estimate_bytes'] / gib:.2f}")
    for r in result.get("zero", []) + result.get("zero_compile", []):
        name = f"ZeRO {r['stage']} {r['precision']}" + (f" {r['compile']}" if "compile" in r else "")
        if "skipped" in r:
            t.add_row(name, r["skipped"], "", "", "", "", "")
            continue
        t.add_row(name, f"{r['s_per_batch']:.4f}", f"{result['batch'] / r['s_per_batch']:.2f}", "", "",
                  f"{r['peak_memory_bytes'] / gib:.2f}" if "peak_memory_bytes" in r else "-",
                  f"{r['estimate_bytes'] / gib:.2f}" if "estimate_bytes" in r else "-")
    Console(width=160).print(t)


if __name__ == "__main__":
    sys.exit(main())
