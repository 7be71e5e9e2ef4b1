"""Hypothesis properties of the planner, checked against an independent statement of the rules."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.plan import (
    LINEAR_LR_WARN_FACTOR,
    SUGGESTION_KEYS,
    WARMUP_AUTO,
    AccumSpec,
    Plan,
    PlanError,
    PlanRequest,
    ResumeHold,
    apply_suggestion,
    format_lr,
    make_plan,
)
from launcher.training.schedule import LRSchedule

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

maybe = lambda s: st.none() | s  # noqa: E731


@st.composite
def accum_specs(draw: st.DrawFn) -> AccumSpec:
    """Mostly one clean way, sometimes nothing, sometimes a mix (to reach the conflicts)."""
    kind = draw(st.sampled_from(["none", "off", "effec", "effec_alone", "on_alone", "steps", "global", "mix"]))
    if kind == "none":
        return AccumSpec()
    if kind == "off":
        return AccumSpec(accu_grad=0)
    if kind == "effec":
        return AccumSpec(accu_grad=1, effec_batch_size=draw(st.integers(1, 96)))
    if kind == "effec_alone":
        return AccumSpec(effec_batch_size=draw(st.integers(1, 96)))
    if kind == "on_alone":
        return AccumSpec(accu_grad=1)
    if kind == "steps":
        return AccumSpec(gradient_accumulation_steps=draw(st.integers(1, 8)))
    if kind == "global":
        return AccumSpec(global_batch=draw(st.integers(1, 512)))
    return AccumSpec(
        accu_grad=draw(maybe(st.sampled_from([0, 1]))),
        effec_batch_size=draw(maybe(st.integers(1, 96))),
        gradient_accumulation_steps=draw(maybe(st.integers(1, 8))),
        global_batch=draw(maybe(st.integers(1, 512))),
    )


@st.composite
def resume_holds(draw: st.DrawFn) -> ResumeHold:
    base = draw(st.floats(1e-6, 1e-2))
    peak = base * draw(st.sampled_from([0.5, 1.0, 2.0, 3.0, 8.0]))
    return ResumeHold(source="checkpoint c/step00000007", global_batch=draw(st.integers(1, 256)), peak_lr=peak,
                      base_lr=base, reference_batch=draw(st.integers(1, 64)),
                      lr_rule=draw(st.sampled_from(["linear", "sqrt", "none"])), lr_derivation="as trained",
                      warmup_samples=draw(st.integers(0, 5000)),
                      warmup_from_lr=draw(st.sampled_from([0.0, min(base, peak)])))


@st.composite
def requests(draw: st.DrawFn) -> PlanRequest:
    return PlanRequest(
        batch_size=draw(st.integers(1, 16)),
        num_nodes=draw(st.integers(1, 4)),
        gpus_per_node=draw(st.integers(1, 8)),
        recipe_accum=draw(accum_specs()),
        cli_accum=draw(st.just(AccumSpec()) | accum_specs()),
        recipe_batch_size=draw(maybe(st.integers(1, 16))),
        recipe_num_nodes=draw(st.integers(1, 2)),
        recipe_gpus_per_node=draw(st.integers(1, 8)),
        hold=draw(st.sampled_from(["global_batch", "accumulation"])),
        base_lr=draw(st.floats(1e-6, 1e-1)),
        reference_batch=draw(st.integers(1, 256)),
        lr_rule=draw(st.sampled_from(["linear", "sqrt", "none"])),
        warmup_samples=draw(st.sampled_from([WARMUP_AUTO, 0]) | st.integers(0, 10_000)),
        warmup_from_command_line=draw(st.booleans()),
        adam_beta2=draw(st.sampled_from([0.0, 0.9, 0.98, 0.999])),
        segment_seconds=draw(st.floats(0.5, 10.0)),
        dataset_size=draw(maybe(st.integers(1, 20_000))),
        resume=draw(st.none() | st.none() | resume_holds()),
    )


def oracle(req: PlanRequest) -> tuple[int, int] | None:
    """(accumulation steps, global batch), or None where the rules say no. Written from the spec alone:
    the command line's way as typed, at the actual micro-batch and world; else the checkpoint's global batch;
    else the recipe's way read at its own batch_size and world, then its accumulation or its global batch kept."""
    b = req.batch_size
    b_r = req.recipe_batch_size or b
    w = req.num_nodes * req.gpus_per_node
    w_r = req.recipe_num_nodes * req.recipe_gpus_per_node
    recipe = req.recipe_accum

    def level(spec: AccumSpec, micro: int, world: int, cli: bool):
        totals = []
        e = spec.effec_batch_size
        if spec.accu_grad == 0:
            if e is not None and e != micro:
                return "error"
            totals.append(micro * world)
        elif spec.accu_grad == 1 or e is not None:
            if e is None:
                alone = spec.gradient_accumulation_steps is None and spec.global_batch is None
                if not cli or not alone or recipe.effec_batch_size is None or recipe.effec_batch_size % b_r:
                    return "error"
                totals.append(micro * (recipe.effec_batch_size // b_r) * world)
            elif e % micro:
                return "error"
            else:
                totals.append(e * world)
        if spec.gradient_accumulation_steps is not None:
            totals.append(micro * spec.gradient_accumulation_steps * world)
        if spec.global_batch is not None:
            totals.append(spec.global_batch)
        if len(set(totals)) > 1:
            return "error"
        return totals[0] if totals else None

    cli = level(req.cli_accum, b, w, True)
    if cli == "error":
        return None
    if cli is not None:
        g = cli
        if req.resume is not None and g != req.resume.global_batch:
            return None
    elif req.resume is not None:
        g = req.resume.global_batch
    else:
        r = level(recipe, b_r, w_r, False)
        if r == "error":
            return None
        if r is None:
            r = b_r * w_r  # nothing given anywhere: the recipe's accu_grad 0
        if req.hold == "global_batch":
            g = r
        else:
            if r % (b_r * w_r):
                return None
            g = b * (r // (b_r * w_r)) * w
    if g % (b * w):
        return None
    if req.dataset_size is not None and req.dataset_size < g:
        return None
    return g // (b * w), g


def expected_lr(req: PlanRequest, g: int) -> float:
    if req.resume is not None:
        return req.resume.peak_lr
    ratio = g / req.reference_batch
    return req.base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[req.lr_rule]


def expected_warmup(req: PlanRequest, k: float) -> tuple[int, float]:
    if req.resume is not None:
        return req.resume.warmup_samples, req.resume.warmup_from_lr
    start = req.base_lr if k > 1 else 0.0
    automatic = req.warmup_samples == WARMUP_AUTO or (req.warmup_samples == 0 and not req.warmup_from_command_line)
    if not automatic:
        return req.warmup_samples, start
    if k <= 1:
        return (0 if req.warmup_samples == WARMUP_AUTO else req.warmup_samples), start
    length = round(2 / (1 - req.adam_beta2)) * req.reference_batch
    if req.dataset_size is not None:
        length = min(length, 5 * req.dataset_size)
    return length, start


@SETTINGS
@given(requests())
def test_plan_matches_the_rules_and_suggestions_are_feasible(req: PlanRequest) -> None:
    expected = oracle(req)
    try:
        plan = make_plan(req)
    except PlanError as e:
        assert expected is None, f"refused a feasible request ({expected}): {e}"
        assert str(e)
        assert set(e.suggestions) <= set(SUGGESTION_KEYS)
        for key, values in e.suggestions.items():
            assert values, key
            for v in values:
                fixed = apply_suggestion(req, key, v)
                assert oracle(fixed) is not None, (key, v, str(e))
                make_plan(fixed)
        return
    assert expected is not None, f"planned an infeasible request: {plan}"
    b, k, w, g = plan.micro_batch, plan.accumulation_steps, plan.world_size, plan.global_batch
    assert (k, g) == expected
    assert b * k * w == g and k >= 1
    assert w == req.num_nodes * req.gpus_per_node and b == req.batch_size
    assert plan.samples_per_gpu_per_update == b * k
    assert math.isclose(plan.peak_lr, expected_lr(req, g), rel_tol=1e-12)
    factor = plan.peak_lr / plan.base_lr
    samples, start = expected_warmup(req, factor)
    assert (plan.warmup_samples, plan.warmup_from_lr) == (samples, start)
    assert plan.warmup_steps == math.ceil(samples / g)
    warned = req.resume is None and req.lr_rule == "linear" and factor > LINEAR_LR_WARN_FACTOR
    assert bool(plan.warnings) == warned
    if warned:
        assert plan.warnings[0].endswith(f"= {format_lr(req.base_lr * math.sqrt(g / req.reference_batch))}")
    if req.dataset_size is None:
        assert plan.steps_per_epoch is None
    else:
        assert plan.steps_per_epoch == req.dataset_size // g >= 1
    assert math.isclose(plan.audio_seconds_per_update, g * req.segment_seconds)
    assert [name for name, _ in plan.sources] == ["micro_batch", "accumulation_steps", "world_size", "global_batch",
                                                  "peak_lr", "warmup_samples"]
    assert all(text for _, text in plan.sources)


@SETTINGS
@given(requests(), st.integers(1, 16), st.integers(1, 4), st.integers(1, 8))
def test_inherited_accumulation_is_kept_on_any_micro_batch_and_world(req: PlanRequest, micro: int, nodes: int,
                                                                      gpus: int) -> None:
    """hold accumulation (the default): the recipe's number of micro-batches per update survives a new micro-batch
    (a preset, --batch_size) and a new world; the global batch and the LR follow."""
    req = replace(req, cli_accum=AccumSpec(), resume=None, hold="accumulation", dataset_size=None,
                  recipe_batch_size=req.recipe_batch_size or req.batch_size)
    try:
        at_recipe = make_plan(replace(req, batch_size=req.recipe_batch_size, num_nodes=req.recipe_num_nodes,
                                      gpus_per_node=req.recipe_gpus_per_node))
    except PlanError:
        # A recipe that contradicts itself is refused whatever the micro-batch and world.
        try:
            make_plan(replace(req, batch_size=micro, num_nodes=nodes, gpus_per_node=gpus))
        except PlanError:
            return
        raise AssertionError("a recipe refused at its own batch_size and world planned elsewhere")
    moved = make_plan(replace(req, batch_size=micro, num_nodes=nodes, gpus_per_node=gpus))
    assert moved.accumulation_steps == at_recipe.accumulation_steps
    assert moved.global_batch == micro * at_recipe.accumulation_steps * nodes * gpus
    ratio = moved.global_batch / req.reference_batch
    rule = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[req.lr_rule]
    assert math.isclose(moved.peak_lr, req.base_lr * rule, rel_tol=1e-12)


@SETTINGS
@given(requests(), st.integers(1, 4), st.integers(1, 8))
def test_hold_global_batch_keeps_batch_and_lr_and_names_exactly_the_worlds(
        req: PlanRequest, nodes: int, gpus: int) -> None:
    req = replace(req, cli_accum=AccumSpec(), hold="global_batch", num_nodes=nodes, gpus_per_node=gpus, resume=None,
                  recipe_batch_size=req.batch_size)
    at_recipe_world = replace(req, num_nodes=req.recipe_num_nodes, gpus_per_node=req.recipe_gpus_per_node)
    try:
        reference = make_plan(at_recipe_world)
    except PlanError:
        return
    g, b = reference.global_batch, req.batch_size
    can = [w for w in range(1, g // b + 1) if oracle(replace(req, num_nodes=1, gpus_per_node=w))]
    for w in range(1, g // b + 3):
        try:
            plan = make_plan(replace(req, num_nodes=1, gpus_per_node=w))
        except PlanError:
            assert w not in can
            continue
        assert w in can
        assert plan.global_batch == g and plan.peak_lr == reference.peak_lr
    try:
        plan = make_plan(req)
    except PlanError as e:
        assert list(e.suggestions["world_size"]) == can
        assert list(e.suggestions.get("num_nodes", ())) == [w // gpus for w in can if w % gpus == 0]
    else:
        assert plan.global_batch == g and plan.peak_lr == reference.peak_lr
        assert req.num_nodes * req.gpus_per_node in can


@SETTINGS
@given(requests(), resume_holds(), st.integers(1, 4), st.integers(1, 8))
def test_resume_holds_the_checkpoint_on_every_world_that_can_hold_it(req: PlanRequest, held: ResumeHold,
                                                                       nodes: int, gpus: int) -> None:
    """A resume or requeue keeps the checkpoint's global batch, LR and warmup whatever the world, the micro-batch,
    the hold and the recipe; it refuses exactly the worlds that cannot hold that global batch."""
    req = replace(req, cli_accum=AccumSpec(), resume=held, num_nodes=nodes, gpus_per_node=gpus, dataset_size=None)
    g, b, w = held.global_batch, req.batch_size, nodes * gpus
    try:
        plan = make_plan(req)
    except PlanError as e:
        assert g % (b * w) != 0, str(e)
        assert list(e.suggestions.get("world_size", ())) == [x for x in range(1, g // b + 1) if g % (b * x) == 0]
        assert "global_batch" not in e.suggestions
        return
    assert g % (b * w) == 0
    assert (plan.global_batch, plan.peak_lr, plan.warmup_samples, plan.warmup_from_lr) == (
        g, held.peak_lr, held.warmup_samples, held.warmup_from_lr)
    assert plan.accumulation_steps == g // (b * w)


@SETTINGS
@given(requests())
def test_round_trip(req: PlanRequest) -> None:
    try:
        plan = make_plan(req)
    except PlanError:
        return
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@SETTINGS
@given(requests())
def test_the_schedule_ramps_from_the_plans_start_to_its_peak(req: PlanRequest) -> None:
    try:
        plan = make_plan(req)
    except PlanError:
        return
    s = LRSchedule(peak_lr=plan.peak_lr, warmup_steps=plan.warmup_steps, warmup_from_lr=plan.warmup_from_lr)
    lrs = [s.lr(i) for i in range(plan.warmup_steps + 2)]
    assert all(lr > 0 for lr in lrs)
    assert all(a <= b * (1 + 1e-12) for a, b in zip(lrs, lrs[1:]))
    assert math.isclose(lrs[-1], plan.peak_lr) and math.isclose(lrs[-2], plan.peak_lr)
    if plan.warmup_steps and plan.peak_lr > plan.base_lr and plan.resumed_from is None:
        # Goyal et al.'s gradual warmup: from the base LR, never below it. (A resumed plan keeps its checkpoint's.)
        assert plan.base_lr <= lrs[0] <= plan.base_lr + (plan.peak_lr - plan.base_lr) / plan.warmup_steps * 1.000001


_junk = st.one_of(st.booleans(), st.integers(-3, 0), st.floats(allow_nan=True), st.text(max_size=3), st.none())


@SETTINGS
@given(requests(), st.sampled_from(["batch_size", "num_nodes", "gpus_per_node", "recipe_num_nodes",
                                     "recipe_gpus_per_node", "reference_batch", "base_lr", "segment_seconds",
                                     "warmup_samples", "hold", "lr_rule", "recipe_batch_size", "adam_beta2"]), _junk)
def test_junk_is_refused_with_plan_error(req: PlanRequest, name: str, junk) -> None:
    bad = replace(req, **{name: junk})
    try:
        make_plan(bad)
    except PlanError:
        return
    # The only junk that may pass is a value that is in fact valid for that field.
    if name == "recipe_batch_size" and junk is None:
        return
    assert name in ("base_lr", "segment_seconds", "warmup_samples", "adam_beta2") and not isinstance(junk, bool)
    assert isinstance(junk, (int, float)) and math.isfinite(junk)
    assert junk > 0 or (name == "warmup_samples" and junk == 0) or (name == "adam_beta2" and 0 <= junk < 1)
