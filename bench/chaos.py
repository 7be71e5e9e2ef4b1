"""Chaos: a seeded storm of faults in one demo-sized training run, a supervisor that restarts it after each one
as SLURM's requeue would, and the proof from the run's own records that nothing was lost (issue 21).

    python bench/chaos.py --seed 7                   # the short storm (>= 8 faults): what tests/test_chaos.py runs
    python bench/chaos.py --size long --seed 7       # >= 30 faults, and the control run: the bench's figures
    python bench/chaos.py --size long --seed 7 --same_world     # no world change: final weights bit-identical
    python bench/chaos.py --seed 7 --disk run        # the small disk holds the whole run directory
    python bench/chaos.py --seed 7 --schedule        # print the schedule only
    python bench/chaos.py --seed 7 --control         # also the control run (what the world changes alone did)

Run as root (the small disk is a tmpfs it mounts and unmounts; without root, disk-full faults become kill -9 of
the job), with DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 and the venv's bin first on PATH, as the tests do.

Interface. Only what survives the launcher's restructuring (issue 18): the command line
(`deepspeed launcher/train.py ... --resume auto` with recipe overrides), MF2_TEST_FAULT and MF2_TEST_FAULT_DIR
(launcher/testing/faults.py's test hooks), the run directory's files (metrics.jsonl, checkpoints/stepN/COMPLETE.json
and DeepSpeed's files), the exit codes 0, 1, 2 and 75, and signals to the pids of the job's process tree. No
launcher module is imported.

The records the proof needs from the trainer (rank 0, metrics.jsonl; bench/chaos_proof.py reads them):

    {"kind": "attempt", "attempt": ID, "step": S0, "resumed_from": {"tag": TAG, "attempt": ID0} | null,
     "world_size": W, "micro_batch": m, "accumulation_steps": a, "global_batch": G,
     "sampler": {"epoch", "cursor", "seed", "num_samples", "epoch_quantum", "shuffle"}}
        once per process start, after resuming and before the first step. ID: 12 hex digits (uuid4), new at
        every start; S0: the engine's step count after loading (0 for a fresh start); ID0: the attempt id that
        the loaded checkpoint's COMPLETE.json records under "attempt" (every save writes its own ID there).
    {"kind": "samples", "attempt": ID, "step": N, "epoch": E, "cursor": [c0, c1], "digest": HEX16, "applied": B}
        once per optimizer step, as soon as it is taken (before that step's validation or save). E is 1-based
        like the other records; [c0, c1) are the positions of epoch E's permutation (data/sampler.py) that the
        step consumed on all ranks together (c1 - c0 = G); HEX16: the first 16 hex digits of the SHA-256 of
        those sample indices as little-endian int64 in position order; B: false when the step was skipped
        (non-finite loss or gradients), so its samples were consumed but changed nothing.
    COMPLETE.json gains "attempt": ID (the process that wrote the checkpoint).

A restart's re-done steps are told apart by their attempt id: a later attempt that resumed at S0 supersedes
every step after S0 that earlier attempts recorded (see chaos_proof.counted_chain).

The run. The demo recipe's tiny model on a generated corpus (96 training pairs, 48 validation pairs), ZeRO-2
(so that a world change goes through DeepSpeed's universal checkpoint), a global batch of 24 = 4 × 3 × 2 =
4 × 6 × 1 = 4 × 2 × 3 (worlds 1, 2 and 3 hold it), 4 optimizer steps per epoch, a checkpoint every 2 steps and
at each epoch end, keep_last 2, small watchdog budgets (train.step_timeout_s 5, slow_phase_timeout_s 20).

The schedule (drawn from the seed, printed; `--seed` replays it). Ending faults end an attempt: kill -9 of one
rank, kill -9 of the whole job (launcher, ranks and their children: a node crash), SIGUSR1 preemption of every
rank or of one (exit 75 expected), SIGSTOP of one rank (the watchdog must end the job, exit 1), disk full (the
checkpoints folder is a small tmpfs, filled to 64 KB; exit 1 naming the disk). Each fires in a phase: inside the
first step, mid-epoch, during validation, during a save (the ranks held at launcher/testing/faults.py's
pause@save:before_write or before_marker), at an epoch end after validation, during the universal-checkpoint
conversion of a resume on another world or the load that follows it. Between attempts: the newest checkpoint
corrupted (a flipped byte), truncated (a file cut short) or its COMPLETE.json cut short, always while an older
intact one exists; after a fault in a resume, the universal copy it left (a flipped byte); the world changed
(2 → 1 → 2, and 3). Throughout: non-finite gradients at a drawn step
(MF2_TEST_FAULT=nonfinite_grad@STEP@RANK), which the uninterrupted run gets too: it is a property of the data.

Timing. Faults fire at a random fraction of the phase's duration (measured on the uninterrupted run), counted
from the event that opens the phase: the attempt record (first step), a samples record (mid-epoch, validation),
a valid record (epoch end), the ranks' pause files (save), the converter process appearing or ending (resume).
Where it really landed is read at the moment it fires (records so far, a tag folder without its marker, the
converter still running) and reported as the phase hit.

The supervisor restarts after every fault with `--resume auto` on a fresh port, as a requeue would, after
removing what the fault left (the filler file of a full disk, a stopped rank); like srun's --kill-on-bad-exit
it kills the job's processes GRACE_S after one rank ended if the launcher has not, and it names any process of
the run that outlived the launcher. It checks each attempt's end against the fault (exit 75 for a preemption, 1 and
the watchdog naming the stopped rank, 1 and the disk named, no intact checkpoint passed over) and, while every
attempt ran on world 2, every checkpoint against the uninterrupted run's, tensor for tensor.

The proof (bench/chaos_proof.py) then reads the records. Where the counted steps changed world, the control run
(--control; always with --size long) replays the storm's world history without faults: the storm must equal it
bit for bit, which leaves the world changes alone to explain the drift from the uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos_proof  # noqa: E402
from _common import machine  # noqa: E402

BIN = Path(sys.executable).parent
MARKER = "COMPLETE.json"
GLOBAL_BATCH, MICRO = 24, 4
TRAIN_PAIRS, VALID_PAIRS = 96, 48
STEPS_PER_EPOCH = TRAIN_PAIRS // GLOBAL_BATCH
SAVE_EVERY = 2
STEP_TIMEOUT_S, SLOW_TIMEOUT_S = 5, 20
# After one rank ended, the job step's other processes get this long (srun --kill-on-bad-exit): above the 5 s that
# ranks other than 0 wait after a shared refusal so that rank 0's message gets out (launcher/dist_env.py).
GRACE_S = 10.0
ATTEMPT_TIMEOUT_S = 240.0
TMPFS_MB = 48

ENDINGS = ("kill_rank", "kill_all", "preempt", "stop_rank", "disk_full")
PHASES = ("first_step", "mid_epoch", "validation", "save", "epoch_end")
RESUME_PHASES = ("conversion", "resume_load")
BETWEEN = ("corrupt", "truncate", "truncate_marker")
# After a resume-phase fault the universal copy made for it may be complete; the next attempt on that world reuses
# it, unless the copy no longer verifies (the copy is a checkpoint's files like any other: bit rot, a torn write).
UNIVERSAL = "corrupt_universal"


# ---- the schedule ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    kind: str
    phase: str = "between"
    at_step: int = 0  # the phase's event at or after this step of the run (the storm's progress point)
    fraction: float = 0.0  # where in the phase's measured duration it fires
    rank: int = 0
    variant: str = ""  # preempt: all | one; between-attempts faults: the seed of their own choices
    point: str = ""  # save: where the ranks are held (launcher/faults.py's pause@save:POINT)

    def describe(self) -> str:
        who = f" rank {self.rank}" if self.kind in ("kill_rank", "stop_rank", "nonfinite") else ""
        how = f" ({self.variant})" if self.variant and self.phase != "between" else ""
        how += f" (held {self.point})" if self.point else ""
        if self.phase == "between":
            return f"{self.kind}{who}{how}"
        if self.phase == "throughout":
            return f"non-finite gradients at step {self.at_step} on rank {self.rank}"
        return f"{self.kind}{who}{how} @ {self.phase} from step {self.at_step}, fraction {self.fraction:.2f}"


@dataclass(frozen=True)
class AttemptPlan:
    world: int
    before: tuple[Fault, ...] = ()
    ending: Fault | None = None


@dataclass(frozen=True)
class Schedule:
    seed: int
    size: str
    epochs: int
    nonfinite: tuple[Fault, ...]
    attempts: tuple[AttemptPlan, ...]

    @property
    def total_steps(self) -> int:
        return self.epochs * STEPS_PER_EPOCH

    def fault_count(self) -> int:
        worlds = [2] + [a.world for a in self.attempts]
        resizes = sum(a != b for a, b in zip(worlds, worlds[1:]))
        return (len(self.nonfinite) + resizes + sum(len(a.before) for a in self.attempts)
                + sum(a.ending is not None for a in self.attempts))

    def lines(self) -> list[str]:
        out = [f"seed {self.seed}, {self.size} storm: {self.epochs} epochs × {STEPS_PER_EPOCH} steps = "
               f"{self.total_steps} optimizer steps, {self.fault_count()} faults"]
        out += [f"  throughout: {f.describe()}" for f in self.nonfinite]
        for i, a in enumerate(self.attempts, 1):
            parts = [f"world {a.world}"] + [f"before: {f.describe()}" for f in a.before]
            parts.append(f"ends by: {a.ending.describe()}" if a.ending else "runs to the end")
            out.append(f"  attempt {i}: " + "; ".join(parts))
        return out


# The storms' shapes: (world, ending faults, whether the first of them strikes the resume) per segment; a final
# attempt on world 2 runs to the end. Each segment after the first starts on another world: its first attempt
# converts the checkpoint to the universal format (and, where marked, is struck there).
SHAPES = {
    "short": dict(epochs=4, segments=((2, 3, False), (1, 2, True), (2, 1, False)), between=2, nonfinite=1),
    "long": dict(epochs=12, segments=((2, 16, False), (1, 3, True), (2, 3, True), (3, 3, True), (2, 2, True)),
                 between=6, nonfinite=2),
}


def draw_schedule(seed: int, size: str = "short", same_world: bool = False) -> Schedule:
    """The faults of a storm, from the seed alone (random.Random: the same on every machine and Python).

    short (7 attempts): each ending fault once in its own phase (stop_rank mid-epoch, where the watchdog's budget
    is the short one: elsewhere a stop costs train.slow_phase_timeout_s) plus one in the resume of 2 → 1; two
    checkpoint corruptions; one non-finite step; worlds 2 → 1 → 2. long (28 attempts): 27 ending faults cycling
    through kinds and phases, 4 of them in resumes (2 → 1 → 2 → 3 → 2), 6 corruptions, 2 non-finite steps.
    same_world keeps world 2 throughout (resume-phase faults then strike other phases).
    """
    rng = random.Random(seed)
    shape = SHAPES[size]
    epochs = shape["epochs"]
    total = epochs * STEPS_PER_EPOCH
    segments = [(2 if same_world else w, n, resume and not same_world) for w, n, resume in shape["segments"]]
    ordinary = sum(n - resume for _, n, resume in segments)

    def ending(kind: str, phase: str, at: int) -> Fault:
        point = rng.choice(("before_write", "before_marker")) if phase == "save" else ""
        variant = rng.choice(("all", "one")) if kind == "preempt" else ""
        low, high = {"epoch_end": (0.0, 0.6)}.get(phase, (0.05, 0.95))
        return Fault(kind, phase, at, round(rng.uniform(low, high), 3), rng.randrange(2), variant, point)

    # Kinds and phases of the ordinary faults: every kind and every phase as evenly as their counts allow.
    kinds = [ENDINGS[i % len(ENDINGS)] for i in range(ordinary)]
    phases = [PHASES[i % len(PHASES)] for i in range(ordinary)]
    rng.shuffle(kinds)
    rng.shuffle(phases)
    if size == "short":
        # The stop strikes mid-epoch (swap phases so that it does).
        i, j = kinds.index("stop_rank"), phases.index("mid_epoch")
        phases[i], phases[j] = phases[j], phases[i]
    pairs = list(zip(kinds, phases))
    attempts: list[AttemptPlan] = []
    # Progress points: each segment's faults spread over its share of the run (the first world gets half).
    bounds = [0] + [total // 2 + (total // 2) * k // len(segments[1:]) for k in range(len(segments))]
    for (world, n, resume), low, high in zip(segments, bounds, bounds[1:]):
        points = sorted(rng.randint(low + 1, max(low + 1, high)) for _ in range(n))
        # A stopped rank is found by the others' watchdogs: a world of 1 has none (nothing inside the job can end
        # it; only the time limit), so world-1 attempts draw other faults.
        allowed = [k for k in ENDINGS if world > 1 or k != "stop_rank"]
        for k, at in enumerate(points):
            if resume and k == 0:
                kind = rng.choice(allowed if size == "long" else [k for k in allowed if k != "stop_rank"])
                attempts.append(AttemptPlan(world, (), ending(kind, rng.choice(RESUME_PHASES), at)))
            else:
                pair = next(pair for pair in reversed(pairs) if pair[0] in allowed)
                pairs.remove(pair)
                attempts.append(AttemptPlan(world, (), ending(*pair, at)))
    attempts.append(AttemptPlan(2))
    # Damage to the newest checkpoint before some attempts (never the first: two checkpoints must exist).
    slots = rng.sample(range(1, len(attempts) - 1), shape["between"])
    first = rng.randrange(len(BETWEEN))
    for k, slot in enumerate(slots):
        a = attempts[slot]
        fault = Fault(BETWEEN[(first + k) % len(BETWEEN)], variant=str(rng.randrange(1000)))
        attempts[slot] = AttemptPlan(a.world, a.before + (fault,), a.ending)
    for i, a in enumerate(attempts[:-1]):
        if a.ending is not None and a.ending.phase in RESUME_PHASES:
            b = attempts[i + 1]
            attempts[i + 1] = AttemptPlan(b.world, b.before + (Fault(UNIVERSAL, variant=str(rng.randrange(1000))),),
                                          b.ending)
    # Non-finite gradients at a step inside the run (rank r % world, so every world has it).
    nonfinite = tuple(Fault("nonfinite", "throughout", rng.randint(2, total - 1), rank=rng.randrange(2))
                      for _ in range(shape["nonfinite"]))
    return Schedule(seed, size, epochs, nonfinite, tuple(attempts))


# ---- the run: corpus, command line, environment ---------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corpus(folder: Path) -> dict[str, str]:
    if not (folder / "train.lst").is_file():
        subprocess.run([sys.executable, "-m", "data.demo", str(folder), "--num_train", str(TRAIN_PAIRS),
                        "--num_valid", str(VALID_PAIRS), "--seconds", "1.3"], cwd=ROOT, check=True,
                       capture_output=True)
    return {"train": str(folder / "train.lst"), "valid": str(folder / "valid.lst")}


def train_args(run_dir: Path, corpus: dict[str, str], epochs: int, *extra: str) -> list[str]:
    return ["--ds_config", "ds_configs/bs4.json+ds_configs/zero2.json", "--config", "recipes/demo_cpu.yaml",
            "--run_dir", str(run_dir), f"data.train_list={corpus['train']}", f"data.valid_list={corpus['valid']}",
            "train.progress_bar=false", "data.num_workers=0", "train.log_interval_steps=1",
            f"train.max_epoch={epochs}", f"train.save_interval_steps={SAVE_EVERY}", "train.keep_last=2",
            f"train.step_timeout_s={STEP_TIMEOUT_S}", f"train.slow_phase_timeout_s={SLOW_TIMEOUT_S}",
            "--global_batch", str(GLOBAL_BATCH), "--resume", "auto", *extra]


def train_env(faults: str, fault_dir: Path | None) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # A hang the watchdog misses must still end: well above its budgets, far below the 1800 s default.
           "MF2_COLLECTIVE_TIMEOUT_S": "120"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the venv's ninja, as under make
    env.pop("RANK", None)
    env.pop("MF2_TEST_FAULT", None)
    if faults:
        env["MF2_TEST_FAULT"] = faults
    if fault_dir is not None:
        env["MF2_TEST_FAULT_DIR"] = str(fault_dir)
    return env


def nonfinite_spec(schedule: Schedule, world: int) -> list[str]:
    return [f"nonfinite_grad@{f.at_step}@{f.rank % world}" for f in schedule.nonfinite]


def is_epoch_end(step: int) -> bool:
    return step % STEPS_PER_EPOCH == 0


def is_save_step(step: int) -> bool:
    return step % SAVE_EVERY == 0 or is_epoch_end(step)


# ---- watching a job: its records, its processes, its checkpoints ------------------------------------------

class RecordTail:
    """New complete lines of metrics.jsonl since the last poll (a line still being written waits)."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset, self.partial = path, offset, b""
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        new = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                new.append(json.loads(line))
        self.records += new
        return new

    def find(self, kind: str, **match: Any) -> dict[str, Any] | None:
        return next((r for r in self.records if r.get("kind") == kind
                     and all(r.get(k) == v for k, v in match.items())), None)


