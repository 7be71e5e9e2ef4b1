"""Known plans and known refusals of the planner (launcher/plan/rules.py)."""

from __future__ import annotations

import math

import pytest

from launcher.plan import (
    AccumSpec,
    Origins,
    Plan,
    PlanError,
    PlanRequest,
    ResumeHold,
    apply_suggestion,
    format_lr,
    make_plan,
)

REFERENCE = AccumSpec(accu_grad=1, effec_batch_size=8)  # the reference recipe: 4 per GPU, 8 per GPU per update
NOTHING = AccumSpec()
KEPT = "derived: effec_batch_size=8 in recipe at its batch_size 4 = 2 micro-batches per update"


def req(batch_size: int = 4, nodes: int = 1, gpus: int = 2, recipe: AccumSpec = REFERENCE,
        cli: AccumSpec = NOTHING, **kw) -> PlanRequest:
    return PlanRequest(batch_size=batch_size, num_nodes=nodes, gpus_per_node=gpus, recipe_accum=recipe,
                       cli_accum=cli, **kw)


def resumed(global_batch: int = 16, peak_lr: float = 5e-4, **kw) -> ResumeHold:
    fields = dict(source="checkpoint run/checkpoints/step00000003", global_batch=global_batch, peak_lr=peak_lr,
                  base_lr=5e-4, reference_batch=16, lr_rule="linear", lr_derivation="5e-4 × 16/16 = 5e-4 (linear)",
                  warmup_samples=0, warmup_from_lr=0.0)
    return ResumeHold(**{**fields, **kw})


