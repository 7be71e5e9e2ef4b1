"""The proof that a storm of faults lost nothing, read from the run's own records (issue 21).

Records used, all from rank 0's `metrics.jsonl` (the trainer's `attempt` and `samples` records are specified in
bench/chaos.py's docstring):

- `attempt`: one per process start, written just before its first step: where it resumed (`step`, `resumed_from`
  = the tag and the attempt id its marker names), its world and batch, the sampler's state.
- `samples`: one per optimizer step: its epoch, the positions [start, end) of the epoch's permutation it
  consumed, a digest of those sample indices, and whether the step was applied (a non-finite one is not).
- `train`, `valid`, `end`: the losses and the final parameter fingerprints.

The counted chain. Attempts are read in file order. An attempt that resumed at step S0 supersedes every step
after S0 counted so far (a restart rolled them back; they are "steps lost to restarts"), then adds its own steps
S0+1, S0+2, ... A resume must continue the chain: the checkpoint it loaded was written by the attempt that
counted step S0, or by one that had itself resumed there (the marker's attempt id), else the run resumed from
state the chain does not describe.

What is proved: the chain holds steps 1..T with T the uninterrupted run's; in every epoch the counted steps'
ranges tile [0, U) of that epoch's permutation in order (U = its used part), and the permutation is one (so
every used sample exactly once, none lost, none twice); each digest matches the permutation recomputed from the
sampler state (the run used the order we check); the steps, ranges, digests and skipped steps equal the
uninterrupted run's. Agreement of the numbers: while every step so far (and the attempt that wrote the record)
ran on the uninterrupted run's world, each training and validation loss is bitwise the uninterrupted run's; the
final checkpoint's tensors too when the world never changed; after a world change, the validation losses and the
final weights within `Tolerances` (bench/chaos.py's control run then proves bit-identity to a fault-free run with
the same world history). A metrics.jsonl line that is not JSON (a write cut short) is a violation too.

data.sampler (the permutation), numpy and torch (the checkpoint tensors) are used, no launcher code: the records
are the interface.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerances:
    """How far a run whose world changed may drift from the uninterrupted one (same world: bitwise, no tolerance).

    A world change alters two things and nothing else: the order in which a step's gradients are summed (one rank
    accumulating 6 micro-batches, 2 ranks accumulating 3 then all-reducing, 3 ranks x 2) and the dither streams (a
    rank of another world has no RNG state to restore, so it starts afresh). Both perturb the weights at float32
    rounding level at first; Adam's normalised update and the network's nonlinearity then amplify that, the more
    steps after the change the more, so the bound is empirical. bench/chaos.py's control run isolates it: a
    fault-free run with the storm's world history, which the storm equals bit for bit, differs from the uninterrupted
    run by exactly what the world changes did. Measured on the demo storms of the issue 21 report: final-weight
    distances 0.036-0.083 and validation losses within 1.8 % (28 steps after a change at step 20 of 48). The bounds
    are about 3x that: they catch what changes a run by an epoch or more (the demo's last epochs move the weights by
    0.12 of their total displacement each, the validation loss by 2-5 %), such as a lost epoch or optimizer state
    lost in a conversion, not a single step, whose exactness the records and the control's bit-identity prove.
    """

    # ||w - w_ref|| / ||w_ref - w_init|| for the final weights (w_init: the model as built from the seed).
    weights: float = 0.25
    # |loss - loss_ref| / loss_ref for each validation (every epoch end) after a world change.
    valid_loss: float = 0.05


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, number of lines that are not JSON): a kill may tear at most the last line of a write."""
    records, torn = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return records, torn


def digest(indices: np.ndarray) -> str:
    """The samples record's digest: SHA-256 of the indices as little-endian int64, in position order, 16 hex."""
    return hashlib.sha256(np.asarray(indices).astype("<i8").tobytes()).hexdigest()[:16]


def permutation(sampler_state: dict[str, Any], epoch0: int) -> np.ndarray:
    """P_epoch as data.sampler.CursorSampler defines it (epoch0: 0-based)."""
    from data.sampler import CursorSampler

    s = sampler_state
    return CursorSampler(s["num_samples"], 1, 0, 1, seed=s["seed"], shuffle=s.get("shuffle", True)).permutation(epoch0)


@dataclass
class AttemptTrace:
    """One process start as the records show it."""

    attempt: str
    world_size: int
    resumed_step: int
    resumed_from: dict[str, Any] | None
    steps: list[int] = field(default_factory=list)  # steps it ran (samples records), in order
    superseded: int = 0  # of those, how many a later restart rolled back