def job_processes(launcher_pid: int) -> tuple[dict[int, Any], list[Any]]:
    """(rank → process, universal-checkpoint converters) among the launcher's descendants."""
    import psutil

    ranks, converters = {}, []
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:
        return ranks, converters
    for p in children:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "launcher/train.py" in cmd:
            local = [a for a in cmd if a.startswith("--local_rank=")]
            if local:
                ranks[int(local[0].split("=", 1)[1])] = p
        elif "deepspeed.checkpoint.ds_to_universal" in cmd:
            converters.append(p)
    return ranks, converters


def ended(process: Any) -> bool:
    import psutil

    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def processes_of(run_dir: Path) -> list[Any]:
    """Every live process whose command line names the run directory (ranks, converters), wherever its parent."""
    import psutil

    mine, needle = [], str(run_dir)
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if needle in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            mine.append(p)
    return mine


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.name.startswith("step") and p.name[4:].isdigit() and (p / MARKER).is_file())


def read_marker(tag_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def saves_in_progress(ckpt_dir: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(p.name for p in ckpt_dir.iterdir()
                      if p.name.startswith("step") and p.name[4:].isdigit() and not (p / MARKER).exists())
    return []


# ---- disk full: the checkpoints folder on a small tmpfs ---------------------------------------------------

@contextlib.contextmanager
def small_disk(folder: Path, size_mb: int):
    """folder as a tmpfs of size_mb (needs root or CAP_SYS_ADMIN); yields whether it is one. Unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                             capture_output=True, text=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(folder: Path, leave_bytes: int = 64 << 10) -> Path:
    filler = folder / "chaos_filler"
    free = shutil.disk_usage(folder).free
    with contextlib.suppress(OSError), open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


# ---- between attempts: checkpoint damage ------------------------------------------------------------------

def damage_newest(ckpt_dir: Path, fault: Fault, damaged: set[str]) -> str | None:
    """Apply a between-attempts fault to the checkpoint the next attempt would continue from (the newest complete
    one not damaged already); None when no older intact one exists (then --resume auto would rightly refuse: the
    fault waits for a later attempt)."""
    tags = [t for t in complete_tags(ckpt_dir) if t not in damaged and read_marker(ckpt_dir / t) is not None]
    if len(tags) < 2:
        return None
    tag = tags[-1]
    rng = random.Random(fault.variant)
    marker_path = ckpt_dir / tag / MARKER
    if fault.kind == "truncate_marker":
        text = marker_path.read_bytes()
        marker_path.write_bytes(text[: len(text) // 2])
        return f"{tag}/{MARKER} cut to {len(text) // 2} of {len(text)} bytes"
    files = [f for f in read_marker(ckpt_dir / tag)["files"] if f["path"].endswith(".pt") and f["bytes"] > 0]
    target = rng.choice(sorted(files, key=lambda f: f["path"]))
    path = ckpt_dir / tag / target["path"]
    if fault.kind == "truncate":
        keep = rng.randrange(target["bytes"])
        with open(path, "r+b") as f:
            f.truncate(keep)
        return f"{tag}/{target['path']} cut to {keep} of {target['bytes']} bytes"
    offset = rng.randrange(target["bytes"])
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    return f"{tag}/{target['path']}: byte {offset} of {target['bytes']} flipped"


def damage_universal(ckpt_dir: Path, fault: Fault, world: int, damaged: set[str]) -> tuple[str, Path, bytes] | None:
    """Flip a byte of the complete universal copy of the checkpoint the next attempt (on `world`) will continue from
    (the newest one not damaged), if it will load that copy: (what was done, the file, its damaged content); None
    when there is no such copy."""
    tags = [t for t in complete_tags(ckpt_dir) if t not in damaged and read_marker(ckpt_dir / t) is not None]
    if not tags:
        return None
    tag = tags[-1]
    copy = ckpt_dir / f"{tag}_universal" / tag
    if read_marker(ckpt_dir / tag).get("world_size") == world or not (copy / MARKER).is_file():
        return None
    rng = random.Random(fault.variant)
    files = sorted(f for f in copy.rglob("*.pt") if f.stat().st_size > 0)
    path = rng.choice(files)
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    return f"{tag}: byte {offset} of {path.relative_to(ckpt_dir)} flipped", path, bytes(data)


# ---- one attempt ------------------------------------------------------------------------------------------

@dataclass
class Timings:
    """Phase durations seen live on the uninterrupted run; a fault fires at a fraction of its phase's."""

    first_step_s: float  # the attempt record → step 1's samples record
    step_s: float  # one optimizer step with neither a save nor an epoch end before it
    save_s: float  # a step's samples record → its checkpoint's marker (an interval save)
    validation_s: float  # from where validation starts (see validation_opens) to the valid record
    validation_opens: str  # "marker": the interval save of the epoch's last step comes first; else "samples"
    epoch_end_s: float  # the valid record → the next epoch's first samples record (the epoch-end save, then a step)
    conversion_s: float = 3.0  # a universal conversion's length, updated from the storm's own
    load_s: float = 1.0  # the converter's end → the attempt record (loading the universal checkpoint)

    @classmethod
    def from_events(cls, ev: dict[tuple[str, int], float], writes: list[tuple[float, int]]) -> "Timings":
        steps = sorted(s for k, s in ev if k == "samples")
        written = {}
        for t, s in writes:
            written.setdefault(s, t)
        step = [ev["samples", s] - ev["samples", s - 1] for s in steps
                if s > 1 and not is_save_step(s - 1) and ("samples", s - 1) in ev]
        save = [written[s] - ev["samples", s] for s in steps if is_save_step(s) and not is_epoch_end(s) and s in written]
        ends = [s for s in steps if ("valid", s) in ev]
        opens = "marker" if all(s in written and written[s] < ev["valid", s] for s in ends) else "samples"
        start = {s: written[s] if opens == "marker" else ev["samples", s] for s in ends}
        valid = [ev["valid", s] - start[s] for s in ends]
        after = [ev["samples", s + 1] - ev["valid", s] for s in ends if ("samples", s + 1) in ev]
        return cls(ev["samples", 1] - ev["attempt", 0], statistics.median(step), statistics.median(save),
                   statistics.median(valid), opens, statistics.median(after))


@dataclass
class Outcome:
    index: int
    world: int
    planned: str | None
    before: list[str] = field(default_factory=list)
    resumed_step: int | None = None
    attempt_id: str | None = None
    fired: bool = False
    hit: str | None = None  # the phase the fault really landed in
    fired_after_s: float | None = None
    exit_code: int | None = None
    expected: str = ""
    as_expected: bool = True
    ended_by: str = "itself"
    end_after_fault_s: float | None = None
    seconds: float = 0.0
    leftovers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: str = ""
    damaged: list[str] = field(default_factory=list)  # the checkpoints damaged when the attempt started


class Job:
    """One `deepspeed launcher/train.py --resume auto` launch and what can be seen of it from outside: records,
    checkpoint markers being written, its processes. Event times are time.monotonic() of first sight (polls
    every 10 ms)."""

    def __init__(self, run_dir: Path, corpus: dict[str, str], epochs: int, world: int, faults: list[str],
                 fault_dir: Path | None, log_path: Path, *extra: str) -> None:
        self.run_dir, self.world, self.fault_dir, self.log_path = run_dir, world, fault_dir, log_path
        self.ckpt_dir = run_dir / "checkpoints"
        metrics = run_dir / "metrics.jsonl"
        self.records = RecordTail(metrics, metrics.stat().st_size if metrics.exists() else 0)
        self.events: dict[tuple[str, int], float] = {}
        self.writes: list[tuple[float, int]] = []  # (time, step): a checkpoint's marker appeared or was rewritten
        self.markers = self._markers()  # what exists before this job: not its writes
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()),
               "launcher/train.py", *train_args(run_dir, corpus, epochs, *extra)]
        self.log = open(log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(",".join(faults), fault_dir), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.ranks: dict[int, Any] = {}
        self.converter_seen: float | None = None
        self.converter_gone: float | None = None
        self.stopped: Any = None
        self.hog: tuple[Path, int] | None = None  # a full disk stays full: its filler is topped up at every poll

    def _markers(self) -> dict[str, int]:
        out = {}
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.ckpt_dir):
                with contextlib.suppress(OSError):
                    out[entry.name] = os.stat(os.path.join(entry.path, MARKER)).st_mtime_ns
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def poll(self, processes: bool = True) -> None:
        now = time.monotonic()
        for r in self.records.poll():
            if r.get("kind") in ("attempt", "samples", "valid"):
                self.events.setdefault((r["kind"], r.get("step", 0) if r["kind"] != "attempt" else 0), now)
        markers = self._markers()
        for tag, mtime in markers.items():
            if self.markers.get(tag) != mtime and tag.startswith("step") and tag[4:].isdigit():
                self.writes.append((now, int(tag[4:])))
        self.markers = markers
        if self.hog is not None:
            fill_disk(*self.hog)
        if processes:
            ranks, converters = job_processes(self.proc.pid)
            self.ranks.update(ranks)
            if converters and self.converter_seen is None:
                self.converter_seen = now
            elif not converters and self.converter_seen is not None and self.converter_gone is None:
                self.converter_gone = now

    def attempt_record(self) -> dict[str, Any] | None:
        return self.records.find("attempt")

    def written_after(self, step: int, since: float) -> float | None:
        return next((t for t, s in self.writes if s == step and t >= since), None)

    def paused(self) -> bool:
        return self.fault_dir is not None and all((self.fault_dir / f"paused.rank{r}").exists()
                                                  for r in range(self.world))

    def where(self) -> str:
        """The phase the job is in now, from what can be seen (records so far, folders, processes)."""
        _, converters = job_processes(self.proc.pid)
        if converters:
            return "resume: universal-checkpoint conversion"
        if self.attempt_record() is None:
            return "resume: loading the universal checkpoint" if self.converter_seen else "start-up (before the first step)"
        paused = sorted(p.name for p in self.fault_dir.glob("paused.rank*")) if self.fault_dir else []
        in_progress = saves_in_progress(self.ckpt_dir)
        samples = [r for r in self.records.records if r.get("kind") == "samples"]
        last = samples[-1]["step"] if samples else None
        if paused or in_progress:
            what = "save" + (f" of {in_progress[0]}" if in_progress else "")
            if last and is_epoch_end(last):
                done = self.records.find("valid", step=last) is not None
                what += " at the epoch end" + (" (after validation)" if done else " (before validation)")
            return what
        if last is None:
            return "first step"
        if is_epoch_end(last):
            if self.records.find("valid", step=last) is None:
                return f"validation after step {last}"
            return f"epoch end after validation (step {last}: before the next epoch's first step)"
        return f"mid-epoch (step {last + 1})"

    def signal_ranks(self, sig: int, ranks: list[int], children: bool = False) -> None:
        """Signal these ranks; with children, their descendants too (a universal-checkpoint converter), as srun
        signals every process of the job step."""
        for r in ranks:
            with contextlib.suppress(Exception):
                targets = [self.ranks[r]] + (self.ranks[r].children(recursive=True) if children else [])
                for p in targets:
                    with contextlib.suppress(Exception):
                        p.send_signal(sig)

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        self.kill_all()
        self.proc.wait()
        self.log.close()


