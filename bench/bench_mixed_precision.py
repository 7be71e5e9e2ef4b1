"""Mixed precision on 2 CPU ranks: what gradients are summed in, and which fp32 weights a checkpoint holds.

For each DeepSpeed spec a tiny-preset engine trains a few optimizer steps with accumulation 8, and rank 0
writes OUT_DIR/results.json (and a table) with, per spec:

- `grad_error`: at the first step's boundary, the gradients the engine reduced (deepspeed.utils.
  safe_get_full_grad) against the exact mean of the same per-micro-batch gradients summed in fp64 (a plain
  copy of the module in the engine's dtype, same weights and inputs, eval mode so that no dropout differs):
  ||engine − exact|| / ||exact|| over all parameters; what is left is the accumulation and all-reduce;
- a checkpoint in launcher/train.py's layout (launcher.checkpoint.store.save, COMPLETE.json with the preset), and
  `masters.pt`: the fp32 master weights the optimizer holds (DeepSpeed's fp32 copy, not the module).

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python -m torch.distributed.run --standalone \
        --nproc_per_node 2 bench/bench_mixed_precision.py OUT_DIR NAME=SPEC...

tests/test_mixed_precision.py runs it (bf16 accumulation and export); BENCHMARKS.md §6 records the errors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad  # noqa: E402

from launcher.checkpoint.store import save  # noqa: E402
from launcher.plan.ds_config import load_preset, precision, zero_stage  # noqa: E402
from model import build_model  # noqa: E402

PRESET = "tiny"
MICRO, ACCUMULATION, STEPS, FRAMES = 1, 8, 3, 40
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fp32_masters(engine) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 copy of every trainable parameter (a collective at ZeRO ≥ 1)."""
    opt = engine.optimizer
    if zero_stage(engine.config) == 0 and hasattr(opt, "fp32_groups"):  # DeepSpeed's ZeRO-0 fp16/bf16 optimizer
        by_id = {id(p): m for lp, hp in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(lp, hp)}
        return {n: by_id[id(p)].detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    out = {}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            hp = safe_get_full_fp32_param(p)
            out[n] = (hp if hp is not None else p.detach().float()).clone()
    return out


def batches(rank: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(MICRO, FRAMES, 180, generator=gen).to(dtype), torch.rand(MICRO, FRAMES, 961, generator=gen))
            for _ in range(ACCUMULATION)]


def loss_of(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (mask.float() - target).square().mean()


def exact_mean_gradient(rank: int, dtype: torch.dtype, scale: float) -> dict[str, torch.Tensor]:
    """Σ over ranks and micro-batches of each micro-batch's gradient (as the engine computes it: the
    module in `dtype`, the loss divided by the accumulation), summed in fp64, divided by the world size."""
    torch.manual_seed(0)
    plain = build_model(PRESET).to(dtype).eval()
    total = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in plain.named_parameters() if p.requires_grad}
    for feats, target in batches(rank, dtype):
        plain.zero_grad(set_to_none=True)
        (loss_of(plain(feats), target) * scale).backward()
        for n, p in plain.named_parameters():
            if p.grad is not None:
                total[n] += p.grad.double()
    for t in total.values():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return total


def run(name: str, spec: str, out: Path) -> dict:
    rank = dist.get_rank()
    config = load_preset(spec)
    config.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=ACCUMULATION,
                  train_batch_size=MICRO * ACCUMULATION * dist.get_world_size())
    config["optimizer"]["params"]["lr"] = 1e-3
    dtype = DTYPES[precision(config)]
    torch.manual_seed(0)
    model = build_model(PRESET)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    engine.eval()  # no dropout: the plain copy must compute the same per-micro-batch gradients
    result = {"name": name, "spec": spec, "stage": zero_stage(config), "optimizer": type(engine.optimizer).__name__}
    exact = exact_mean_gradient(rank, dtype, 1.0 / ACCUMULATION)
    for step in range(STEPS):
        for i, (feats, target) in enumerate(batches(rank, dtype)):
            engine.backward(loss_of(engine(feats), target))
            if step == 0 and i == ACCUMULATION - 1:
                got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
                diff = sum(float((got[n].double() - exact[n]).square().sum()) for n in exact)
                norm = sum(float(exact[n].square().sum()) for n in exact)
                result["grad_error"] = (diff / norm) ** 0.5
                result["grad_dtype"] = str(next(iter(got.values())).dtype)
            engine.step()
    run_dir = out / name
    marker = {"step": engine.global_steps, "epoch": 0, "world_size": dist.get_world_size(),
              "zero_stage": zero_stage(config), "global_batch": config["train_batch_size"], "preset": PRESET,
              "state": {}}
    save(engine, run_dir / "checkpoints", {}, marker, keep_last=1)
    masters = fp32_masters(engine)
    if rank == 0:
        torch.save(masters, run_dir / "masters.pt")
        result["module_dtype"] = str(next(engine.module.parameters()).dtype)
    engine.destroy()
    return result


def main() -> int:
    out = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    results = [run(name, spec, out) for name, spec in (arg.split("=", 1) for arg in sys.argv[2:])]
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"relative error of the reduced gradient, {ACCUMULATION} micro-batches x {dist.get_world_size()} "
              f"ranks, against the exact fp64 sum of the same per-micro-batch gradients:")
        for r in results:
            print(f"  {r['name']:14s} ZeRO {r['stage']} {r['optimizer']:30s} {r['grad_error']:.2e}  ({r['spec']})")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