@dataclass
class Chain:
    """The counted optimizer steps, in order, and what the restarts cost."""

    steps: list[dict[str, Any]]  # samples records, steps 1..T
    attempts: list[AttemptTrace]
    violations: list[str]
    holders: list[set[str]]  # per counted step: the attempts whose state after it is the chain's

    @property
    def redone_steps(self) -> int:
        return sum(a.superseded for a in self.attempts)

    def attempt_of(self, step: int) -> str:
        return self.steps[step - 1]["attempt"]


def counted_chain(records: list[dict[str, Any]]) -> Chain:
    """Rebuild the counted chain from `attempt` and `samples` records (see the module docstring)."""
    violations: list[str] = []
    chain: list[dict[str, Any]] = []
    # For each counted step, the attempts whose state after it is the chain's: the one that ran it, and any that
    # resumed there (which may save that step again: the epoch-end save after a resume at an epoch's last step).
    holders: list[set[str]] = []
    traces: dict[str, AttemptTrace] = {}
    order: list[AttemptTrace] = []
    current: AttemptTrace | None = None
    for r in records:
        kind = r.get("kind")
        if kind == "attempt":
            current = AttemptTrace(r["attempt"], r["world_size"], r["step"], r.get("resumed_from"))
            if current.attempt in traces:
                violations.append(f"attempt id {current.attempt} appears twice")
            traces[current.attempt] = current
            order.append(current)
            s0 = current.resumed_step
            if s0 > len(chain):
                violations.append(f"attempt {current.attempt} resumed at step {s0}, but the chain holds only "
                                  f"{len(chain)} steps: it continued from steps no record describes")
            elif s0 > 0:
                source = (current.resumed_from or {}).get("attempt")
                if source not in holders[s0 - 1]:
                    violations.append(f"attempt {current.attempt} resumed step {s0} from a checkpoint written by "
                                      f"attempt {source}, but the chain's state at step {s0} is that of attempts "
                                      f"{sorted(holders[s0 - 1])}")
                holders[s0 - 1].add(current.attempt)
            elif current.resumed_from is not None:
                violations.append(f"attempt {current.attempt} resumed from {current.resumed_from} at step 0")
            for dropped in chain[s0:]:
                traces[dropped["attempt"]].superseded += 1
            del chain[s0:], holders[s0:]
        elif kind == "samples":
            if current is None or r["attempt"] != current.attempt:
                violations.append(f"samples record of step {r['step']} from attempt {r['attempt']} outside its "
                                  "attempt's records")
                continue
            if r["step"] != len(chain) + 1:
                violations.append(f"attempt {current.attempt}: step {r['step']} follows step {len(chain)}")
            current.steps.append(r["step"])
            chain.append(r)
            holders.append({current.attempt})
    return Chain(chain, order, violations, holders)


@dataclass
class Coverage:
    epochs: int
    samples_per_epoch: int
    lost: int  # used positions of a completed epoch that no counted step consumed
    repeated: int  # sample uses beyond the first within an epoch
    violations: list[str]