class Storm:
    """The supervisor: runs the schedule's attempts one after the other on one run directory."""

    def __init__(self, schedule: Schedule, workdir: Path, corpus: dict[str, str], timings: Timings,
                 reference_dir: Path, log=print, disk_at: str = "checkpoints") -> None:
        self.schedule, self.dir, self.corpus, self.timings = schedule, workdir, corpus, timings
        self.reference_dir = reference_dir
        self.run_dir = workdir / "run"
        self.ckpt_dir = self.run_dir / "checkpoints"
        # The small disk: the checkpoints folder only, or the whole run directory (metrics.jsonl fills up too).
        self.disk_dir = self.run_dir if disk_at == "run" else self.ckpt_dir
        # What a full disk leaves: 64 KB where it holds checkpoints only (the records still fit: the checkpoints'
        # handling is what is tested), nothing where it holds the run directory (metrics.jsonl too).
        self.disk_left = 0 if disk_at == "run" else 64 << 10
        self.log = log
        self.outcomes: list[Outcome] = []
        self.disk = False
        self.bitwise_tags: set[str] = set()  # checkpoints compared bit for bit with the uninterrupted run's
        self._damaged: dict[str, int] = {}  # tag → its marker's mtime when damaged (a re-save makes it whole)
        self.violations: list[str] = []

    # ---- the supervisor's loop ----
    def run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = self.dir / "disk_at_the_end"
        with small_disk(self.disk_dir, TMPFS_MB) as self.disk:
            if not self.disk:
                self.log("note: no tmpfs could be mounted (not root?): disk_full faults become kill_all")
            pending: list[Fault] = []
            plans = list(self.schedule.attempts)
            index = 0
            while True:
                index += 1
                plan = plans[index - 1] if index <= len(plans) else AttemptPlan(2)
                outcome = self.attempt(index, plan, pending)
                self.outcomes.append(outcome)
                self.log(self.describe(outcome))
                if outcome.exit_code == 0 and self.finished():
                    break
                if index >= len(plans) + 3:
                    self.violations.append(f"the run did not finish after {index} attempts")
                    break
            self.compare_checkpoints()
            # The tmpfs goes with the storm: keep its checkpoints for the proof.
            shutil.copytree(self.disk_dir, kept, ignore=shutil.ignore_patterns("chaos_filler"))
        if self.disk:
            shutil.rmtree(self.disk_dir)
            kept.rename(self.disk_dir)

    def finished(self) -> bool:
        tail = RecordTail(self.run_dir / "metrics.jsonl", 0)
        tail.poll()
        ends = [r for r in tail.records if r.get("kind") == "end"]
        return bool(ends) and ends[-1]["step"] == self.schedule.total_steps

    def attempt(self, index: int, plan: AttemptPlan, pending: list[Fault]) -> Outcome:
        fault = plan.ending
        if fault is not None and fault.kind == "disk_full" and not self.disk:
            fault = Fault("kill_all", fault.phase, fault.at_step, fault.fraction, fault.rank, fault.variant, fault.point)
        outcome = Outcome(index, plan.world, fault.describe() if fault else None)
        self.compare_checkpoints()
        pending += plan.before
        damaged_copy = None
        for f in [f for f in pending if f.kind == UNIVERSAL]:
            pending.remove(f)  # only the attempt right after the resume could load that copy
            damaged_copy = damage_universal(self.ckpt_dir, f, plan.world, self.damaged)
            if damaged_copy is not None:
                outcome.before.append(f"{f.kind}: {damaged_copy[0]}")
            else:
                outcome.notes.append(f"{f.kind}: no complete universal copy this attempt would load")
        for f in list(pending):
            done = damage_newest(self.ckpt_dir, f, self.damaged)
            if done is not None:
                pending.remove(f)
                tag = done.split("/", 1)[0]
                self._damaged[tag] = (self.ckpt_dir / tag / MARKER).stat().st_mtime_ns
                outcome.before.append(f"{f.kind}: {done}")
            else:
                outcome.notes.append(f"{f.kind} deferred: no older intact checkpoint to fall back to yet")
        outcome.damaged = sorted(self.damaged)
        fault_dir = self.dir / f"faults{index:02d}"
        shutil.rmtree(fault_dir, ignore_errors=True)
        fault_dir.mkdir()
        faults = nonfinite_spec(self.schedule, plan.world)
        if fault is not None and fault.phase == "save":
            first = max(fault.at_step, self.predicted_resume() + 1)
            faults += [f"pause@save:{fault.point}@{s}" for s in range(first, self.schedule.total_steps + 1)
                       if is_save_step(s)]
        job = Job(self.run_dir, self.corpus, self.schedule.epochs, plan.world, faults, fault_dir,
                  self.dir / f"attempt{index:02d}.log")
        try:
            fired_at = self.drive(job, fault, outcome)
            self.wait_end(job, outcome, fired_at)
        finally:
            job.close()
        outcome.seconds = time.monotonic() - job.started
        outcome.log = str(job.log_path)
        job.poll(processes=False)
        attempt = job.attempt_record()
        if attempt is not None:
            outcome.resumed_step, outcome.attempt_id = attempt["step"], attempt["attempt"]
        if job.converter_seen is not None and job.converter_gone is not None:
            self.timings.conversion_s = job.converter_gone - job.converter_seen
            if ("attempt", 0) in job.events:
                self.timings.load_s = job.events["attempt", 0] - job.converter_gone
        if (self.disk_dir / "chaos_filler").exists():
            (self.disk_dir / "chaos_filler").unlink()  # the operator frees the disk before the requeue
        self.judge(job, fault, outcome)
        if damaged_copy is not None and attempt is not None:
            tag, path, content = damaged_copy[0].split(":")[0], damaged_copy[1], damaged_copy[2]
            if (attempt.get("resumed_from") or {}).get("tag") == tag and path.is_file() and path.read_bytes() == content:
                outcome.as_expected = False
                outcome.notes.append(f"resumed from {tag} through its damaged universal copy ({path.name} unchanged):"
                                     " the copy is loaded without verification")
        return outcome

    @property
    def damaged(self) -> set[str]:
        """The damaged tags that have not been saved anew since."""
        out = set()
        for tag, mtime in self._damaged.items():
            with contextlib.suppress(OSError):
                if (self.ckpt_dir / tag / MARKER).stat().st_mtime_ns == mtime:
                    out.add(tag)
        return out

    def predicted_resume(self) -> int:
        """The step --resume auto should continue from: the newest checkpoint the driver has not damaged."""
        good = [t for t in complete_tags(self.ckpt_dir) if t not in self.damaged and read_marker(self.ckpt_dir / t)]
        return int(good[-1][4:]) if good else 0

    # ---- firing ----
    def opening(self, job: Job, fault: Fault) -> tuple[float | None, float] | None:
        """(when the fault's phase opened in this job, or None if not yet; its measured length). None: the phase
        cannot come in this job (a resume-phase fault on a resume that converts nothing)."""
        t, total, ev = self.timings, self.schedule.total_steps, job.events
        attempt = job.attempt_record()
        if fault.phase in RESUME_PHASES and attempt is not None and job.converter_seen is None:
            return None
        if fault.phase == "first_step":
            return ev.get(("attempt", 0)), t.first_step_s
        if fault.phase == "conversion":
            return job.converter_seen, t.conversion_s
        if fault.phase == "resume_load":
            return job.converter_gone, t.load_s
        if fault.phase == "save":
            return (time.monotonic() if job.paused() else None), 0.0
        if attempt is None:
            return None, 0.0
        s0 = attempt["step"]
        done = sorted(s for k, s in ev if k == "samples")
        if fault.phase == "mid_epoch":
            # Inside step q+1: q taken by this job, neither an epoch's end nor a save before it.
            q = next((q for q in done if q >= max(fault.at_step - 1, s0 + 1) and q < total and not is_save_step(q)),
                     None)
            return (ev["samples", q] if q else None), t.step_s
        ends = [s for s in done if is_epoch_end(s) and s >= max(fault.at_step, s0 + 1)]
        if fault.phase == "validation":
            if not ends:
                return None, t.validation_s
            s = ends[0]
            if t.validation_opens == "marker":
                # Validation starts once the interval save of the epoch's last step is written; if the valid
                # record came first, validation is over: fire now (it lands in what follows, and says so).
                opened = job.written_after(s, ev["samples", s]) or ev.get(("valid", s))
                return opened, t.validation_s
            return ev["samples", s], t.validation_s
        if fault.phase == "epoch_end":
            valid = [s for s in ends if ("valid", s) in ev]
            return (ev["valid", valid[0]] if valid else None), t.epoch_end_s
        raise ValueError(fault.phase)

    def drive(self, job: Job, fault: Fault | None, outcome: Outcome) -> float | None:
        """Wait for the fault's phase to open, fire it at its fraction of the phase; returns when it fired."""
        if fault is None:
            return None
        while job.alive():
            job.poll()
            opened = self.opening(job, fault)
            if opened is None:
                outcome.notes.append("the resume needed no conversion (same world): the fault did not fire")
                return None
            at, length = opened
            if at is not None and time.monotonic() - at >= fault.fraction * length:
                return self.fire(job, fault, outcome)
            time.sleep(0.01)
        outcome.notes.append("the job ended before its fault fired")
        return None

    def fire(self, job: Job, fault: Fault, outcome: Outcome) -> float:
        outcome.hit = job.where()
        outcome.fired, outcome.fired_after_s = True, time.monotonic() - job.started
        ranks = sorted(job.ranks)
        rank = fault.rank % job.world
        if fault.kind == "kill_rank":
            job.signal_ranks(signal.SIGKILL, [rank])
        elif fault.kind == "kill_all":
            job.kill_all()
        elif fault.kind == "preempt":
            # "all": what srun does for a preemption notice: every process of the step (the deepspeed launcher's
            # own two are left out: slurm/launch.sh starts them with USR1 ignored). "one": a notice that reached
            # one rank only.
            if fault.variant == "all":
                job.signal_ranks(signal.SIGUSR1, ranks, children=True)
            else:
                job.signal_ranks(signal.SIGUSR1, [rank])
        elif fault.kind == "stop_rank":
            job.stopped = job.ranks.get(rank)
            job.signal_ranks(signal.SIGSTOP, [rank])
        elif fault.kind == "disk_full":
            # Another job's files fill the disk and keep it full: whatever the run frees (pruning old checkpoints,
            # replacing a tag) is taken at the next poll, until the attempt has ended.
            job.hog = (self.disk_dir, self.disk_left)
            fill_disk(*job.hog)
        if fault.phase == "save" and fault.kind != "kill_all":
            # The save goes on into the fault (the ranks a kill spared meet the dead one in the save's collectives,
            # as they would without the hook holding them).
            (job.fault_dir / "release").touch()
        return time.monotonic()

    def wait_end(self, job: Job, outcome: Outcome, fired_at: float | None) -> None:
        """Until the launcher exits. Like srun with --kill-on-bad-exit, the supervisor ends the job step GRACE_S
        after a rank ended (a stopped rank: as soon as every other rank has ended)."""
        deadline = time.monotonic() + ATTEMPT_TIMEOUT_S
        first_exit = None
        while job.alive():
            job.poll()
            others = [p for p in job.ranks.values() if job.stopped is None or p.pid != job.stopped.pid]
            if job.stopped is not None and others and all(ended(p) for p in others):
                outcome.ended_by = "supervisor (the stopped rank, once the others had ended)"
                job.kill_all()
                break
            if first_exit is None and any(ended(p) for p in others):
                first_exit = time.monotonic()
            if first_exit is not None and time.monotonic() - first_exit > GRACE_S:
                outcome.ended_by = f"supervisor ({GRACE_S:g} s after a rank ended)"
                job.kill_all()
                break
            if time.monotonic() > deadline:
                outcome.ended_by = f"supervisor: no end after {ATTEMPT_TIMEOUT_S:g} s"
                job.kill_all()
                break
            time.sleep(0.05)
        code = job.proc.wait()
        job.hog = None
        if fired_at is not None:
            outcome.end_after_fault_s = time.monotonic() - fired_at
        outcome.exit_code = code
        # What outlived the launcher: a real SLURM step would kill it with the job's cgroup; here nothing would.
        for p in processes_of(self.run_dir):
            with contextlib.suppress(Exception):
                outcome.leftovers.append(f"pid {p.pid}: {' '.join(p.cmdline())[:160]}")
                p.kill()
        if job.stopped is not None:
            with contextlib.suppress(Exception):
                job.stopped.kill()

    # ---- judging ----
    def judge(self, job: Job, fault: Fault | None, outcome: Outcome) -> None:
        text = Path(job.log_path).read_text(errors="replace")
        code, finished = outcome.exit_code, self.finished()
        if fault is None or not outcome.fired:
            outcome.expected = "exit 0 (the run's end)" if finished else "a fault"
            outcome.as_expected = code == 0 and finished
            if fault is not None and not outcome.fired and code == 0 and finished:
                outcome.expected, outcome.as_expected = "exit 0 (reached the end before the fault)", True
        elif fault.kind in ("kill_rank", "kill_all"):
            outcome.expected, outcome.as_expected = "non-zero exit", code != 0
        elif fault.kind == "preempt":
            outcome.expected = "exit 75 (or 0 at the run's end)"
            outcome.as_expected = code == 75 or (code == 0 and finished)
        elif fault.kind == "stop_rank":
            rank = fault.rank % job.world
            named = f"rank {rank} (host" in text or (rank == 0 and "rank 0 (or its node) has most likely stopped" in text)
            outcome.expected = f"exit 1 by the watchdog naming rank {rank}"
            outcome.as_expected = code != 0 and "[watchdog]" in text and named
        elif fault.kind == "disk_full":
            outcome.expected = "exit 1 naming the full disk (or 0 at the run's end: nothing more to write)"
            outcome.as_expected = (code == 0 and finished) or code == 1 and any(m in text for m in ("not enough space for checkpoint",
                                                                         "the disk or a quota is full",
                                                                         "ran out of space"))
        if code == 2:
            outcome.as_expected = False
            outcome.notes.append("refused (exit 2): a requeue would stop here")
        if "Traceback" in text and code not in (0, 75):
            outcome.notes.append("a traceback in the log")
        # A checkpoint may be passed over only because the driver damaged it (not its universal copy: a bad copy is
        # to be made again from the intact checkpoint).
        damaged = set(outcome.damaged)
        for r in job.records.records:
            if r.get("kind") == "resume_skipped" and r.get("tag") not in damaged:
                outcome.as_expected = False
                outcome.notes.append(f"the intact checkpoint {r.get('tag')} was passed over: {r.get('reason', '')[:300]}")
        for before in [b for b in outcome.before if b.split(":", 1)[0] in BETWEEN]:
            tag = before.split(": ", 1)[1].split("/", 1)[0]
            attempt = job.attempt_record()
            if attempt is not None and (attempt.get("resumed_from") or {}).get("tag") == tag:
                outcome.as_expected = False
                outcome.notes.append(f"resumed from the damaged {tag}")
            skipped = [r for r in job.records.records if r.get("kind") == "resume_skipped" and r.get("tag") == tag]
            if attempt is not None and not skipped:
                outcome.notes.append(f"no resume_skipped record for the damaged {tag}")

    def compare_checkpoints(self) -> None:
        """While every attempt so far ran on the uninterrupted run's world, every checkpoint equals its tensors."""
        if any(o.world != 2 and o.attempt_id for o in self.outcomes):
            return
        for tag in complete_tags(self.ckpt_dir):
            ref = self.reference_dir / "checkpoints" / tag
            if tag in self.bitwise_tags or tag in self.damaged or not (ref / MARKER).is_file():
                continue
            differ = chaos_proof.same_tensors(self.ckpt_dir / tag, ref)
            if differ:
                self.violations.append(f"checkpoint {tag} (all attempts so far on world 2): {len(differ)} tensors "
                                       f"differ from the uninterrupted run's: {differ[:4]}")
            self.bitwise_tags.add(tag)

    def describe(self, o: Outcome) -> str:
        parts = [f"attempt {o.index} (world {o.world}, {o.seconds:.1f} s)"]
        if o.resumed_step is not None:
            parts.append(f"resumed at step {o.resumed_step}")
        parts += o.before
        if o.planned:
            parts.append(f"fault {o.planned}" + (f" hit {o.hit!r} at {o.fired_after_s:.1f} s" if o.fired else ""))
        parts.append(f"exit {o.exit_code} ({'as expected' if o.as_expected else 'UNEXPECTED: ' + o.expected})"
                     + (f", ended {o.end_after_fault_s:.1f} s after the fault" if o.end_after_fault_s else "")
                     + ("" if o.ended_by == "itself" else f", ended by {o.ended_by}"))
        parts += [f"LEFTOVER {x}" for x in o.leftovers] + o.notes
        return "; ".join(parts)


