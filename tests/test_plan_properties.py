"""Hypothesis properties of the planner, checked against an independent statement of the rules."""

from __future__ import annotations

import json
import math
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.plan import (
    SUGGESTION_KEYS,
    AccumSpec,
    Plan,
    PlanError,
    PlanRequest,
    apply_suggestion,
    make_plan,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

small = st.integers(min_value=1, max_value=24)
maybe = lambda s: st.none() | s  # noqa: E731


@st.composite
def accum_specs(draw: st.DrawFn) -> AccumSpec:
    """Mostly one clean way, sometimes nothing, sometimes a mix (to reach the conflicts)."""
    kind = draw(st.sampled_from(["none", "off", "effec", "effec_alone", "steps", "global", "mix"]))
    if kind == "none":
        return AccumSpec()
    if kind == "off":
        return AccumSpec(accu_grad=0)
    if kind == "effec":
        return AccumSpec(accu_grad=1, effec_batch_size=draw(st.integers(1, 96)))
    if kind == "effec_alone":
        return AccumSpec(effec_batch_size=draw(st.integers(1, 96)))
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
def requests(draw: st.DrawFn) -> PlanRequest:
    return PlanRequest(
        batch_size=draw(st.integers(1, 16)),
        num_nodes=draw(st.integers(1, 4)),
        gpus_per_node=draw(st.integers(1, 8)),
        recipe_accum=draw(accum_specs()),
        cli_accum=draw(st.just(AccumSpec()) | accum_specs()),
        recipe_num_nodes=draw(st.integers(1, 2)),
        recipe_gpus_per_node=draw(st.integers(1, 8)),
        hold=draw(st.sampled_from(["global_batch", "accumulation"])),
        base_lr=draw(st.floats(1e-6, 1e-1)),
        reference_batch=draw(st.integers(1, 256)),
        lr_rule=draw(st.sampled_from(["linear", "sqrt", "none"])),
        warmup_samples=draw(st.integers(0, 10_000)),
        segment_seconds=draw(st.floats(0.5, 10.0)),
        dataset_size=draw(maybe(st.integers(1, 2_000))),
    )


def oracle(req: PlanRequest) -> tuple[int, int] | None:
    """(accumulation steps, global batch), or None where the rules say no. Written from the spec alone."""
    b = req.batch_size
    w = req.num_nodes * req.gpus_per_node
    w_r = req.recipe_num_nodes * req.recipe_gpus_per_node

    def level(spec: AccumSpec, world: int, recipe: AccumSpec | None = None):
        totals = []
        e = spec.effec_batch_size
        if spec.accu_grad == 0:
            if e is not None and e != b:
                return "error"
            totals.append(b * world)
        elif spec.accu_grad == 1 or e is not None:
            if e is None:
                alone = spec.gradient_accumulation_steps is None and spec.global_batch is None
                if recipe is None or not alone or recipe.effec_batch_size is None:
                    return "error"
                e = recipe.effec_batch_size
            if e % b:
                return "error"
            totals.append(e * world)
        if spec.gradient_accumulation_steps is not None:
            totals.append(b * spec.gradient_accumulation_steps * world)
        if spec.global_batch is not None:
            totals.append(spec.global_batch)
        if len(set(totals)) > 1:
            return "error"
        return totals[0] if totals else None

    cli = level(req.cli_accum, w, req.recipe_accum)
    if cli == "error":
        return None
    if cli is not None:
        g = cli
    else:
        r = level(req.recipe_accum, w_r)
        if r == "error":
            return None
        if r is None:
            r = b * w_r  # nothing given anywhere: the recipe's accu_grad 0
        if req.hold == "global_batch":
            g = r
        else:
            if r % (b * w_r):
                return None
            g = b * (r // (b * w_r)) * w
    if g % (b * w):
        return None
    if req.dataset_size is not None and req.dataset_size < g:
        return None
    return g // (b * w), g


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
    ratio = g / req.reference_batch
    rule = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[req.lr_rule]
    assert math.isclose(plan.peak_lr, req.base_lr * rule, rel_tol=1e-12)
    assert plan.warmup_steps == math.ceil(req.warmup_samples / g)
    assert plan.warmup_steps * g >= req.warmup_samples > (plan.warmup_steps - 1) * g or req.warmup_samples == 0
    if req.dataset_size is None:
        assert plan.steps_per_epoch is None
    else:
        assert plan.steps_per_epoch == req.dataset_size // g >= 1
    assert math.isclose(plan.audio_seconds_per_update, g * req.segment_seconds)


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
@given(requests(), st.integers(1, 4), st.integers(1, 8))
def test_hold_global_batch_keeps_batch_and_lr_and_names_exactly_the_worlds(
        req: PlanRequest, nodes: int, gpus: int) -> None:
    req = replace(req, cli_accum=AccumSpec(), hold="global_batch", num_nodes=nodes, gpus_per_node=gpus)
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


_junk = st.one_of(st.booleans(), st.integers(-3, 0), st.floats(allow_nan=True), st.text(max_size=3), st.none())


@SETTINGS
@given(requests(), st.sampled_from(["batch_size", "num_nodes", "gpus_per_node", "recipe_num_nodes",
                                     "recipe_gpus_per_node", "reference_batch", "base_lr", "segment_seconds",
                                     "warmup_samples", "hold", "lr_rule"]), _junk)
def test_junk_is_refused_with_plan_error(req: PlanRequest, name: str, junk) -> None:
    bad = replace(req, **{name: junk})
    try:
        make_plan(bad)
    except PlanError:
        return
    # The only junk that may pass is a value that is in fact valid for that field.
    assert name in ("base_lr", "segment_seconds", "warmup_samples") and not isinstance(junk, bool)
    assert isinstance(junk, (int, float)) and math.isfinite(junk) and (junk > 0 or name == "warmup_samples")
