"""Known plans and known refusals of the planner (launcher/plan.py)."""

from __future__ import annotations

import math

import pytest

from launcher.plan import AccumSpec, Plan, PlanError, PlanRequest, apply_suggestion, format_lr, make_plan

REFERENCE = AccumSpec(accu_grad=1, effec_batch_size=8)  # the reference recipe: 4 per GPU, 8 per GPU per update
NOTHING = AccumSpec()


def req(batch_size: int = 4, nodes: int = 1, gpus: int = 2, recipe: AccumSpec = REFERENCE,
        cli: AccumSpec = NOTHING, **kw) -> PlanRequest:
    return PlanRequest(batch_size=batch_size, num_nodes=nodes, gpus_per_node=gpus, recipe_accum=recipe,
                       cli_accum=cli, **kw)


# (request, (micro, accum, world, global), peak lr, accumulation source)
KNOWN = [
    pytest.param(req(), (4, 2, 2, 16), 5e-4, "recipe effec_batch_size=8 at 1×2 GPUs, global batch held",
                 id="reference-defaults"),
    pytest.param(req(gpus=4), (4, 1, 4, 16), 5e-4, "recipe effec_batch_size=8 at 1×2 GPUs, global batch held",
                 id="4-gpus-hold-global"),
    pytest.param(req(gpus=1), (4, 4, 1, 16), 5e-4, "recipe effec_batch_size=8 at 1×2 GPUs, global batch held",
                 id="1-gpu-hold-global"),
    pytest.param(req(gpus=4, hold="accumulation"), (4, 2, 4, 32), 1e-3,
                 "recipe effec_batch_size=8 at 1×2 GPUs, accumulation held", id="4-gpus-hold-accumulation"),
    pytest.param(req(12, gpus=4, cli=AccumSpec(effec_batch_size=24)), (12, 2, 4, 96), 3e-3,
                 "command line effec_batch_size=24", id="bs12-effec24"),
    pytest.param(req(12, gpus=4, cli=AccumSpec(global_batch=96)), (12, 2, 4, 96), 3e-3,
                 "command line global_batch=96", id="bs12-global96"),
    pytest.param(req(12, gpus=4, cli=AccumSpec(accu_grad=1, effec_batch_size=24, gradient_accumulation_steps=2)),
                 (12, 2, 4, 96), 3e-3, "command line effec_batch_size=24 = gradient_accumulation_steps=2",
                 id="two-ways-that-agree"),
    pytest.param(req(cli=AccumSpec(gradient_accumulation_steps=3)), (4, 3, 2, 24), 7.5e-4,
                 "command line gradient_accumulation_steps=3", id="cli-steps"),
    pytest.param(req(cli=AccumSpec(accu_grad=0)), (4, 1, 2, 8), 2.5e-4, "command line accu_grad=0", id="cli-off"),
    pytest.param(req(cli=AccumSpec(accu_grad=1)), (4, 2, 2, 16), 5e-4,
                 "command line accu_grad=1 with the recipe's effec_batch_size=8", id="cli-on-uses-recipe-effec"),
    pytest.param(req(recipe=AccumSpec(gradient_accumulation_steps=2), nodes=2, gpus=2), (4, 1, 4, 16), 5e-4,
                 "recipe gradient_accumulation_steps=2 at 1×2 GPUs, global batch held", id="recipe-steps-2-nodes"),
    pytest.param(req(recipe=AccumSpec(global_batch=64), gpus=8), (4, 2, 8, 64), 2e-3,
                 "recipe global_batch=64 at 1×2 GPUs, global batch held", id="recipe-global"),
    pytest.param(req(recipe=AccumSpec()), (4, 1, 2, 8), 2.5e-4,
                 "recipe accumulation not given (accu_grad=0) at 1×2 GPUs, global batch held", id="nothing-given"),
    pytest.param(req(recipe=AccumSpec(), gpus=1), (4, 2, 1, 8), 2.5e-4,
                 "recipe accumulation not given (accu_grad=0) at 1×2 GPUs, global batch held",
                 id="nothing-given-1-gpu"),
    pytest.param(req(cli=AccumSpec(global_batch=64), lr_rule="sqrt"), (4, 8, 2, 64), 1e-3,
                 "command line global_batch=64", id="sqrt"),
    pytest.param(req(cli=AccumSpec(global_batch=64), lr_rule="none"), (4, 8, 2, 64), 5e-4,
                 "command line global_batch=64", id="none"),
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
    assert plan.steps_per_epoch == 62  # 1000 // 16
    assert plan.audio_seconds_per_update == 64.0


def test_lr_derivation_text() -> None:
    assert make_plan(req(12, gpus=4, cli=AccumSpec(global_batch=96))).lr_derivation == "5e-4 × 96/16 = 3e-3 (linear)"
    sqrt = make_plan(req(12, gpus=4, cli=AccumSpec(global_batch=96), lr_rule="sqrt"))
    assert sqrt.lr_derivation == "5e-4 × √(96/16) = 1.2247e-3 (sqrt)"
    assert sqrt.peak_lr == pytest.approx(5e-4 * math.sqrt(6))
    assert format_lr(5e-4) == "5e-4" and format_lr(0.0030000000000000005) == "3e-3"


def test_the_story_is_refused() -> None:
    """batch_size 12 with the reference's accu_grad 1, effec_batch_size 8: the optimizer never stepped."""
    with pytest.raises(PlanError) as info:
        make_plan(req(12))
    text = str(info.value)
    assert "8 is not a positive multiple of batch_size 12" in text
    assert "12, 24, 36" in text
    assert "valid batch_size values (divisors of 8): 1, 2, 4, 8" in text
    assert "--effec_batch_size" in text and "--global_batch" in text
    assert info.value.suggestions["effec_batch_size"] == (12, 24, 36)
    assert info.value.suggestions["batch_size"] == (1, 2, 4, 8)
    for key, values in info.value.suggestions.items():
        for v in values:
            make_plan(apply_suggestion(req(12), key, v))


def test_story_on_the_command_line_too() -> None:
    with pytest.raises(PlanError, match="8 is not a positive multiple of batch_size 12"):
        make_plan(req(12, recipe=AccumSpec(), cli=AccumSpec(effec_batch_size=8)))


def test_world_that_cannot_hold_the_global_batch_lists_those_that_can() -> None:
    with pytest.raises(PlanError) as info:
        make_plan(req(nodes=2, gpus=4))  # 16 samples over 8 GPUs at 4 each: half a micro-batch
    e = info.value
    assert e.suggestions["world_size"] == (1, 2, 4)
    assert e.suggestions["num_nodes"] == (1,)
    assert e.suggestions["batch_size"] == (1, 2)
    assert e.suggestions["hold"] == ("accumulation",)
    assert "world sizes that can hold 16 at batch_size 4: 1, 2, 4" in str(e)
    assert "--num_nodes 1" in str(e)


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
    (req(batch_size=True), "batch_size must be a whole number"),
    (req(batch_size=0), "batch_size must be at least 1"),
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
    (req(dataset_size=0), "dataset_size must be at least 1"),
])
def test_refusals(bad: PlanRequest, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        make_plan(bad)


def test_command_line_way_replaces_an_inconsistent_recipe() -> None:
    plan = make_plan(req(12, cli=AccumSpec(global_batch=48)))
    assert (plan.accumulation_steps, plan.global_batch) == (2, 48)


def test_plan_json_round_trip_and_tamper() -> None:
    plan = make_plan(req(12, gpus=4, cli=AccumSpec(effec_batch_size=24), dataset_size=1000, notes=("n",)))
    assert Plan.from_json(plan.to_json()) == plan
    d = plan.to_dict()
    assert d["lr"] == plan.peak_lr and d["train_batch_size"] == 96
    with pytest.raises(PlanError, match="global_batch 97 != micro_batch 12"):
        Plan.from_dict({**d, "global_batch": 97, "train_batch_size": 97})
    with pytest.raises(PlanError, match="train_batch_size is 95"):
        Plan.from_dict({**d, "train_batch_size": 95})
    with pytest.raises(PlanError, match="unknown key"):
        Plan.from_dict({**d, "bogus": 1})