# (request, (micro, accum, world, global), peak lr, accumulation source)
KNOWN = [
    pytest.param(req(), (4, 2, 2, 16), 5e-4, KEPT, id="reference-defaults"),
    # The README's two examples: an inherited micro-batch keeps the recipe's 2 micro-batches; the world enters G.
    pytest.param(req(12, recipe_batch_size=4), (12, 2, 2, 48), 1.5e-3, KEPT + ", kept at batch_size 12",
                 id="bs12-preset-on-1x2"),
    pytest.param(req(nodes=2, gpus=8), (4, 2, 16, 128), 4e-3, KEPT, id="bs4-on-2x8"),
    pytest.param(req(12, recipe_batch_size=4, nodes=2, gpus=8), (12, 2, 16, 384), 1.2e-2,
                 KEPT + ", kept at batch_size 12", id="bs12-on-2x8"),
    pytest.param(req(gpus=4), (4, 2, 4, 32), 1e-3, KEPT, id="4-gpus-hold-accumulation"),
    pytest.param(req(gpus=1), (4, 2, 1, 8), 2.5e-4, KEPT, id="1-gpu-hold-accumulation"),
    pytest.param(req(gpus=4, hold="global_batch"), (4, 1, 4, 16), 5e-4,
                 "derived: global batch 16 held (hold global_batch) / (4 × 4 GPUs)", id="4-gpus-hold-global"),
    pytest.param(req(gpus=1, hold="global_batch"), (4, 4, 1, 16), 5e-4,
                 "derived: global batch 16 held (hold global_batch) / (4 × 1 GPUs)", id="1-gpu-hold-global"),
    pytest.param(req(4, recipe_batch_size=12, recipe=AccumSpec(accu_grad=1, effec_batch_size=24)), (4, 2, 2, 16),
                 5e-4, "derived: effec_batch_size=24 in recipe at its batch_size 12 = 2 micro-batches per update, "
                       "kept at batch_size 4", id="smaller-micro-keeps-accumulation"),
    pytest.param(req(12, gpus=4, cli=AccumSpec(effec_batch_size=24)), (12, 2, 4, 96), 3e-3,
                 "command line effec_batch_size=24", id="bs12-effec24"),
    pytest.param(req(12, gpus=4, cli=AccumSpec(global_batch=96)), (12, 2, 4, 96), 3e-3,
                 "command line global_batch=96", id="bs12-global96"),
    pytest.param(req(12, gpus=4, cli=AccumSpec(accu_grad=1, effec_batch_size=24, gradient_accumulation_steps=2)),
                 (12, 2, 4, 96), 3e-3, "command line effec_batch_size=24 = gradient_accumulation_steps=2",
                 id="two-ways-that-agree"),
    pytest.param(req(cli=AccumSpec(gradient_accumulation_steps=3)), (4, 3, 2, 24), 7.5e-4,
                 "command line gradient_accumulation_steps=3", id="cli-steps"),
    pytest.param(req(12, recipe_batch_size=4, cli=AccumSpec(gradient_accumulation_steps=3)), (12, 3, 2, 72),
                 2.25e-3, "command line gradient_accumulation_steps=3", id="cli-steps-with-preset-micro"),
    pytest.param(req(cli=AccumSpec(accu_grad=0)), (4, 1, 2, 8), 2.5e-4, "command line accu_grad=0", id="cli-off"),
    pytest.param(req(12, recipe_batch_size=4, cli=AccumSpec(accu_grad=1)), (12, 2, 2, 48), 1.5e-3,
                 "command line accu_grad=1 with recipe's effec_batch_size 8 at batch_size 4 (2 micro-batches)",
                 id="cli-on-uses-recipe-accumulation"),
    pytest.param(req(recipe=AccumSpec(gradient_accumulation_steps=2), nodes=2, gpus=2), (4, 2, 4, 32), 1e-3,
                 "derived: gradient_accumulation_steps=2 in recipe at its batch_size 4 = 2 micro-batches per update",
                 id="recipe-steps-2-nodes"),
    pytest.param(req(recipe=AccumSpec(gradient_accumulation_steps=2), nodes=2, gpus=2, hold="global_batch"),
                 (4, 1, 4, 16), 5e-4, "derived: global batch 16 held (hold global_batch) / (4 × 4 GPUs)",
                 id="recipe-steps-2-nodes-hold-global"),
    pytest.param(req(12, recipe_batch_size=4, recipe=AccumSpec(global_batch=16)), (12, 2, 2, 48), 1.5e-3,
                 "derived: global_batch=16 in recipe at its batch_size 4 on 1×2 GPUs = 2 micro-batches per update, "
                 "kept at batch_size 12", id="recipe-global-new-micro"),
    pytest.param(req(recipe=AccumSpec(global_batch=64), gpus=8, hold="global_batch"), (4, 2, 8, 64), 2e-3,
                 "derived: global batch 64 held (hold global_batch) / (4 × 8 GPUs)", id="recipe-global-held"),
    pytest.param(req(recipe=AccumSpec()), (4, 1, 2, 8), 2.5e-4,
                 "derived: accumulation not given (accu_grad=0) in recipe at its batch_size 4 = 1 micro-batch per "
                 "update", id="nothing-given"),
    pytest.param(req(recipe=AccumSpec(), gpus=1, hold="global_batch"), (4, 2, 1, 8), 2.5e-4,
                 "derived: global batch 8 held (hold global_batch) / (4 × 1 GPUs)", id="nothing-given-1-gpu-held"),
    pytest.param(req(cli=AccumSpec(global_batch=64), lr_rule="sqrt"), (4, 8, 2, 64), 1e-3,
                 "command line global_batch=64", id="sqrt"),
    pytest.param(req(cli=AccumSpec(global_batch=64), lr_rule="none"), (4, 8, 2, 64), 5e-4,
                 "command line global_batch=64", id="none"),
    pytest.param(req(gpus=1, resume=resumed()), (4, 4, 1, 16), 5e-4,
                 "derived: global batch 16 held from checkpoint run/checkpoints/step00000003 / (4 × 1 GPUs)",
                 id="requeue-on-1-gpu"),
    pytest.param(req(12, recipe_batch_size=4, nodes=2, gpus=2, resume=resumed(48, 1.5e-3)), (12, 1, 4, 48), 1.5e-3,
                 "derived: global batch 48 held from checkpoint run/checkpoints/step00000003 / (12 × 4 GPUs)",
                 id="resume-on-more-gpus"),
]


@pytest.mark.parametrize("request_, triple, lr, source", KNOWN)
def test_known_plans(request_: PlanRequest, triple: tuple, lr: float, source: str) -> None:
    plan = make_plan(request_)
    assert (plan.micro_batch, plan.accumulation_steps, plan.world_size, plan.global_batch) == triple
    assert plan.peak_lr == pytest.approx(lr, rel=1e-12)
    assert plan.accumulation_source == source
    assert plan.ds_batch_keys() == {"train_batch_size": triple[3], "train_micro_batch_size_per_gpu": triple[0],
                                    "gradient_accumulation_steps": triple[1]}