def epoch_coverage(chain: Chain, sampler_state: dict[str, Any]) -> Coverage:
    """Every sample of every completed epoch exactly once in the counted steps; each digest checked."""
    violations: list[str] = []
    quantum = sampler_state["epoch_quantum"]
    n = sampler_state["num_samples"]
    used = (n // quantum) * quantum
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for r in chain.steps:
        by_epoch.setdefault(r["epoch"], []).append(r)
    lost = repeated = 0
    expected_epoch = 1
    for epoch in sorted(by_epoch):
        if epoch != expected_epoch:
            violations.append(f"epoch {epoch} follows epoch {expected_epoch - 1}")
        expected_epoch = epoch + 1
        perm = permutation(sampler_state, epoch - 1)
        if not np.array_equal(np.sort(perm), np.arange(n)):
            violations.append(f"epoch {epoch}: the order is not a permutation of the {n} samples")
        uses = np.zeros(n, dtype=np.int64)
        cursor = 0
        for r in by_epoch[epoch]:
            start, end = r["cursor"]
            if start != cursor:
                violations.append(f"step {r['step']} (epoch {epoch}) starts at position {start}, the previous "
                                  f"step ended at {cursor}")
            if digest(perm[start:end]) != r["digest"]:
                violations.append(f"step {r['step']} (epoch {epoch}): digest {r['digest']} is not that of positions "
                                  f"[{start}, {end}) of the permutation recomputed from the sampler state")
            np.add.at(uses, perm[start:end], 1)
            cursor = end
        complete = cursor == used
        if not complete and epoch != max(by_epoch):
            violations.append(f"epoch {epoch} ended at position {cursor} of {used}")
        if complete or epoch != max(by_epoch):
            lost += int(np.count_nonzero(uses[perm[:used]] == 0))
        repeated += int(np.sum(np.maximum(uses - 1, 0)))
        outside = int(np.count_nonzero(uses[perm[used:]]))
        if outside:
            violations.append(f"epoch {epoch}: {outside} samples beyond the epoch's used part were trained on")
    lost_or_repeated = [f"{lost} samples lost"] * bool(lost) + [f"{repeated} sample uses repeated"] * bool(repeated)
    violations += lost_or_repeated
    return Coverage(len(by_epoch), used, lost, repeated, violations)


def compare_chains(chain: Chain, reference: Chain) -> list[str]:
    """The same steps as the uninterrupted run: count, epochs, ranges, digests, and which were skipped."""
    problems = []
    if len(chain.steps) != len(reference.steps):
        problems.append(f"{len(chain.steps)} counted optimizer steps, the uninterrupted run has "
                        f"{len(reference.steps)}")
    for a, b in zip(chain.steps, reference.steps):
        fields = ("epoch", "cursor", "digest", "applied")
        if any(a[f] != b[f] for f in fields):
            problems.append(f"step {a['step']}: {[a[f] for f in fields]} vs the uninterrupted run's "
                            f"{[b[f] for f in fields]}")
    return problems


def counted_records(records: list[dict[str, Any]], chain: Chain, kind: str) -> dict[int, dict[str, Any]]:
    """The `kind` records (train, valid) of the counted steps: for step N, the last one written by an attempt whose
    state at N is the chain's (a validation at an epoch's end may be redone by an attempt that resumed there)."""
    out: dict[int, dict[str, Any]] = {}
    current = None
    for r in records:
        if r.get("kind") == "attempt":
            current = r["attempt"]
        elif r.get("kind") == kind and current is not None:
            step = r["step"]
            if 1 <= step <= len(chain.steps) and current in chain.holders[step - 1]:
                out[step] = {**r, "attempt": current}
    return out


def first_other_world_step(chain: Chain, world: int) -> int | None:
    """The first counted step whose attempt ran on another world than `world` (None: all on `world`)."""
    worlds = {a.attempt: a.world_size for a in chain.attempts}
    return next((r["step"] for r in chain.steps if worlds[r["attempt"]] != world), None)


def compare_numbers(records: list[dict[str, Any]], chain: Chain, ref_records: list[dict[str, Any]],
                    ref_chain: Chain, world: int, tol: Tolerances) -> tuple[list[str], dict[str, Any]]:
    """Losses of the counted steps and validations against the uninterrupted run's: bitwise before the first
    step taken on another world, within tolerance after (validation) or only reported (training losses)."""
    problems: list[str] = []
    resized_at = first_other_world_step(chain, world)
    exact_until = (resized_at - 1) if resized_at else len(chain.steps)
    worlds = {a.attempt: a.world_size for a in chain.attempts}
    figures: dict[str, Any] = {"bitwise_steps": exact_until, "max_train_loss_rdiff_after_resize": 0.0,
                               "max_valid_loss_rdiff_after_resize": 0.0}
    for kind in ("train", "valid"):
        mine, ref = counted_records(records, chain, kind), counted_records(ref_records, ref_chain, kind)
        if set(mine) != set(ref):
            problems.append(f"{kind} records for steps {sorted(set(mine) ^ set(ref))} in one run only")
        for step in sorted(set(mine) & set(ref)):
            a, b = mine[step]["loss"], ref[step]["loss"]
            # Bitwise while every step so far, and the attempt that wrote the record (a validation redone after a
            # resume on another world), ran on the uninterrupted run's world.
            if step <= exact_until and worlds[mine[step]["attempt"]] == world:
                if a != b and not (math.isnan(a) and math.isnan(b)):
                    problems.append(f"step {step}: {kind} loss {a!r} differs from the uninterrupted run's {b!r} "
                                    "though every step up to it ran on the same world")
                continue
            rdiff = abs(a - b) / abs(b)
            key = f"max_{kind}_loss_rdiff_after_resize"
            figures[key] = max(figures[key], rdiff)
            if kind == "valid" and rdiff > tol.valid_loss:
                problems.append(f"step {step}: validation loss {a:.6f} vs {b:.6f} uninterrupted, relative "
                                f"difference {rdiff:.2e} > {tol.valid_loss:g}")
    return problems, figures


def checkpoint_tensors(tag_dir: Path) -> dict[str, Any]:
    """Every tensor of a DeepSpeed tag (weights, optimizer state), by file and key path; RNG files left out."""
    import torch

    out: dict[str, Any] = {}

    def walk(obj: Any, key: str) -> None:
        if torch.is_tensor(obj):
            out[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    for f in sorted(tag_dir.glob("*.pt")):
        if not f.name.startswith("rng_"):
            walk(torch.load(f, map_location="cpu", weights_only=False), f.name)
    return out


def same_bits(a: Any, b: Any) -> bool:
    """Equal dtype, shape and bits: unlike torch.equal, a NaN equals the same NaN (a tensor is unchanged)."""
    import torch

    def as_bytes(t: Any) -> Any:
        return t.detach().contiguous().reshape(-1).view(torch.uint8)

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def same_tensors(a_dir: Path, b_dir: Path) -> list[str]:
    """Keys whose tensors differ in any bit (or exist in one tag only)."""
    a, b = checkpoint_tensors(a_dir), checkpoint_tensors(b_dir)
    differ = sorted(set(a) ^ set(b))
    differ += [k for k in sorted(set(a) & set(b)) if not same_bits(a[k], b[k])]
    if not a:
        differ.append(f"no tensors in {a_dir}")
    return differ


def module_weights(tag_dir: Path) -> dict[str, Any]:
    """The module's weights of a tag (DeepSpeed's mp_rank_00_model_states.pt), as float64."""
    import torch

    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def weights_distance(tag: Path, ref_tag: Path, initial: dict[str, Any]) -> float:
    """||w - w_ref|| / ||w_ref - w_init||: the final weights' distance relative to how far training moved them."""
    w, ref = module_weights(tag), module_weights(ref_tag)
    num = math.sqrt(sum(float((w[k] - ref[k]).pow(2).sum()) for k in ref))
    den = math.sqrt(sum(float((ref[k] - initial[k].double()).pow(2).sum()) for k in ref))
    return num / den


@dataclass
class Proof:
    ok: bool
    violations: list[str]
    figures: dict[str, Any]


def prove(run_dir: Path, ref_dir: Path, tol: Tolerances = Tolerances(), initial_weights=None) -> Proof:
    """Everything the storm must show, from two run directories (the storm's and the uninterrupted run's)."""
    records, torn = read_records(run_dir / "metrics.jsonl")
    ref_records, _ = read_records(ref_dir / "metrics.jsonl")
    chain, ref_chain = counted_chain(records), counted_chain(ref_records)
    violations = chain.violations + [f"uninterrupted run: {v}" for v in ref_chain.violations]
    if torn:
        violations.append(f"metrics.jsonl holds {torn} lines that are not JSON (a write cut short): every reader of "
                          "the file (launcher.report, the tests) fails on them")
    first_attempt = next(r for r in ref_records if r.get("kind") == "attempt")
    world, sampler = first_attempt["world_size"], first_attempt["sampler"]
    coverage = epoch_coverage(chain, sampler)
    violations += coverage.violations + compare_chains(chain, ref_chain)
    numbers, figures = compare_numbers(records, chain, ref_records, ref_chain, world, tol)
    violations += numbers
    ends = [r for r in records if r.get("kind") == "end"]
    ref_end = [r for r in ref_records if r.get("kind") == "end"][-1]
    if not ends or ends[-1]["step"] != ref_end["step"] or ends[-1]["exit_code"] != 0:
        violations.append(f"the run did not end like the uninterrupted one: {ends[-1:] or 'no end record'}")
    else:
        prints = ends[-1]["param_fingerprints"]
        if any(p != prints[0] for p in prints):
            violations.append(f"the ranks ended with different parameters: {prints}")
    resized = first_other_world_step(chain, world) is not None
    tag = f"step{len(ref_chain.steps):08d}"
    final, ref_final = run_dir / "checkpoints" / tag, ref_dir / "checkpoints" / tag
    if not resized:
        differ = same_tensors(final, ref_final)
        if differ:
            violations.append(f"final checkpoint {tag}: {len(differ)} tensors differ from the uninterrupted run's "
                              f"(world unchanged, so they must be bit-identical): {differ[:5]}")
        if ends and ends[-1]["param_fingerprints"] != ref_end["param_fingerprints"]:
            violations.append("the end record's parameter fingerprints differ from the uninterrupted run's")
        figures["final_weights"] = "bit-identical" if not differ else f"{len(differ)} tensors differ"
    elif initial_weights is not None:
        distance = weights_distance(final, ref_final, initial_weights)
        figures["final_weights"] = f"relative distance {distance:.3e} (tolerance {tol.weights:g})"
        figures["final_weights_distance"] = distance
        if not distance <= tol.weights:
            violations.append(f"final weights: relative distance {distance:.3e} to the uninterrupted run's > "
                              f"{tol.weights:g}")
    figures.update(
        optimizer_steps=len(chain.steps), reference_steps=len(ref_chain.steps), epochs=coverage.epochs,
        samples_per_epoch=coverage.samples_per_epoch, samples_lost=coverage.lost, samples_repeated=coverage.repeated,
        steps_lost_to_restarts=chain.redone_steps, attempts=len(chain.attempts), torn_lines=torn,
        skipped_steps=[r["step"] for r in chain.steps if not r["applied"]], world_changed=resized,
        worlds=[a.world_size for a in chain.attempts],
    )
    return Proof(not violations, violations, figures)