# ---- the uninterrupted run and the whole storm ---------------------------------------------------------------

def reference_run(workdir: Path, corpus: dict[str, str], schedule: Schedule, log=print) -> tuple[Path, Timings]:
    """The same training without faults (but with the same non-finite steps), every checkpoint kept, watched live
    to time its phases. Cached in workdir per epochs and non-finite steps."""
    key = "_".join(f"{f.at_step}-{f.rank}" for f in schedule.nonfinite) or "none"
    ref_dir = workdir / f"reference_e{schedule.epochs}_{key}"
    if (ref_dir / "timings.json").is_file():
        return ref_dir, Timings(**json.loads((ref_dir / "timings.json").read_text()))
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    job = Job(ref_dir, corpus, schedule.epochs, 2, nonfinite_spec(schedule, 2), None, ref_dir / "train.log",
              "train.keep_last=1000")
    try:
        deadline = time.monotonic() + 900
        while job.alive() and time.monotonic() < deadline:
            job.poll(processes=False)
            time.sleep(0.01)
    finally:
        job.close()
    job.poll(processes=False)
    if job.proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {job.proc.returncode}); see {ref_dir / 'train.log'}")
    timings = Timings.from_events(job.events, job.writes)
    log(f"uninterrupted run: {time.monotonic() - job.started:.1f} s ({ref_dir}); phases {asdict(timings)}")
    (ref_dir / "timings.json").write_text(json.dumps(asdict(timings)))
    return ref_dir, timings