def test_reference_defaults_card_numbers() -> None:
    plan = make_plan(req(warmup_samples=1000, dataset_size=1000, segment_seconds=4.0))
    assert plan.headline == "4 × 2 × 2 = 16 samples per update"
    assert plan.lr_derivation == "5e-4 × 16/16 = 5e-4 (linear)"
    assert plan.samples_per_gpu_per_update == 8  # the reference's effec_batch_size
    assert plan.warmup_steps == 63  # ceil(1000 / 16)
    assert plan.warmup_from_lr == 0.0  # k = 1: an explicit warmup ramps from 0
    assert plan.steps_per_epoch == 62  # 1000 // 16
    assert plan.audio_seconds_per_update == 64.0
    assert plan.warnings == ()


def test_lr_derivation_text() -> None:
    assert make_plan(req(12, gpus=4, cli=AccumSpec(global_batch=96))).lr_derivation == "5e-4 × 96/16 = 3e-3 (linear)"
    sqrt = make_plan(req(12, gpus=4, cli=AccumSpec(global_batch=96), lr_rule="sqrt"))
    assert sqrt.lr_derivation == "5e-4 × √(96/16) = 1.2247e-3 (sqrt)"
    assert sqrt.peak_lr == pytest.approx(5e-4 * math.sqrt(6))
    assert format_lr(5e-4) == "5e-4" and format_lr(0.0030000000000000005) == "3e-3"


EXPLICIT_12_8 = """\
effec_batch_size 8 is not a positive multiple of batch_size 12 (command line: accu_grad 1, effec_batch_size 8; batch_size 12).
Rule: effec_batch_size must be a positive multiple of batch_size, and 8 is not a positive multiple of 12: with accu_grad 1 each GPU accumulates effec_batch_size / batch_size micro-batches per optimizer update, which must be a whole number; 8/12 = 0.667 is not (the reference then never steps the optimizer).
Valid choices:
  valid effec_batch_size values (multiples of 12): 12, 24, 36, …  e.g. --effec_batch_size 12
  valid batch_size values (divisors of 8): 1, 2, 4, 8
  or give the global batch directly (multiples of 12 × 2 GPUs): --global_batch 24, 48, 72"""


@pytest.mark.parametrize("recipe_batch", [None, 4, 12])
def test_the_story_typed_on_the_command_line_is_refused_as_before(recipe_batch) -> None:
    """--batch_size 12 --accu_grad 1 --effec_batch_size 8: explicit values that contradict each other, whatever
    the recipe says; the message, rule and valid choices are the ones this refusal always had."""
    story = req(12, recipe_batch_size=recipe_batch, cli=AccumSpec(accu_grad=1, effec_batch_size=8))
    with pytest.raises(PlanError) as info:
        make_plan(story)
    assert str(info.value) == EXPLICIT_12_8
    assert info.value.rule == "effec_batch_size is a positive multiple of batch_size"
    assert info.value.suggestions == {"effec_batch_size": (12, 24, 36), "batch_size": (1, 2, 4, 8),
                                      "global_batch": (24, 48, 72)}
    for key, values in info.value.suggestions.items():
        for v in values:
            make_plan(apply_suggestion(story, key, v))


def test_a_recipe_that_contradicts_itself_is_refused_naming_it() -> None:
    """batch_size 12 and effec_batch_size 8 in the same recipe: 0.667 micro-batches, the reference's stall."""
    story = req(12, recipe_name="recipe recipes/story.yaml")
    with pytest.raises(PlanError) as info:
        make_plan(story)
    text = str(info.value)
    assert text.startswith("recipe recipes/story.yaml: effec_batch_size 8 is not a positive multiple of its "
                           "batch_size 12: 8/12 = 0.667")
    assert "batch_size one of 1, 2, 4, 8" in text and "effec_batch_size one of 12, 24, 36" in text
    assert "--effec_batch_size 12, 24, 36" in text and "--gradient_accumulation_steps 1, 2, 3" in text
    assert info.value.suggestions["effec_batch_size"] == (12, 24, 36)
    for key, values in info.value.suggestions.items():
        for v in values:
            make_plan(apply_suggestion(story, key, v))
    # The command line's way replaces the recipe's, so the contradiction is not in the way any more.
    assert make_plan(req(12, cli=AccumSpec(global_batch=48))).accumulation_steps == 2
    # Also when it only turns accumulation on: --accu_grad 1 alone takes the recipe's effec_batch_size.
    with pytest.raises(PlanError, match="contradicts itself"):
        make_plan(req(12, cli=AccumSpec(accu_grad=1)))


