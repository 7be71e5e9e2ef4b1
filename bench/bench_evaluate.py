"""Evaluation throughput (not a test): pairs/s of `launcher.evaluate`'s pipeline with 0, 1 and 2 metric workers,
against the model alone (enhancement only, no metrics: the ceiling the metric workers try to reach).

    .venv/bin/python bench/bench_evaluate.py [--preset tiny] [--pairs 40] [--repeats 2] [--out bench/results/evaluate.json]

The pairs are the demo corpus's validation pairs (generated under runs/demo_corpus if missing), repeated to
`--pairs`; the model is a freshly initialised one of `--preset` (its weights do not change the cost). Each repeat
runs every configuration once, in turn, so that all see the same machine load; the medians are reported, with
the ratio to the model alone. Every configuration runs the whole pipeline as the command does: the reader
thread, the batches of equal frame counts, the spawned metric workers (their start-up included) and all four
metric groups (PESQ, STOI+ESTOI, SI-SDR, DNSMOS) for the enhanced signal and the noisy input. Then the cost
of each metric group per pair, in this process. The load average before and after each repeat is recorded: on a
shared machine it says how far to trust the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import machine  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--workers", default="0,1,2", help="metric worker counts to measure")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "evaluate.json")
    args = p.parse_args()

    import torch

    from data import PairIndex, make_demo_corpus
    from data.validation import validate
    from launcher.scoring.audio import read_audio
    from launcher.scoring.results import GROUPS
    from launcher.scoring.batches import SAMPLE_RATE_HZ, Item, plan_batches
    from launcher.scoring.score import enhance_and_score, enhance_files
    from model import build_model

    corpus = make_demo_corpus(REPO / "runs" / "demo_corpus")
    index, _ = validate(PairIndex.from_lists([corpus["valid"]]), use_cache=False)
    base = [(index.pair(i), int(round(float(index.durations[i]) * SAMPLE_RATE_HZ))) for i in range(len(index))]
    items = [Item(k, base[k % len(base)][0][0], base[k % len(base)][0][1], base[k % len(base)][1])
             for k in range(args.pairs)]
    batches = plan_batches([i.samples for i in items], args.batch_size)
    torch.manual_seed(0)
    model = build_model(args.preset).eval()
    device = torch.device("cpu")
    audio_s = sum(i.samples for i in items) / SAMPLE_RATE_HZ

    def model_alone() -> None:
        for batch in batches:  # reading and enhancing, as the pipeline does before it hands out the metrics
            enhance_files(model, [read_audio(items[k].noisy, False) for k in batch], args.batch_size, device)

    configs = {"model alone": model_alone}
    for w in (int(x) for x in args.workers.split(",")):
        configs[f"{w} metric workers"] = (lambda w=w: enhance_and_score(
            model, items, batches, device=device, batch_size=args.batch_size, metric_workers=w, groups=GROUPS))
    times: dict[str, list[float]] = {name: [] for name in configs}
    loads = []
    for repeat in range(args.repeats):
        before = os.getloadavg()
        for name, run in configs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
            print(f"repeat {repeat + 1}: {name}: {times[name][-1]:.1f} s", flush=True)
        loads.append({"before": before, "after": os.getloadavg()})

    # What each metric group costs, for the enhanced signal and the input together, in this process (so with its
    # threads): where the time of a pair goes, and what --metrics saves.
    from model.metrics import METRIC_GROUPS, pair_metrics

    sample = items[:min(len(items), len(base), 10)]
    enhanced = enhance_files(model, [read_audio(i.noisy, False) for i in sample], 1, device)
    cleans = [read_audio(i.clean, False) for i in sample]
    group_cost = {}
    for group in ["dnsmos", *[g for g in METRIC_GROUPS if g != "dnsmos"]]:  # DNSMOS first: it warms librosa up
        pair_metrics(enhanced[0], read_audio(sample[0].noisy, False), cleans[0], SAMPLE_RATE_HZ, [group])
        t0 = time.perf_counter()
        for item, e, c in zip(sample, enhanced, cleans):
            pair_metrics(e, read_audio(item.noisy, False), c, SAMPLE_RATE_HZ, [group])
        group_cost[group] = (time.perf_counter() - t0) / len(sample)
        print(f"{group}: {group_cost[group]:.3f} s per pair (enhanced + noisy)", flush=True)

    alone = statistics.median(times["model alone"])
    results = []
    for name, ts in times.items():
        median = statistics.median(ts)
        results.append({"config": name, "median_s": median, "times_s": ts, "pairs_per_s": args.pairs / median,
                        "audio_s_per_s": audio_s / median, "ratio_to_model_alone": alone / median})
    record = {"machine": machine(), "torch_threads": torch.get_num_threads(),
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "preset": args.preset, "pairs": args.pairs,
              "audio_seconds": audio_s, "batch_size": args.batch_size, "repeats": args.repeats,
              "load_average_1_5_15_min": loads, "results": results,
              "metric_seconds_per_pair_in_process": group_cost, "metric_pairs_measured": len(sample)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for r in results:
        print(f"{r['config']:>18}: {r['pairs_per_s']:.2f} pairs/s ({r['ratio_to_model_alone']:.2f} x model alone)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