def initial_weights(seed: int = 777) -> dict[str, Any]:
    """The model as launcher/train.py builds it before training (torch.manual_seed(train.seed), then build)."""
    import torch

    from model import build_model

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model("tiny").state_dict().items()}


@dataclass
class StormResult:
    seed: int
    size: str
    schedule: list[str]
    outcomes: list[dict[str, Any]]
    proof_ok: bool
    violations: list[str]
    figures: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.proof_ok and not self.violations


def run_storm(seed: int, size: str, workdir: Path, same_world: bool = False, log=print,
              disk_at: str = "checkpoints", control: bool = False) -> StormResult:
    schedule = draw_schedule(seed, size, same_world)
    for line in schedule.lines():
        log(line)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(workdir / "corpus")
    ref_dir, timings = reference_run(workdir, corpus, schedule, log)
    storm_dir = workdir / f"storm_{size}_{seed}"
    shutil.rmtree(storm_dir, ignore_errors=True)
    storm_dir.mkdir()
    storm = Storm(schedule, storm_dir, corpus, timings, ref_dir, log, disk_at)
    start = time.monotonic()
    storm.run()
    wall = time.monotonic() - start
    proof = chaos_proof.prove(storm.run_dir, ref_dir, initial_weights=initial_weights())
    if control and proof.figures.get("world_changed"):
        ctrl = control_run(workdir, corpus, schedule, storm.run_dir, log)
        problems = same_as_control(storm.run_dir, ctrl, schedule.total_steps)
        proof.violations += problems
        proof.ok = proof.ok and not problems
        proof.figures["bit_identical_to_control"] = not problems
        control_proof = chaos_proof.prove(ctrl, ref_dir, initial_weights=initial_weights())
        proof.figures["control_final_weights_distance"] = control_proof.figures.get("final_weights_distance")
        proof.figures["control_max_valid_loss_rdiff"] = control_proof.figures["max_valid_loss_rdiff_after_resize"]
    fired = [o for o in storm.outcomes if o.fired]
    injected = len(fired) + sum(len(o.before) for o in storm.outcomes) + len(schedule.nonfinite) + sum(
        a.world != b.world for a, b in zip(storm.outcomes, storm.outcomes[1:])) + (storm.outcomes[0].world != 2)
    unexpected = [o for o in storm.outcomes if not o.as_expected]
    figures = {
        "faults_injected": injected,
        "faults_survived": injected - len(unexpected) if proof.ok else 0,
        "unexpected_outcomes": len(unexpected),
        "phases_hit": sorted(o.hit for o in fired),
        "wall_s": round(wall, 1),
        "restarts": len(storm.outcomes) - 1,
        "checkpoints_bitwise_equal_before_any_world_change": len(storm.bitwise_tags),
        "leftover_processes": sum(len(o.leftovers) for o in storm.outcomes),
        "machine": machine(),
        "load_avg_1_5_15": os.getloadavg(),
        **proof.figures,
    }
    violations = storm.violations + [f"attempt {o.index}: {o.planned}: exit {o.exit_code}, expected {o.expected} "
                                     f"({'; '.join(o.notes)}; log {o.log})" for o in unexpected]
    result = StormResult(seed, size, schedule.lines(), [asdict(o) for o in storm.outcomes], proof.ok,
                         violations + proof.violations, figures)
    (storm_dir / "storm.json").write_text(json.dumps(asdict(result), indent=1, default=str))
    return result