def test_world_that_cannot_hold_the_global_batch_lists_those_that_can() -> None:
    with pytest.raises(PlanError) as info:
        make_plan(req(nodes=2, gpus=4, hold="global_batch"))  # 16 samples over 8 GPUs at 4 each: half a micro-batch
    e = info.value
    assert e.suggestions["world_size"] == (1, 2, 4)
    assert e.suggestions["num_nodes"] == (1,)
    assert e.suggestions["batch_size"] == (1, 2)
    assert e.suggestions["hold"] == ("accumulation",)
    assert "world sizes that can hold 16 at batch_size 4: 1, 2, 4" in str(e)
    assert "--num_nodes 1" in str(e)
    assert "or --hold accumulation: 4 × 2 × 8 = 64 samples per update, lr 2e-3" in str(e)


def test_cli_global_batch_the_world_cannot_hold() -> None:
    with pytest.raises(PlanError) as info:
        make_plan(req(12, gpus=4, cli=AccumSpec(global_batch=100)))
    assert "no world size can hold 100 at batch_size 12" in str(info.value)
    assert info.value.suggestions["global_batch"] == (48, 96, 144)


@pytest.mark.parametrize("bad, match", [
    (req(recipe=AccumSpec(accu_grad=0, effec_batch_size=8)), "accu_grad 0 .* effec_batch_size 8 differs"),
    (req(recipe=AccumSpec(accu_grad=1)), "accu_grad 1 needs effec_batch_size"),
    (req(recipe=AccumSpec(gradient_accumulation_steps=2), cli=AccumSpec(accu_grad=1)),
     "accu_grad 1 needs effec_batch_size"),
    (req(cli=AccumSpec(accu_grad=1, gradient_accumulation_steps=2)), "accu_grad 1 needs effec_batch_size"),
    (req(recipe=AccumSpec(accu_grad=1, effec_batch_size=8, gradient_accumulation_steps=3)),
     "2 ways that disagree.*effec_batch_size=8 means 16.*gradient_accumulation_steps=3 means 24"),
    (req(cli=AccumSpec(effec_batch_size=8, global_batch=32)), "disagree"),
    (req(dataset_size=10), "dataset_size 10 is smaller than one optimizer update of 16"),
    (req(recipe=AccumSpec(global_batch=20), hold="accumulation"), "2.5 accumulation steps"),
    (req(12, recipe_batch_size=4, recipe=AccumSpec(effec_batch_size=6)),
     "recipe: effec_batch_size 6 is not a positive multiple of its batch_size 4"),
    (req(batch_size=True), "batch_size must be a whole number"),
    (req(batch_size=0), "batch_size must be at least 1"),
    (req(recipe_batch_size=0), "recipe_batch_size must be at least 1"),
    (req(gpus=-2), "gpus_per_node must be at least 1"),
    (req(batch_size=4.0), "batch_size must be a whole number"),
    (req(recipe=AccumSpec(accu_grad=2)), "accu_grad must be 0"),
    (req(recipe=AccumSpec(accu_grad=True, effec_batch_size=8)), "accu_grad must be 0"),
    (req(cli=AccumSpec(gradient_accumulation_steps=0)), "gradient_accumulation_steps must be at least 1"),
    (req(base_lr=float("nan")), "base_lr must be a positive finite number"),
    (req(base_lr=0.0), "base_lr must be a positive finite number"),
    (req(hold="world"), "hold must be one of"),
    (req(lr_rule="cubic"), "lr_rule must be one of"),
    (req(warmup_samples=-1), "warmup_samples must be at least 0"),
    (req(warmup_samples="soon"), "warmup_samples must be a whole number or 'auto'"),
    (req(adam_beta2=1.0), r"adam_beta2 must be a number in \[0, 1\)"),
    (req(dataset_size=0), "dataset_size must be at least 1"),
    (req(resume=resumed(global_batch=0)), "step00000003: global_batch must be at least 1"),
    (req(resume=resumed(warmup_from_lr=1.0)), r"warmup_from_lr must be a number in \[0, peak_lr\]"),
])
def test_refusals(bad: PlanRequest, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        make_plan(bad)


def test_resume_holds_the_checkpoints_global_batch_lr_and_warmup_on_any_world() -> None:
    held = resumed(global_batch=128, peak_lr=4e-3, warmup_samples=32000, warmup_from_lr=5e-4,
                   lr_derivation="5e-4 × 128/16 = 4e-3 (linear)")
    for nodes, gpus in ((2, 8), (1, 8), (1, 1), (4, 8)):
        plan = make_plan(req(nodes=nodes, gpus=gpus, resume=held, base_lr=1e-3, lr_rule="sqrt", hold="global_batch"))
        assert plan.global_batch == 128 and plan.peak_lr == 4e-3
        assert (plan.base_lr, plan.lr_rule, plan.warmup_samples, plan.warmup_from_lr) == (5e-4, "linear", 32000, 5e-4)
        assert plan.accumulation_steps == 128 // (4 * nodes * gpus)
        assert plan.source("global_batch").startswith("held from checkpoint run/checkpoints/step00000003")
        assert plan.source("peak_lr") == "held from checkpoint run/checkpoints/step00000003"
        assert plan.lr_derivation == ("4e-3 held from checkpoint run/checkpoints/step00000003 "
                                      "(5e-4 × 128/16 = 4e-3 (linear))")
        assert plan.warnings == ()  # the LR is the checkpoint's, not this plan's choice
        assert plan.resumed_from == "checkpoint run/checkpoints/step00000003"
        assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError) as info:
        make_plan(req(nodes=1, gpus=3, resume=held))
    assert "global batch 128 (held from checkpoint run/checkpoints/step00000003) cannot be split over 3 GPUs" \
        in str(info.value)
    assert info.value.suggestions["world_size"] == (1, 2, 4, 8, 16, 32)
    assert "global_batch" not in info.value.suggestions  # a resumed run cannot change it


