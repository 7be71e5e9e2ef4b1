"""Per-rank bytes of parameters, gradients and optimizer states at ZeRO stages 0-3, counted from tensors.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 --master_port 29731 \\
        bench/bench_zero_memory.py [--preset mossformer2_se_48k] [--precisions fp32,bf16] \\
        [--stages 0,1,2,3] [--out bench/results/zero_memory.json]

Process RSS does not show ZeRO's savings on CPU (../shared/NOTES-deepspeed-cpu.md), so this counts the
bytes of the tensors each rank holds, once per storage (a parameter that is a view into DeepSpeed's flat
buffer is counted with the buffer). For every stage and precision a fresh engine takes one optimizer step
on a tiny input (micro-batch 1, a 0.25 s crop), then a second backward; the count is taken after that
backward and before the second step, when parameters, this step's gradients and the optimizer states
(created by the first step) are all alive. The tensors are found by walking the engine's module (params,
.grad, ZeRO-3's ds_tensor) and the DeepSpeed optimizer object (its flat partitions, gradient partitions,
reduce buckets and the torch optimizer's state). Each is classed as:

- params: the module's parameters as this rank holds them (ZeRO-3: its partition plus persistent params);
- grads: .grad of the parameters and DeepSpeed's gradient partitions/accumulators;
- optimizer: Adam's exp_avg/exp_avg_sq and the fp32 master copy of the weights (where one is kept);
- buffers: the gradient-reduction buckets (sized by reduce_bucket_size, not by the model);
- other: anything else found (listed by attribute path in the JSON).

The measured params/grads/optimizer are compared against launcher/plan/memory.py's formulas (goal: within 10 %).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from launcher.plan import memory  # noqa: E402
from launcher.dist.group import release_shm_segment_name  # noqa: E402
from launcher.plan.ds_config import load_preset  # noqa: E402
from model import build_model, compute_features, mask_loss  # noqa: E402

CROP_SAMPLES = 12000  # 0.25 s at 48 kHz: 27 frames, enough to exercise every layer on CPU


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def _walk(obj, path: str, out: list[tuple[str, torch.Tensor]], seen: set[int], depth: int = 0) -> None:
    """Every tensor reachable from a DeepSpeed/torch optimizer object (not through modules or the engine)."""
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return
    if depth > 8 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (torch.nn.Module, deepspeed.DeepSpeedEngine)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            name = k if isinstance(k, (str, int)) else type(k).__name__
            _walk(v, f"{path}[{name!r}]", out, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", out, seen, depth + 1)


def _category(path: str) -> str:
    p = path.lower()
    if ".state[" in p or "exp_avg" in p:
        return "optimizer"
    if "param_groups" in p:  # the torch optimizer's params: under ZeRO, the fp32 master partitions
        return "optimizer"
    if "ipg" in p or "bucket" in p:
        return "buffers"
    if "grad" in p:
        return "grads"
    if "fp32" in p or "master" in p or "single_partition" in p:
        return "optimizer"
    return "other"


def count_rank_bytes(engine) -> dict:
    """Bytes per category on this rank, each storage counted once (parameters and their grads first)."""
    counted: dict[tuple[int, int], str] = {}
    totals: dict[str, int] = defaultdict(int)
    paths: dict[str, int] = defaultdict(int)

    def add(t: torch.Tensor, cat: str, path: str) -> None:
        if t is None or t.numel() == 0 or t.device.type == "meta":  # meta tensors hold no memory
            return
        key = _storage_key(t)
        if key in counted or key[1] == 0:
            return
        counted[key] = cat
        totals[cat] += key[1]
        paths[f"{cat}: {path}"] += key[1]

    params = list(engine.module.parameters())
    for p in params:
        ds = getattr(p, "ds_tensor", None)
        if ds is not None:  # ZeRO-3: the rank's partition; p.data is empty unless the param persists
            add(ds, "params", "param.ds_tensor")
        add(p.data, "params", "param.data")
    for p in params:
        add(p.grad, "grads", "param.grad")
    for b in engine.module.buffers():
        add(b, "model_buffers", "module buffer")
    found: list[tuple[str, torch.Tensor]] = []
    _walk(engine.optimizer, "optimizer", found, set())
    for path, t in found:
        add(t, _category(path), _squash(path))
    return {"bytes": dict(totals), "by_path": dict(paths)}


def _squash(path: str) -> str:
    """optimizer.x[3]['exp_avg'] -> optimizer.x[i]['exp_avg'] so paths aggregate."""
    import re

    return re.sub(r"\[\d+\]", "[i]", path)


def _buffer_bytes(engine) -> int:
    found: list[tuple[str, torch.Tensor]] = []
    _walk(engine.optimizer, "optimizer", found, set())
    keys = {_storage_key(t) for path, t in found
            if _category(path) == "buffers" and t.numel() and t.device.type != "meta"}
    return sum(nbytes for _, nbytes in keys)


def one_config(preset: str, stage: int, precision: str, world: int, reduce_bucket_size: int | None) -> dict:
    spec = f"ds_configs/zero{stage}.json" + ("+ds_configs/bf16.json" if precision == "bf16" else "")
    cfg = load_preset(spec)
    accum = 2
    cfg.update({"train_batch_size": world * accum, "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": accum})
    cfg["optimizer"]["params"]["lr"] = 1e-4
    if reduce_bucket_size is not None:
        cfg["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_size
    torch.manual_seed(0)
    model = build_model(preset)
    trainable = [p for p in model.parameters() if p.requires_grad]  # as launcher/train.py passes them
    num_params = sum(p.numel() for p in trainable)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(dist.get_rank())
    noisy = torch.randn(1, CROP_SAMPLES, generator=gen) * 0.1
    clean = noisy * 0.5
    # The first parameter's gradient comes last in backward: DeepSpeed's reduce buckets are alive then.
    in_backward = {"buffers": 0}
    first = next(iter(engine.module.parameters()))
    first.register_hook(lambda g: in_backward.update(buffers=max(in_backward["buffers"], _buffer_bytes(engine))))

    def micro_step() -> None:
        mask = engine(compute_features(noisy, dither=1.0).to(dtype))
        engine.backward(mask_loss(mask, noisy, clean))
        engine.step()  # a no-op for the optimizer except at the accumulation boundary

    micro_step(), micro_step()  # one optimizer step: creates the optimizer states
    micro_step()  # gradients accumulated, held while the next micro-batch runs (its activations' peak)
    between = count_rank_bytes(engine)
    mask = engine(compute_features(noisy, dither=1.0).to(dtype))
    engine.backward(mask_loss(mask, noisy, clean))
    boundary = count_rank_bytes(engine)  # after the boundary's backward, before the step consumes the grads
    engine.step()
    persist = memory.persistent_params(preset, memory.persistence_threshold(cfg)) if stage == 3 else 0
    expect = memory.model_state_bytes(num_params, stage, precision, world, persist,
                                      memory.explicit_grad_accum_dtype(cfg))
    bucket = memory.reduce_bucket_bytes(cfg, stage, precision)
    result = {"stage": stage, "precision": precision, "spec": spec, "num_params": num_params,
              "accumulation_steps": accum, **between, "at_boundary": boundary,
              "buffers_in_backward": in_backward["buffers"],
              "formula_bytes": {"params": expect.params, "grads": expect.grads, "optimizer": expect.optimizer,
                                "buffers": bucket},
              "formula": {"params": expect.params_formula, "grads": expect.grads_formula,
                          "optimizer": expect.optimizer_formula},
              "reduce_bucket_size": cfg["zero_optimization"].get("reduce_bucket_size"),
              "paper_bytes": memory.paper_model_state_bytes(num_params, stage, precision, world)}
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result


def saved_tensor_bytes(preset: str, mode: str, batch: int, seconds: float, seed: int = 0) -> int:
    """Bytes autograd saves for backward in one training forward (features -> mask -> loss), each storage
    once, parameters excluded (they are model states, not activations).

    mode: fp32; bf16 (the module cast to bf16 and bf16 features, as DeepSpeed's bf16 engine runs it);
    bf16_autocast (fp32 module under torch.autocast, as a plain PyTorch loop would run bf16).
    """
    torch.manual_seed(seed)
    model = build_model(preset).train()
    if mode == "bf16":
        model = model.bfloat16()
    param_keys = {_storage_key(p) for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in param_keys and t.device.type != "meta":
            seen[key] = key[1]
        return t

    gen = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, int(seconds * 48000), generator=gen) * 0.1
    clean = noisy * 0.5
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        mask = model(compute_features(noisy, dither=1.0).to(dtype))
        loss = mask_loss(mask, noisy, clean)
    total = sum(seen.values())
    del loss, mask, model
    return total


def measure_activations(presets: list[str], modes: list[str], seconds: float, out: Path | None) -> dict:
    """Saved-tensor bytes at (batch 1, seconds), (batch 2, seconds) and (batch 1, seconds / 2): the
    slope per sample-second from the batch-2 point, and the half-length point to check linearity."""
    import platform

    rows = []
    for preset in presets:
        for mode in modes:
            t = time.perf_counter()
            b1 = saved_tensor_bytes(preset, mode, 1, seconds)
            b2 = saved_tensor_bytes(preset, mode, 2, seconds)
            half = saved_tensor_bytes(preset, mode, 1, seconds / 2)
            per_sample = b2 - b1
            rows.append({
                "preset": preset, "mode": mode, "seconds": seconds,
                "bytes_b1": b1, "bytes_b2": b2, "bytes_b1_half": half,
                "per_sample_per_second": per_sample / seconds,
                "fixed_bytes": b1 - per_sample,  # what does not grow with the batch (e.g. autocast's weight copies)
                "half_length_ratio": half / b1,
                "wall_s": time.perf_counter() - t,
            })
            print(f"{preset:20s} {mode:14s} b1 {b1 / 2**20:9.1f} MiB  b2 {b2 / 2**20:9.1f} MiB  "
                  f"half {half / 2**20:9.1f} MiB  -> {per_sample / seconds / 2**20:8.1f} MiB per sample-second",
                  flush=True)
    result = {"rows": rows, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mossformer2_se_48k")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--reduce_bucket_size", type=int, default=None,
                    help="override the presets' reduce_bucket_size (elements)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--activations", action="store_true",
                    help="instead: one process, saved-tensor bytes of a training forward (no torchrun)")
    ap.add_argument("--modes", default="fp32,bf16,bf16_autocast", help="with --activations")
    ap.add_argument("--seconds", type=float, default=4.0, help="crop length for --activations")
    ap.add_argument("--from_json", type=Path, default=None, help="print the table of an earlier --out file")
    args = ap.parse_args()
    if args.from_json:
        d = json.loads(args.from_json.read_text())
        args.preset, args.out = d["preset"], None
        report(d["rows"], args, d["world_size"], d["seconds"])
        return 0
    if args.activations:
        measure_activations(args.preset.split(","), args.modes.split(","), args.seconds, args.out)
        return 0
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()  # every rank has mapped every peer's /dev/shm segment: their names can go
    release_shm_segment_name(rank)
    rows = []
    t0 = time.perf_counter()
    for precision in args.precisions.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            if (stage, precision) == (0, "bf16"):
                continue  # refused: ds_configs/bf16.json sums gradients in fp32, which needs ZeRO >= 1
            mine = one_config(args.preset, stage, precision, world, args.reduce_bucket_size)
            gc.collect()  # the engine, its hooks and the model refer to each other
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            if rank == 0:
                mine_keys = ("bytes", "by_path", "at_boundary", "buffers_in_backward")
                rows.append({**{k: v for k, v in mine.items() if k not in mine_keys},
                             "per_rank": [{k: g[k] for k in mine_keys} for g in gathered]})
    if rank == 0:
        report(rows, args, world, time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()  # not left to interpreter exit, where gloo can abort the process
    return 0


def report(rows: list[dict], args: argparse.Namespace, world: int, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    mib = 2 ** 20
    table = Table(title=f"ZeRO, {args.preset}, {world} ranks: MiB per rank (the larger rank), held between "
                        f"micro-batches; formula = launcher/plan/memory.py, paper = ZeRO paper")
    for col in ("stage", "prec", "params", "grads", "optimizer", "formula", "dev", "buckets", "paper"):
        table.add_column(col, justify="right")
    for r in rows:
        worst = 0.0
        for rank_bytes in (pr["bytes"] for pr in r["per_rank"]):
            for cat in ("params", "grads", "optimizer"):
                f = r["formula_bytes"][cat]
                worst = max(worst, abs(rank_bytes.get(cat, 0) - f) / f if f else 0.0)
        r["worst_relative_deviation"] = worst
        top = lambda cat: max(pr["bytes"].get(cat, 0) for pr in r["per_rank"]) / mib  # noqa: E731
        fb, pb = r["formula_bytes"], r["paper_bytes"]
        trio = lambda d: "/".join(f"{d[c] / mib:.0f}" for c in ("params", "grads", "optimizer"))  # noqa: E731
        bucket = max(pr["buffers_in_backward"] for pr in r["per_rank"]) / mib
        table.add_row(str(r["stage"]), r["precision"], f"{top('params'):.1f}", f"{top('grads'):.1f}",
                      f"{top('optimizer'):.1f}", trio(fb), f"{100 * worst:.1f}%",
                      f"{bucket:.0f} ({fb['buffers'] / mib:.0f})", trio(pb))
    Console(width=max(Console().width, 120)).print(table)
    result = {"preset": args.preset, "world_size": world, "seconds": seconds, "rows": rows,
              "goal": "params, grads and optimizer states within 10 % of the formulas",
              "worst_relative_deviation": max(r["worst_relative_deviation"] for r in rows),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    print(f"worst deviation from launcher/plan/memory.py: {100 * result['worst_relative_deviation']:.2f} %")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
