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
import collections  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

SAMPLE_RATE_HZ = 48000  # the model's rate (model.features.SAMPLE_RATE_HZ; not imported here to keep start-up light)
DECIMALS = 6  # metric values are rounded once, where computed: the CSV and the means then never depend on
# the last bits that numpy's alignment-dependent sums leave (STOI varied in the 16th digit between two calls)
GROUPS = ("pesq", "stoi", "si_sdr", "dnsmos")


class EvaluateError(RuntimeError):
    """Bad input to an evaluation (arguments, lists, output folders); the message says what and how to fix it."""


@dataclass(frozen=True)
class Item:
    """One pair to enhance and score. `row` is its place in the output; `samples` (at 48 kHz) plans batches."""

    row: int
    noisy: str
    clean: str
    samples: int
    out: str | None = None  # where its enhanced WAV goes


# ---- batching ------------------------------------------------------------------------------------------
def batch_key(samples: int) -> tuple[str, int]:
    """Files with one key can share a batch without changing any output: ("short", -1) for files under one 40 ms
    frame (not enhanced), ("one", frames) for one-pass files, ("windows", count) for windowed ones. Zero-padding
    below one hop leaves the frames alone; windows past a file's end are cut away."""
    from model.features import HOP, N_FFT
    from model.inference import ONE_PASS_MAX_SECONDS, STRIDE_SECONDS, WINDOW_SECONDS

    if samples < N_FFT:
        return ("short", -1)
    if samples <= ONE_PASS_MAX_SECONDS * SAMPLE_RATE_HZ:
        return ("one", 1 + (samples - N_FFT) // HOP)
    window, stride = int(WINDOW_SECONDS * SAMPLE_RATE_HZ), int(STRIDE_SECONDS * SAMPLE_RATE_HZ)
    return ("windows", max(1, math.ceil((samples - (window - stride) // 2) / stride)))


def plan_batches(samples: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions into `samples` grouped into batches of one key (see batch_key), at most `batch_size` files, or
    for windowed files at most `batch_size` windows (at least one file). In key order, then list order."""
    by_key: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for position, n in enumerate(samples):
        by_key[batch_key(n)].append(position)
    batches = []
    for key in sorted(by_key):
        members = by_key[key]
        size = max(1, batch_size // key[1]) if key[0] == "windows" else batch_size
        batches += [members[k:k + size] for k in range(0, len(members), size)]
    return batches


def assign_batches(batches: Sequence[Sequence[int]], samples: Sequence[int], world_size: int) -> list[list[int]]:
    """Batch numbers per rank: the longest first, each to the least loaded rank (audio samples as the cost).
    Every rank computes the same answer from the same list, so nothing is sent."""
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(range(len(batches)), key=lambda b: (-len(batches[b]) * max(samples[p] for p in batches[b]), b))
    for b in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(b)
        load[rank] += len(batches[b]) * max(samples[p] for p in batches[b])
    return [sorted(share) for share in shares]


# ---- audio ---------------------------------------------------------------------------------------------
def read_audio(path: str, resample: bool) -> np.ndarray:
    """A whole file's first channel at 48 kHz, float32 numpy; data.audio reads and, if asked, resamples."""
    import soundfile as sf

    from data import DataError
    from data.audio import describe_error, frames_at, read_window

    try:
        with sf.SoundFile(path) as f:
            if f.samplerate != SAMPLE_RATE_HZ and not resample:
                raise DataError(f"{path}: sample rate {f.samplerate} Hz, expected {SAMPLE_RATE_HZ} Hz (pass --resample)")
            return read_window(f, 0, frames_at(f.frames, f.samplerate, SAMPLE_RATE_HZ), SAMPLE_RATE_HZ)
    except DataError:
        raise
    except Exception as e:  # libsndfile's errors: all name the file
        raise DataError(f"{path}: cannot read: {describe_error(e, path)}") from None


def write_wav(path: str, waveform: np.ndarray) -> None:
    """16-bit PCM at 48 kHz, written beside and renamed into place (a rank never leaves half a file)."""
    import numpy as np
    import soundfile as sf

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.wav"
    sf.write(tmp, np.clip(waveform, -1.0, 1.0), SAMPLE_RATE_HZ, subtype="PCM_16")
    os.replace(tmp, path)


def enhance_files(model, waveforms: list, batch_size: int, device) -> list:
    """Enhanced waveforms (numpy) for one planned batch; None for files under one frame. Files of one key are
    zero-padded to the longest and enhanced together (`model.enhance`), then cut back to their length."""
    import numpy as np
    import torch

    from model import enhance

    out: list = [None] * len(waveforms)
    by_key: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for k, w in enumerate(waveforms):
        if w is not None:
            by_key[batch_key(len(w))].append(k)
    for key, members in sorted(by_key.items()):
        if key[0] == "short":
            continue
        longest = max(len(waveforms[k]) for k in members)
        batch = np.zeros((len(members), longest), dtype=np.float32)
        for row, k in enumerate(members):
            batch[row, :len(waveforms[k])] = waveforms[k]
        enhanced = enhance(model, torch.from_numpy(batch).to(device), windows_per_batch=batch_size).cpu().numpy()
        for row, k in enumerate(members):
            out[k] = enhanced[row, :len(waveforms[k])].copy()
    return out


# ---- metrics, in worker processes --------------------------------------------------------------------------
def _init_metric_worker() -> None:
    # One thread each: the workers are the parallelism (and N workers x all-core pools would thrash).
    import torch

    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # only a performance hint
        pass


def score_job(job: dict) -> dict:
    """One pair's metrics (and its enhanced WAV): a row without its paths. Never raises: a failure is a note."""
    from model.metrics import METRIC_GROUPS, NOISY_SUFFIX, pair_metrics

    notes = [job["note"]] if job.get("note") else []
    row: dict[str, Any] = {"row": job["row"], "enhanced": ""}
    columns = [n + s for g in job["groups"] for n in METRIC_GROUPS[g]
               for s in ("", NOISY_SUFFIX) if s == "" or job["with_noisy"]]
    values: dict[str, float | None] = {}  # with no noisy audio (its note says why), nothing to score
    try:
        if job["noisy"] is not None:
            if job["out"] and job["enhanced"] is not None:
                write_wav(job["out"], job["enhanced"])
                row["enhanced"] = job["out"]
            clean = read_audio(job["clean"], job["resample"])
            values, why = pair_metrics(job["enhanced"], job["noisy"], clean, SAMPLE_RATE_HZ, job["groups"],
                                       enhanced_missing=job.get("enhanced_missing"), with_noisy=job["with_noisy"])
            if why:
                notes.append(why)
    except Exception as e:  # a clean file that fails to read: one row says so
        values = {c: None for c in columns}
        notes += [job["enhanced_missing"]] if job.get("enhanced_missing") else []
        notes.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": "))
    for column in columns:
        value = values.get(column)
        row[column] = None if value is None else round(value, DECIMALS)
    row["notes"] = "; ".join(notes)
    return row


class MetricPool:
    """`metric_workers` spawned processes (spawn: the parent may hold CUDA and process-group threads), or the
    calling process itself with 0. At most `max_pending` jobs wait: a model faster than its metrics then waits
    instead of filling the memory with enhanced audio."""

    def __init__(self, workers: int, max_pending: int) -> None:
        import multiprocessing

        self.executor = None if workers == 0 else ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_metric_worker)
        self.pending: collections.deque[Future] = collections.deque()
        self.max_pending = max_pending
        self.done: list[dict] = []

    def submit(self, job: dict) -> None:
        if self.executor is None:
            self.done.append(score_job(job))
            return
        while len(self.pending) >= self.max_pending:
            self.done.append(self.pending.popleft().result())
        self.pending.append(self.executor.submit(score_job, job))
        while self.pending and self.pending[0].done():
            self.done.append(self.pending.popleft().result())

    def finish(self) -> list[dict]:
        while self.pending:
            self.done.append(self.pending.popleft().result())
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        return self.done


def enhance_and_score(model, items: Sequence[Item], batches: Iterable[Sequence[int]], *, device, batch_size: int,
                      metric_workers: int, groups: Sequence[str], with_noisy: bool = True, resample: bool = False,
                      progress: Callable[[int], None] | None = None) -> list[dict]:
    """Rows (without paths) of the given batches of `items`. A background thread reads the next batch's noisy
    files while the model enhances this one; the metric pool scores finished files meanwhile."""
    batches = [list(b) for b in batches]
    pool = MetricPool(metric_workers, max_pending=4 * max(1, metric_workers) + batch_size)
    reader = ThreadPoolExecutor(1)

    def read(batch: list[int]) -> list:
        out = []
        for position in batch:
            try:
                out.append(read_audio(items[position].noisy, resample))
            except Exception as e:  # noqa: BLE001 - becomes this pair's note
                out.append(e)
        return out

    done = 0
    try:
        upcoming = reader.submit(read, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            audio = upcoming.result()
            upcoming = reader.submit(read, batches[b + 1]) if b + 1 < len(batches) else None
            waveforms = [None if isinstance(a, Exception) else a for a in audio]
            enhanced = enhance_files(model, waveforms, batch_size, device)
            for position, a, e in zip(batch, audio, enhanced):
                item = items[position]
                job = {"row": item.row, "clean": item.clean, "groups": tuple(groups), "with_noisy": with_noisy,
                       "resample": resample, "out": item.out, "enhanced": e, "noisy": a}
                if isinstance(a, Exception):
                    job.update(noisy=None, enhanced=None, note=f"noisy file: {a}")
                elif e is None:
                    job["enhanced_missing"] = f"shorter than one 40 ms frame ({len(a)} samples): not enhanced"
                if job["noisy"] is None:
                    pool.done.append(score_job(job))  # nothing to compute
                else:
                    pool.submit(job)
            done += len(batch)
            if progress is not None:
                progress(done)
        return pool.finish()
    finally:
        reader.shutdown(wait=True)
        if pool.executor is not None:
            pool.executor.shutdown(wait=True, cancel_futures=True)


# ---- results -------------------------------------------------------------------------------------------
def metric_columns(groups: Sequence[str], with_noisy: bool = True) -> list[str]:
    from model.metrics import METRIC_GROUPS, NOISY_SUFFIX

    names = [n for g in GROUPS if g in groups for n in METRIC_GROUPS[g]]
    return names + ([n + NOISY_SUFFIX for n in names] if with_noisy else [])


def summarize(rows: Sequence[dict], groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per metric: mean of the enhanced values, of the input's, and the mean improvement over the pairs where
    both are defined, with the number of pairs behind each."""
    from model.metrics import NOISY_SUFFIX

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), DECIMALS) if values else None

    out = {}
    for name in metric_columns(groups, with_noisy=False):
        enhanced = [r[name] for r in rows if r.get(name) is not None]
        noisy = [r[name + NOISY_SUFFIX] for r in rows if r.get(name + NOISY_SUFFIX) is not None]
        both = [r[name] - r[name + NOISY_SUFFIX] for r in rows
                if r.get(name) is not None and r.get(name + NOISY_SUFFIX) is not None]
        out[name] = {"enhanced": mean(enhanced), "noisy": mean(noisy), "improvement": mean(both),
                     "pairs": len(enhanced), "pairs_noisy": len(noisy), "pairs_both": len(both)}
    return out


def write_csv(path: Path, rows: Sequence[dict], groups: Sequence[str]) -> None:
    columns = ["noisy", "clean", "enhanced", "seconds", *metric_columns(groups), "notes"]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_cell(r.get(c), 3 if c == "seconds" else DECIMALS) for c in columns])
    os.replace(tmp, path)


def _cell(value: Any, decimals: int) -> str:
    if value is None:
        return ""
    return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


def print_table(summary: dict[str, dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = {"pesq_wb": "PESQ-WB", "stoi": "STOI", "estoi": "ESTOI", "si_sdr": "SI-SDR (dB)",
              "dnsmos_sig": "DNSMOS SIG", "dnsmos_bak": "DNSMOS BAK", "dnsmos_ovrl": "DNSMOS OVRL"}
    table = Table(title=title)
    for header in ("metric", "enhanced", "noisy input", "improvement", "pairs"):
        table.add_column(header, justify="left" if header == "metric" else "right")

    def fmt(v: float | None, sign: str = "") -> str:
        return "-" if v is None else f"{v:{sign}.3f}"

    for name, s in summary.items():
        table.add_row(labels.get(name, name), fmt(s["enhanced"]), fmt(s["noisy"]), fmt(s["improvement"], "+"),
                      f"{s['pairs']}" + (f" ({s['pairs_both']} both)" if s["pairs_both"] != s["pairs"] else ""))
    Console(highlight=False).print(table)


def enhanced_paths(noisy_paths: Sequence[str], enhanced_dir: str) -> list[str]:
    """Where each pair's enhanced WAV goes: the noisy file's path below the noisy files' common folder, under
    `enhanced_dir` (plain names when they share one folder; subfolders keep equal names apart otherwise)."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in noisy_paths]
    common = os.path.commonpath(folders) if folders else ""
    return [os.path.join(enhanced_dir, os.path.relpath(os.path.abspath(p), common)) for p in noisy_paths]


# ---- the command ----------------------------------------------------------------------------------------
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


def parse_groups(text: str) -> tuple[str, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise EvaluateError(f"--metrics {text!r}: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in names)


def default_metric_workers(local_world_size: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # what SLURM or a cgroup lets this process use
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_world_size) - 1))


def load_model(checkpoint: str, preset: str | None):
    """A plain fp32 model holding the checkpoint's weights, and one line saying what was loaded."""
    from launcher.init_weights import InitError, expected_shapes, match, read_weights, source_preset
    from model import PRESETS, build_model

    weights = read_weights(checkpoint)
    if preset is not None and preset not in PRESETS:
        raise InitError(f"--preset {preset}: unknown; choose from {', '.join(sorted(PRESETS))}")
    name = preset or source_preset(weights)
    config = PRESETS[name] if name else weights.config
    if config is None:
        raise InitError(f"{checkpoint}: its tensors fit none of the presets ({', '.join(sorted(PRESETS))}) and it "
                        "stores no config; pass --preset to see what does not fit")
    plan = match(weights, expected_shapes(config), strict=True, model_name=name or "stored config")
    model = build_model(config)
    model.load_state_dict(plan.state, strict=False)
    return model.eval(), f"{name or 'custom'} model: {plan.summary}"


def _items(index, out_dir: str | None, bad: dict[tuple[int, int], str], kept) -> tuple[list[Item], list[dict]]:
    """Items to evaluate (rows in list order) and the rows of bad lines skipped with --skip_bad."""
    import numpy as np

    noisy = [index.pair(i) for i in range(len(index))]
    outs = enhanced_paths([n for n, _ in noisy], out_dir) if out_dir else [None] * len(noisy)
    if out_dir:
        inputs = {os.path.realpath(p) for pair in noisy for p in pair}
        clash = next((o for o in outs if os.path.realpath(o) in inputs), None)
        if clash:
            raise EvaluateError(f"--enhanced_dir {out_dir} would overwrite the input file {clash}; choose another folder")
    durations = kept.durations
    items, skipped, k = [], [], 0
    for i, (n, c) in enumerate(noisy):
        reason = bad.get((index.list_id(i), index.line_number(i)))
        if reason is not None:
            skipped.append({"row": i, "noisy": n, "clean": c, "enhanced": "", "notes": f"skipped: {reason}"})
            continue
        seconds = float(durations[k])
        k += 1
        samples = int(round(seconds * SAMPLE_RATE_HZ)) if np.isfinite(seconds) else 0
        items.append(Item(i, n, c, samples, outs[i]))
    return items, skipped


def _validated(lists: list[str], args, rank: int, world_size: int):
    """The parsed lists and their validation (rank 0 first: the others then read its header cache)."""
    import torch.distributed as dist

    from data import DataError, PairIndex
    from data.validation import validate  # not `from data`: importing data.validate (the CLI) shadows it

    def run():
        index = PairIndex.from_lists(lists, strict=False)
        kept, report = validate(index, sample_rate_hz=SAMPLE_RATE_HZ, resample=args.resample,
                                skip_bad=args.skip_bad, cache_dir=args.cache_dir)
        return index, kept, report

    result, error = None, None
    if rank == 0:
        try:
            result = run()
        except DataError as e:
            error = str(e)
    if world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
        if error is None and rank != 0:
            result = run()
    if error is not None:
        raise EvaluateError(error)
    return result


def _init_process_group(env, device) -> None:
    """env:// from whichever launcher started us (srun's SLURM_* become RANK/WORLD_SIZE/... here)."""
    import torch.distributed as dist

    from launcher.train import COLLECTIVE_TIMEOUT_S

    os.environ.update(env.export())
    # Ranks wait for each other at the end (the slowest share) and while rank 0 validates the lists.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def gather_rows(rows: list[dict], world_size: int) -> list[dict] | None:
    """Every rank's rows on rank 0, in row order (None on the other ranks)."""
    if world_size == 1:
        return sorted(rows, key=lambda r: r["row"])
    import torch.distributed as dist

    everything = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(rows, everything, dst=0)
    if everything is None:
        return None
    return sorted((r for part in everything for r in part), key=lambda r: r["row"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from launcher.dist_env import EnvError, read_dist_env, refuse
    from launcher.init_weights import InitError

    try:
        env = read_dist_env(local_rank_arg=args.local_rank)
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank0 = env.rank == 0

    def fail(message: str) -> int:
        return refuse(env.rank, message)

    import torch

    try:
        groups = parse_groups(args.metrics)
        if args.batch_size < 1:
            raise EvaluateError(f"--batch_size must be >= 1, got {args.batch_size}")
        if args.metric_workers is not None and args.metric_workers < 0:
            raise EvaluateError(f"--metric_workers must be >= 0, got {args.metric_workers}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise EvaluateError("--device cuda: no CUDA device is available")
        if env.source == "slurm" and (not env.master_addr or not env.master_port):
            raise EvaluateError("under srun, export MASTER_ADDR (the first host of the job) and MASTER_PORT")
        # Every rank reads the weights before any process group: a bad checkpoint stops them all here.
        model, loaded = load_model(args.checkpoint, args.preset)
    except (EvaluateError, InitError) as e:
        return fail(str(e))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{env.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    workers = args.metric_workers if args.metric_workers is not None else default_metric_workers(env.local_world_size)
    if env.world_size > 1:
        _init_process_group(env, device)
    try:
        index, kept, report = _validated(args.list, args, env.rank, env.world_size)
        bad = {(p.list_id, p.line_no): f"{p.path}: {p.reason}" for p in report.problems} if args.skip_bad else {}
        items, skipped = _items(index, args.enhanced_dir, bad, kept)
    except EvaluateError as e:
        return _close(env, fail(str(e)))
    if rank0:
        print(f"[evaluate] {loaded}", flush=True)
        print(f"[evaluate] {len(items)} pairs ({sum(i.samples for i in items) / SAMPLE_RATE_HZ / 3600:.2f} h) from "
              f"{', '.join(args.list)}" + (f"; {len(skipped)} bad line(s) skipped" if skipped else "")
              + (f"; {len(index.malformed)} malformed line(s) skipped" if len(index.malformed) else "")
              + f"; {env.world_size} rank(s) on {device.type}, {workers} metric worker(s) each", flush=True)
    model = model.to(device)
    samples = [i.samples for i in items]
    batches = plan_batches(samples, args.batch_size)
    mine = [batches[b] for b in assign_batches(batches, samples, env.world_size)[env.rank]]
    total = sum(len(b) for b in mine)
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int) -> None:
        now = time.perf_counter()
        if rank0 and (now - last[0] > 10 or done == total):
            last[0] = now
            print(f"[evaluate] rank 0: {done}/{total} pairs of its share, {done / (now - t0):.2f} pairs/s", flush=True)

    rows = enhance_and_score(model, items, mine, device=device, batch_size=args.batch_size, metric_workers=workers,
                             groups=groups, resample=args.resample, progress=progress)
    seconds = time.perf_counter() - t0
    paths = {i.row: (i.noisy, i.clean, i.samples / SAMPLE_RATE_HZ) for i in items}
    for r in rows:
        r["noisy"], r["clean"], r["seconds"] = paths[r["row"]]
    merged = gather_rows(rows, env.world_size)
    if merged is not None:
        merged = sorted(merged + skipped, key=lambda r: r["row"])
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(args.out / "metrics.csv", merged, groups)
        summary = summarize(merged, groups)
        record = {"checkpoint": str(args.checkpoint), "model": loaded, "lists": list(args.list),
                  "pairs": len(merged), "evaluated": len(items), "skipped_bad_lines": len(skipped),
                  "malformed_lines": len(index.malformed), "pairs_with_notes": sum(1 for r in merged if r.get("notes")),
                  "world_size": env.world_size, "device": device.type, "metric_workers": workers,
                  "batch_size": args.batch_size, "seconds": round(seconds, 3),
                  "pairs_per_s": round(len(items) / seconds, 3) if seconds > 0 else None, "metrics": summary}
        (args.out / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
        print_table(summary, f"{len(items)} pairs, {args.checkpoint}")
        print(f"[evaluate] wrote {args.out / 'metrics.csv'} and summary.json"
              + (f", enhanced WAVs under {args.enhanced_dir}" if args.enhanced_dir else "")
              + f"; {seconds:.1f} s, {len(items) / max(seconds, 1e-9):.2f} pairs/s", flush=True)
    return _close(env, 0)


def _close(env, code: int) -> int:
    if env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    code = main()
    # As launcher/train.py: leave without the interpreter's finalization, where leftover gloo threads can abort
    # a process that has already finished its work.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