@pytest.mark.parametrize("cli, ok", [
    (AccumSpec(global_batch=16), True),
    (AccumSpec(gradient_accumulation_steps=4), True),  # 4 × 4 × 1 = 16
    (AccumSpec(global_batch=32), False),
    (AccumSpec(gradient_accumulation_steps=2), False),
    (AccumSpec(accu_grad=0), False),
])
def test_resume_refuses_an_explicit_batch_that_contradicts_the_checkpoint(cli: AccumSpec, ok: bool) -> None:
    request = req(gpus=1, cli=cli, resume=resumed())
    if ok:
        assert make_plan(request).global_batch == 16
        return
    with pytest.raises(PlanError) as info:
        make_plan(request)
    text = str(info.value)
    assert "but this run resumes checkpoint run/checkpoints/step00000003, which was trained with a global batch " \
           "of 16 (lr 5e-4)" in text
    assert "this world then runs 4 × 4 × 1 = 16" in text and "--global_batch 16" in text
    assert info.value.rule == "a resumed run holds its checkpoint's global batch"


def test_automatic_warmup() -> None:
    flat = make_plan(req())  # k = 1: the reference's LR, no warmup
    assert (flat.warmup_samples, flat.warmup_steps) == (0, 0)
    assert flat.source("warmup_samples").startswith("automatic: none")
    raised = make_plan(req(12, recipe_batch_size=4))  # k = 3
    assert (raised.warmup_samples, raised.warmup_steps, raised.warmup_from_lr) == (32000, 667, 5e-4)
    assert raised.source("warmup_samples").startswith("automatic at k = 3 > 1: 2/(1 − β2) = 2000 updates × "
                                                      "reference batch 16 = 32000 samples")
    small = make_plan(req(12, recipe_batch_size=4, dataset_size=1000))  # 5 epochs are shorter
    assert (small.warmup_samples, small.warmup_steps) == (5000, 105)
    assert make_plan(req(12, recipe_batch_size=4, adam_beta2=0.99)).warmup_samples == 200 * 16