def report(result: StormResult, log=print) -> None:
    f = result.figures
    log(f"\nseed {result.seed} ({result.size}): {'PASSED' if result.ok else 'FAILED'} in {f['wall_s']} s; "
        f"faults injected {f['faults_injected']}, survived {f['faults_survived']}; {f['optimizer_steps']} optimizer "
        f"steps (uninterrupted: {f['reference_steps']}), samples lost {f['samples_lost']}, repeated "
        f"{f['samples_repeated']}; steps lost to restarts {f['steps_lost_to_restarts']}; "
        f"final weights {f.get('final_weights')}; worlds {f['worlds']}")
    for v in result.violations:
        log(f"  VIOLATION: {v}")


def control_run(workdir: Path, corpus: dict[str, str], schedule: Schedule, storm_run: Path, log=print
                ) -> Path | None:
    """A run without faults that has the storm's world history: where the counted steps change world, it stops at
    the same step in the same state (train.max_steps, or train.max_epoch where the storm's resume came after the
    epoch-end save) and resumes on the storm's next world. A resume on the same world is exact and a world change
    starts the same fresh RNG streams at the same step, so the storm must be bit-identical to this run, whatever its
    faults: what a world change alone does is then the control's difference to the uninterrupted run.
    None when the storm's counted steps never changed world."""
    records, _ = chaos_proof.read_records(storm_run / "metrics.jsonl")
    chain = chaos_proof.counted_chain(records)
    starts = {r["attempt"]: r for r in records if r.get("kind") == "attempt"}
    segments: list[tuple[int, list[str]]] = []  # (world, overrides that stop it where the storm changed world)
    for prev, nxt in zip(chain.steps, chain.steps[1:]):
        a, b = starts[prev["attempt"]], starts[nxt["attempt"]]
        if a["world_size"] == b["world_size"]:
            continue
        sampler, step = b["sampler"], prev["step"]
        after_epoch_end = sampler["cursor"] == 0 and sampler["epoch"] == prev["epoch"]  # 0-based next epoch
        stop = [f"train.max_epoch={sampler['epoch']}"] if after_epoch_end else [f"train.max_steps={step}"]
        segments.append((a["world_size"], stop))
    if not segments:
        return None
    segments.append((starts[chain.steps[-1]["attempt"]]["world_size"], []))
    ctrl = workdir / f"control_{storm_run.parent.name}"
    shutil.rmtree(ctrl, ignore_errors=True)
    (ctrl / "run").mkdir(parents=True)
    start = time.monotonic()
    for k, (world, stop) in enumerate(segments):
        epochs = schedule.epochs
        extra = [a for a in stop if not a.startswith("train.max_epoch=")]
        epochs = next((int(a.split("=")[1]) for a in stop if a.startswith("train.max_epoch=")), epochs)
        job = Job(ctrl / "run", corpus, epochs, world, nonfinite_spec(schedule, world), None,
                  ctrl / f"segment{k + 1}.log", *extra)
        try:
            code = job.proc.wait(timeout=900)
        finally:
            job.close()
        if code != 0:
            raise RuntimeError(f"control segment {k + 1} (world {world}, {stop}) failed: exit {code}; see {job.log_path}")
    log(f"control run (worlds {[w for w, _ in segments]}, stops {[s for _, s in segments[:-1]]}): "
        f"{time.monotonic() - start:.1f} s ({ctrl})")
    return ctrl / "run"


