"""Evaluate a checkpoint with the metrics speech-enhancement users report, on one process or many.

    python -m launcher.evaluate --checkpoint CKPT --list LIST [LIST ...] --out DIR [--enhanced_dir DIR]
                                [--batch_size N] [--metric_workers N] [--metrics pesq,stoi,si_sdr,dnsmos]
    torchrun --nproc_per_node 8 -m launcher.evaluate ...      # or: deepspeed --num_gpus 8 launcher/evaluate.py ...
    srun --ntasks-per-node 8 python -m launcher.evaluate ...  # with MASTER_ADDR and MASTER_PORT exported

CKPT is anything `train.init_from` accepts: a ClearerVoice checkpoint, a `launcher.export` file, or a run
directory (its best checkpoint, else its newest complete one, any ZeRO stage). LIST is the training list format
(`noisy clean [seconds]`), checked up front like training data (`--skip_bad` turns bad lines into rows that say
why). The model size comes from the checkpoint (an export's config, a run's preset, or the preset whose shapes a
ClearerVoice file matches), or `--preset`.

Writes DIR/metrics.csv (one row per pair in list order: PESQ-WB, STOI, ESTOI, SI-SDR and DNSMOS P.835 SIG/BAK/OVRL
of the enhanced signal, the same with `_noisy` for the input, and `notes` saying why an empty cell is empty),
DIR/summary.json (means, and mean improvements over the input on the pairs where both are defined) and prints
a table. With --enhanced_dir the enhanced 48 kHz WAVs are written under the noisy files' names, keeping the
folders below the noisy files' common folder, so equal names in different folders do not collide.

Each file is enhanced as `model.enhance` does (no level normalisation, one pass up to 20 s, 4 s windows every
3 s beyond). Files are batched only where that changes nothing: equal frame counts (one pass) or equal window
counts (windowed), so the numbers do not depend on --batch_size or on the number of ranks. The metrics are CPU
work: --metric_workers processes per rank compute them (and write the WAVs) while the model enhances the next
batch. Under a launcher the batches are spread over the ranks (balanced by audio length); rank 0 merges the
rows in list order: the files equal those of one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `deepspeed launcher/evaluate.py` puts launcher/ itself first on sys.path; the packages live one up.
_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)

import argparse  # noqa: E402
import os  # noqa: E402

from launcher.checkpoint.weights import InitError  # noqa: E402
from launcher.dist.env import DistEnv, EnvError, read_dist_env, refuse  # noqa: E402
from launcher.dist.group import close_group, rendezvous_env, start_group  # noqa: E402
from launcher.scoring.batches import SAMPLE_RATE_HZ  # noqa: E402
from launcher.scoring.model import load_model  # noqa: E402
from launcher.scoring.pairs import PairOptions, read_pairs  # noqa: E402
from launcher.scoring.results import GROUPS, EvaluateError, parse_groups, print_table  # noqa: E402
from launcher.scoring.run import ScoreSettings, score_share, write_results  # noqa: E402
from launcher.scoring.score import default_metric_workers  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="ClearerVoice checkpoint, launcher.export file or run directory")
    p.add_argument("--list", required=True, nargs="+", help="list file(s) of `noisy clean [seconds]` lines")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.csv and summary.json")
    p.add_argument("--enhanced_dir", default=None, help="also write the enhanced 48 kHz WAVs here")
    p.add_argument("--batch_size", type=int, default=8,
                   help="files per forward pass (one pass), or windows per forward pass (files over 20 s)")
    p.add_argument("--metric_workers", type=int, default=None,
                   help="metric processes per rank (0: in the rank; default: the rank's CPUs minus one, at most 8)")
    p.add_argument("--metrics", default=",".join(GROUPS),
                   help=f"comma-separated groups of {', '.join(GROUPS)} (stoi includes ESTOI); default all")
    p.add_argument("--preset", default=None, help="model size, when the checkpoint does not tell it")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--resample", action="store_true", help="accept files at other rates (resampled to 48 kHz)")
    p.add_argument("--skip_bad", action="store_true", help="bad list lines become rows with a note, not an error")
    p.add_argument("--cache_dir", default=None, help="where the audio header cache goes (default: beside the list)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    return p.parse_args(argv)


def _checked(args: argparse.Namespace, env: DistEnv):
    """(metric groups, the checkpoint's model, what was loaded); every rank reads the weights before any process
    group, so a bad checkpoint stops them all here."""
    import torch

    groups = parse_groups(args.metrics)
    if args.batch_size < 1:
        raise EvaluateError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.metric_workers is not None and args.metric_workers < 0:
        raise EvaluateError(f"--metric_workers must be >= 0, got {args.metric_workers}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("--device cuda: no CUDA device is available")
    if env.world_size > 1:
        rendezvous_env(env)
    model, loaded = load_model(args.checkpoint, args.preset)
    return groups, model, loaded


def _device(choice: str, env: DistEnv):
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        device = torch.device(f"cuda:{env.local_rank}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        env = read_dist_env(local_rank_arg=args.local_rank)
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        groups, model, loaded = _checked(args, env)
    except (EvaluateError, InitError, EnvError) as e:
        return refuse(env.rank, e)
    device = _device(args.device, env)
    workers = args.metric_workers if args.metric_workers is not None else default_metric_workers(env.local_world_size)
    if env.world_size > 1:
        start_group(env, "nccl" if device.type == "cuda" else "gloo")
    try:
        options = PairOptions(args.resample, args.skip_bad, args.cache_dir, args.enhanced_dir)
        pairs = read_pairs(args.list, options, env.rank, env.world_size)
    except EvaluateError as e:
        return _close(env, refuse(env.rank, e))
    say = (lambda line: print(line, flush=True)) if env.rank == 0 else (lambda line: None)
    seconds_of_audio = sum(i.samples for i in pairs.items) / SAMPLE_RATE_HZ
    say(f"[evaluate] {loaded}")
    say(f"[evaluate] {len(pairs.items)} pairs ({seconds_of_audio / 3600:.2f} h) from {', '.join(args.list)}"
        + (f"; {len(pairs.skipped)} bad line(s) skipped" if pairs.skipped else "")
        + (f"; {len(pairs.index.malformed)} malformed line(s) skipped" if len(pairs.index.malformed) else "")
        + f"; {env.world_size} rank(s) on {device.type}, {workers} metric worker(s) each")
    settings = ScoreSettings(args.batch_size, workers, groups, args.resample)
    merged, seconds = score_share(model.to(device), pairs, settings, device, env.rank, env.world_size, say)
    if merged is not None:
        about = {"checkpoint": str(args.checkpoint), "model": loaded, "lists": list(args.list),
                 "world_size": env.world_size, "device": device.type, "metric_workers": workers,
                 "batch_size": args.batch_size}
        summary = write_results(args.out, merged, pairs, groups, seconds, about)
        print_table(summary, f"{len(pairs.items)} pairs, {args.checkpoint}")
        say(f"[evaluate] wrote {args.out / 'metrics.csv'} and summary.json"
            + (f", enhanced WAVs under {args.enhanced_dir}" if args.enhanced_dir else "")
            + f"; {seconds:.1f} s, {len(pairs.items) / max(seconds, 1e-9):.2f} pairs/s")
    return _close(env, 0)


def _close(env: DistEnv, code: int) -> int:
    if env.world_size > 1:
        close_group()
    return code


if __name__ == "__main__":
    code = main()
    # As launcher/train.py: leave without the interpreter's finalization, where leftover gloo threads can abort
    # a process that has already finished its work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