def test_only_the_command_line_switches_warmup_off_when_the_lr_is_raised() -> None:
    inherited = make_plan(req(12, recipe_batch_size=4, warmup_samples=0, origins=Origins(warmup="recipe r.yaml")))
    assert inherited.warmup_samples == 32000
    assert "recipe r.yaml's warmup_samples 0 holds for k <= 1 only" in inherited.source("warmup_samples")
    typed = make_plan(req(12, recipe_batch_size=4, warmup_samples=0, warmup_from_command_line=True,
                          origins=Origins(warmup="command line --warmup_samples 0")))
    assert (typed.warmup_samples, typed.warmup_steps) == (0, 0)
    assert typed.source("warmup_samples") == "command line --warmup_samples 0"
    assert make_plan(req(warmup_samples=0)).warmup_samples == 0  # k = 1: the recipe's 0 stands
    explicit = make_plan(req(12, recipe_batch_size=4, warmup_samples=960))
    assert (explicit.warmup_samples, explicit.warmup_steps, explicit.warmup_from_lr) == (960, 20, 5e-4)


@pytest.mark.parametrize("nodes, gpus, rule, warned", [
    (2, 8, "linear", True),  # k = 8
    (1, 8, "linear", False),  # k = 4: at the threshold, not past it
    (3, 4, "linear", True),  # k = 6
    (2, 8, "sqrt", False),
    (2, 8, "none", False),
])
def test_linear_lr_warning(nodes: int, gpus: int, rule: str, warned: bool) -> None:
    plan = make_plan(req(nodes=nodes, gpus=gpus, lr_rule=rule))
    if not warned:
        assert plan.warnings == ()
        return
    (warning,) = plan.warnings
    g = plan.global_batch
    assert f"the linear rule raises the LR {g // 16}× over base_lr (5e-4 → {format_lr(plan.peak_lr)})" in warning
    assert f"--lr_rule sqrt gives 5e-4 × √({g}/16) = {format_lr(5e-4 * math.sqrt(g / 16))}" in warning
    assert "Malladi et al. 2022" in warning


def test_sources_name_every_number() -> None:
    origins = Origins(batch_size="preset ds_configs/bs12.json", world="command line --num_nodes 2 --num_gpus 8",
                      lr="recipe r.yaml", warmup="recipe r.yaml")
    plan = make_plan(req(12, recipe_batch_size=4, nodes=2, gpus=8, recipe_name="recipe r.yaml", origins=origins))
    assert dict(plan.sources) == {
        "micro_batch": "preset ds_configs/bs12.json",
        "accumulation_steps": "derived: effec_batch_size=8 in recipe r.yaml at its batch_size 4 = 2 micro-batches "
                              "per update, kept at batch_size 12",
        "world_size": "command line --num_nodes 2 --num_gpus 8",
        "global_batch": "derived: 12 × 2 × 16",
        "peak_lr": "derived: 5e-4 × 384/16 = 1.2e-2 (linear); base_lr from recipe r.yaml",
        "warmup_samples": "automatic at k = 24 > 1: 2/(1 − β2) = 2000 updates × reference batch 16 = 32000 samples "
                          "(or 5 epochs on a corpus of fewer than 6400 examples)",
    }


def test_plan_json_round_trip_and_tamper() -> None:
    plan = make_plan(req(12, gpus=4, cli=AccumSpec(effec_batch_size=24), dataset_size=1000, notes=("n",)))
    assert Plan.from_json(plan.to_json()) == plan
    d = plan.to_dict()
    assert d["lr"] == plan.peak_lr and d["train_batch_size"] == 96
    assert isinstance(d["sources"], dict) and d["warmup_from_lr"] == 5e-4
    assert d["warnings"] == list(plan.warnings) and len(plan.warnings) == 1  # k = 6
    with pytest.raises(PlanError, match="global_batch 97 != micro_batch 12"):
        Plan.from_dict({**d, "global_batch": 97, "train_batch_size": 97})
    with pytest.raises(PlanError, match="train_batch_size is 95"):
        Plan.from_dict({**d, "train_batch_size": 95})
    with pytest.raises(PlanError, match="unknown key"):
        Plan.from_dict({**d, "bogus": 1})