def same_as_control(storm_run: Path, ctrl_run: Path, total_steps: int) -> list[str]:
    """Bitwise: the counted steps, every counted loss and validation, the final checkpoint's tensors."""
    a_records, _ = chaos_proof.read_records(storm_run / "metrics.jsonl")
    b_records, _ = chaos_proof.read_records(ctrl_run / "metrics.jsonl")
    a, b = chaos_proof.counted_chain(a_records), chaos_proof.counted_chain(b_records)
    problems = [f"control: {p}" for p in chaos_proof.compare_chains(a, b)]
    for kind in ("train", "valid"):
        mine, theirs = chaos_proof.counted_records(a_records, a, kind), chaos_proof.counted_records(b_records, b, kind)
        differ = [s for s in sorted(set(mine) | set(theirs))
                  if s not in mine or s not in theirs or mine[s]["loss"] != theirs[s]["loss"]]
        if differ:
            problems.append(f"control: {kind} losses differ at steps {differ}")
    tag = f"step{total_steps:08d}"
    differ = chaos_proof.same_tensors(storm_run / "checkpoints" / tag, ctrl_run / "checkpoints" / tag)
    if differ:
        problems.append(f"control: final checkpoint {tag}: {len(differ)} tensors differ: {differ[:4]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None, help="the storm's seed (default: drawn, and printed)")
    p.add_argument("--size", choices=("short", "long"), default="short")
    p.add_argument("--same_world", action="store_true", help="no world change: final weights must be bit-identical")
    p.add_argument("--disk", choices=("checkpoints", "run"), default="checkpoints",
                   help="what the small tmpfs holds: the checkpoints folder, or the whole run directory")
    p.add_argument("--control", action="store_true",
                   help="where the world changed: also run the fault-free control with the storm's world history, "
                        "which the storm must equal bit for bit (default for --size long)")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/mf2_chaos"), help="work folder (kept)")
    p.add_argument("--schedule", action="store_true", help="print the schedule and exit")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here too")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    if args.schedule:
        print("\n".join(draw_schedule(seed, args.size, args.same_world).lines()))
        return 0
    print(f"chaos seed {seed} (replay: python bench/chaos.py --size {args.size} --seed {seed}"
          f"{' --same_world' if args.same_world else ''})", flush=True)
    result = run_storm(seed, args.size, args.dir, args.same_world, log=lambda s: print(s, flush=True),
                       disk_at=args.disk, control=args.control or args.size == "long")
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(result), indent=1, default=str))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
