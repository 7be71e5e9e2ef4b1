"""GPU training check: `launcher/train.py` itself on one lent GPU, end to end, as a user launches it.

Run through bench/gpu_train_check.sh (it installs the carried wheels first and passes the deadline).
bench/gpu_check.py times the model and the bare engines; this runs the launcher: plan → NCCL process group →
preflight → data from 48 kHz WAV files (4 workers + the prefetch thread, as recipes/train_48k.yaml) →
DeepSpeed bf16 engine → validation → checkpoints → resume, and reads what the run recorded. On a machine without a GPU,
`python bench/gpu_train_check.py --device cpu --preset tiny --seconds 1 --steps 8` runs the same runs in a
reduced form, to know the script works before device time is spent on it.

Each run is a torchrun in a session of its own (so that stopping it reaches every process it started), given
the time left before the deadline (--deadline, Unix time; else --budget_s from the start), at most
--run_timeout_s; when that is spent, or when this script gets SIGTERM, the run's whole process tree is stopped
and reported as `timeout`; runs that would start with less than --min_run_s left are reported as skipped.

Runs (each `python -m torch.distributed.run --standalone --nproc_per_node 1 launcher/train.py ...` with
`recipes/train_48k.yaml`, ds_configs/bs12.json+bf16.json, `--effec_batch_size 12`: 12 × 1 × 1 = 12 samples per
update, on a generated corpus of 240 training / 24 validation pairs of 0.8–1.2 × 1.5 × the crop length):
1. `bf16`: --steps optimizer steps from scratch (validation and a checkpoint at each epoch end, 20 steps); no
   stage preset, so ZeRO 1 with DeepSpeed's BF16 optimizer (fp32 gradient accumulation, ds_configs/bf16.json);
2. `bf16_resume`: the same run directory, `--resume auto`, 10 steps more: the step count must go on from where
   the checkpoint left it;
3. `bf16_zero3`: ZeRO-3 for half the steps (parameter partitioning and its gather/release on CUDA);
4. `bf16_nice19`: as 1 with `data.loader_nice=19` (the demo recipe's setting): data-wait share and speed beside
   run 1 (the default, 0);
5. `bf16_compile`: as 1 with `train.compile=blocks` (model/compile.py's regions, launcher/training/engine.py):
   the first step's compile time and graphs (its `compile` record), s/step and MFU beside run 1. A cold compile
   takes about a minute, so it starts only with --compile_min_s left (120 s on cuda).
--runs picks some of them (in this order).

Per run, from its metrics.jsonl: exit code, wall time, optimizer steps, s/step (median over logging intervals
after the first), samples/s, data_wait_share (median and mean), the loss of the first and last interval,
whether every grad norm is finite, and the CUDA allocator's peak (`gpu_peak_allocated_gib`) beside
launcher/plan/memory.py's estimate for the same plan, and the achieved TFLOP/s and MFU of the records (launcher/
training/mfu.py). Written to --out after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DS = "ds_configs/bs12.json+ds_configs/bf16.json"


class Stopped(Exception):
    """SIGTERM arrived (bench/_gpu_env.sh's `timeout` backstop): stop the running tree, keep the results."""


def _on_sigterm(*_) -> None:
    raise Stopped


def stop_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop torchrun and every process under it (torchrun may start its workers in sessions of their own):
    SIGTERM, which torchrun passes on, then SIGKILL for whatever is left after `grace_s`."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()


def run(name: str, args: argparse.Namespace, corpus: dict, run_dir: Path, extra: list[str], max_steps: int,
        ds: str, limit_s: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "launcher/train.py", "--ds_config", ds, "--config", "recipes/train_48k.yaml", "--effec_batch_size", "12",
           "--run_dir", str(run_dir), f"model.preset={args.preset}", f"data.segment_seconds={args.seconds}",
           f"data.train_list={corpus['train']}", f"data.valid_list={corpus['valid']}",
           f"train.max_steps={max_steps}", "train.log_interval_steps=5", "train.progress_bar=false", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        # This Python's ninja builds DeepSpeed's CPU op, as under `make`: another ninja would rebuild it (~1 min).
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    start = time.perf_counter()
    log = Path(args.out).parent / f"{name}.log"
    with open(log, "w") as f:
        # Its own session, so that a timeout stops torchrun and the training process it started alike.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | str = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            code = "timeout"
        except Stopped:
            stop_tree(proc, grace_s=3.0)
            raise
    out = {"name": name, "exit_code": code, "wall_s": time.perf_counter() - start, "limit_s": limit_s,
           "command": " ".join(cmd[1:]).replace(str(ROOT) + "/", ""), "log": str(log)}
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        out["error"] = "no metrics.jsonl: " + log.read_text()[-2000:]
        return out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    if name.endswith("_resume"):
        train = [r for r in train if r["time"] >= time.time() - out["wall_s"]]
        out["resumed_line"] = next((x for x in log.read_text().splitlines() if x.startswith("[resume]")), None)
        # The step count must go on from the checkpoint of the first run (its last step) to this run's end.
        ends = [r["step"] for r in records if r.get("kind") == "end"]
        out["resume_continues"] = bool(train) and train[0]["step"] > max_steps - 10 and ends[-1:] == [max_steps]
    out["steps"] = [r["step"] for r in train]
    if len(train) > 2:
        later = train[1:]
        step_s = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(later, later[1:])]
        if step_s:
            out["s_per_step_median"] = statistics.median(step_s)
        out["samples_per_s_median"] = statistics.median(r["samples_per_s"] for r in later)
        out["data_wait_share_median"] = statistics.median(r["data_wait_share"] for r in later)
        out["data_wait_share_mean"] = statistics.fmean(r["data_wait_share"] for r in later)
    if train:
        out["loss_first_last"] = [train[0]["loss"], train[-1]["loss"]]
        out["grad_norms_finite"] = all(r["grad_norm"] == r["grad_norm"] and abs(r["grad_norm"]) != float("inf")
                                       for r in train)
        peaks = [r["gpu_peak_allocated_gib"] for r in train if "gpu_peak_allocated_gib" in r]
        if peaks:
            out["gpu_peak_allocated_gib"] = max(peaks)
        for key in ("tflops", "mfu"):
            values = [r[key] for r in train[1:] if key in r]
            if values:
                out[f"{key}_median"] = statistics.median(values)
    compiled = [r for r in records if r.get("kind") == "compile"]
    if compiled:
        out["compile"] = {k: compiled[-1].get(k) for k in ("regions", "graphs", "graph_breaks", "first_step_s")}
        out["recompiles"] = sum(1 for r in records if r.get("kind") == "recompile")
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").exists() else None
    ds_config = json.loads((run_dir / "ds_config.json").read_text()) if (run_dir / "ds_config.json").exists() else None
    if plan and ds_config:
        from types import SimpleNamespace

        from launcher.plan.memory import MemoryEstimateError, estimate_for

        try:
            out["estimate_gib"] = estimate_for(SimpleNamespace(**plan), ds_config, args.preset).total / 2**30
        except MemoryEstimateError as e:
            out["estimate_gib"] = f"n/a: {e}"
    valid = [r for r in records if r.get("kind") == "valid"]
    if valid:
        out["valid_si_snr_improvement_db"] = [round(r["si_snr_improvement_db"], 2) for r in valid]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--preset", default="mossformer2_se_48k")
    ap.add_argument("--seconds", type=float, default=4.0, help="crop length")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of the from-scratch runs")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mf2_gpu_train"))
    ap.add_argument("--run_timeout_s", type=float, default=150, help="at most this long per run")
    ap.add_argument("--budget_s", type=float, default=260.0, help="the whole script's time, from its start")
    ap.add_argument("--deadline", type=float, default=None,
                    help="Unix time by which the script must be done (bench/_gpu_env.sh passes it)")
    ap.add_argument("--min_run_s", type=float, default=None,
                    help="skip a run that would start with less time left (default: 45 on cuda, 10 on cpu)")
    ap.add_argument("--compile_min_s", type=float, default=None,
                    help="the same for bf16_compile, whose first step compiles (default: 120 on cuda, 90 on cpu)")
    ap.add_argument("--runs", default="bf16,bf16_resume,bf16_zero3,bf16_nice19,bf16_compile",
                    help="which runs, comma-separated (bf16_resume continues bf16's run directory)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "gpu_train_check.json")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Kept back for the table, the JSON and the exit; a stopped run's tree needs up to 10 s more.
    deadline = min(time.time() + args.budget_s, args.deadline or float("inf")) - 15.0
    min_run_s = args.min_run_s if args.min_run_s is not None else (45.0 if args.device == "cuda" else 10.0)
    signal.signal(signal.SIGTERM, _on_sigterm)

    from data import make_demo_corpus

    t = time.perf_counter()
    corpus = make_demo_corpus(args.workdir / "corpus", num_train=240, num_valid=24, seconds=1.5 * args.seconds)
    result: dict = {"device": args.device, "preset": args.preset, "seconds": args.seconds, "steps": args.steps,
                    "corpus_s": time.perf_counter() - t, "runs": []}
    try:
        import torch

        if args.device == "cuda" and torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name(0)
        result["torch"] = torch.__version__
    except ImportError:
        pass
    print(f"corpus ready in {result['corpus_s']:.1f} s", flush=True)

    half = max(4, args.steps // 2)
    plan = [
        ("bf16", "bf16", [], args.steps, DS),
        ("bf16_resume", "bf16", ["--resume", "auto"], args.steps + 10, DS),
        ("bf16_zero3", "zero3", [], half, DS + "+ds_configs/zero3.json"),
        ("bf16_nice19", "nice19", ["data.loader_nice=19"], args.steps, DS),
        ("bf16_compile", "compile", ["train.compile=blocks"], args.steps, DS),
    ]
    wanted = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = sorted(set(wanted) - {p[0] for p in plan})
    if unknown:
        ap.error(f"--runs: unknown run(s) {', '.join(unknown)}; choose from {', '.join(p[0] for p in plan)}")
    compile_min_s = args.compile_min_s if args.compile_min_s is not None else (120.0 if args.device == "cuda" else 90.0)
    try:
        for name, folder, extra, steps, ds in [p for p in plan if p[0] in wanted]:
            left = deadline - time.time()
            needed = compile_min_s if name == "bf16_compile" else min_run_s
            if left < needed:
                result["runs"].append({"name": name, "skipped": f"time budget ({left:.0f} s left, a run needs "
                                                                 f"{needed:.0f})"})
                continue
            if not name.endswith("_resume"):
                subprocess.run(["rm", "-rf", str(args.workdir / folder)], check=True)
            r = run(name, args, corpus, args.workdir / folder, extra, steps, ds, min(args.run_timeout_s, left))
            result["runs"].append(r)
            args.out.write_text(json.dumps(result, indent=1))
            print(json.dumps({k: v for k, v in r.items() if k not in ("command", "log")}), flush=True)
    except Stopped:
        result["stopped"] = f"SIGTERM during run {name}: its process tree was stopped"
        print(result["stopped"], flush=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"launcher/train.py on {result.get('gpu', args.device)}: {args.preset}, 12 × {args.seconds:g} s, bf16")
    for col in ("run", "exit", "steps", "s/step", "samples/s", "TFLOP/s (MFU)", "data wait (median / mean)",
                "peak GiB (estimate)", "loss first → last"):
        table.add_column(col, justify="right")
    for r in result["runs"]:
        if "skipped" in r:
            table.add_row(r["name"], "skipped", "", "", "", "", "", "", "")
            continue
        fmt = lambda k, f: f.format(r[k]) if isinstance(r.get(k), (int, float)) else "-"  # noqa: E731
        steps = r.get("steps") or []
        table.add_row(
            r["name"], str(r["exit_code"]), f"{steps[0]}…{steps[-1]}" if steps else "-", fmt("s_per_step_median", "{:.3f}"),
            fmt("samples_per_s_median", "{:.1f}"),
            f"{fmt('tflops_median', '{:.3g}')} ({fmt('mfu_median', '{:.1%}')})",
            f"{fmt('data_wait_share_median', '{:.2%}')} / {fmt('data_wait_share_mean', '{:.2%}')}",
            f"{fmt('gpu_peak_allocated_gib', '{:.2f}')} ({fmt('estimate_gib', '{:.2f}')})",
            " → ".join(f"{x:.3f}" for x in r.get("loss_first_last", [])),
        )
    Console(width=160).print(table)
    result["wall_s"] = time.perf_counter() - start
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} after {result['wall_s']:.0f} s")
    failed = [r["name"] for r in result["runs"] if "skipped" not in r and (r.get("exit_code") != 0 or "error" in r
                                                                          or r.get("resume_continues") is False)]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 124 if "stopped" in result else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
