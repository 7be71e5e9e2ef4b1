"""The compiled training micro-batch (model/compile.py) on the tiny preset: no graph break anywhere in a compiled
region, one compilation per region over training steps, validation and a weight reload, and one optimizer step
that agrees with eager to 1e-5."""

from __future__ import annotations

import copy

import pytest
import torch

from model import build_model, compute_features, features, mask_loss
from model.compile import COMPILE_OPTIONS, compile_regions, compiled_step_functions, configure_inductor, eager

SECONDS = 1.0  # 121 frames: two 64-frame groups of the tiny preset, the second padded
# 496 frames: the hidden projections' depthwise convolutions (128 channels) are large enough for the CPU's own
# backward (model/network.py's _CpuTimeConv), the path a compiled CPU step traces.
LONG_SECONDS = 4.0


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs, from a state like a fresh process's (the mel filters not yet built: building
    them inside a compiled region must not recompile it); inductor's settings are put back afterwards."""
    features._MEL_CACHE.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    saved = torch._inductor.config.fallback_random
    configure_inductor("cpu")
    yield
    torch._inductor.config.fallback_random = saved
    torch._dynamo.reset()


def pair(seed: int, batch: int = 2, seconds: float = SECONDS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    samples = int(seconds * 48000)
    clean = torch.randn(batch, samples, generator=gen).cumsum(-1) * 1e-3
    clean = clean - clean.mean(-1, keepdim=True)
    return clean + 0.05 * torch.randn(batch, samples, generator=gen), clean


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def test_no_graph_break_in_any_region_in_training_or_eval() -> None:
    """torch._dynamo.explain traces without compiling: every region of every mode is one graph with no break."""
    torch.manual_seed(0)
    model = build_model("tiny")
    noisy, clean = pair(1)
    feats = compute_features(noisy)
    blocks = model.mossformer.mdl.intra_mdl.mossformerM
    x = torch.randn(2, feats.shape[1], model.config.model_dim)
    angles = blocks.rotary_angles(feats.shape[1], x.device, torch.float32)
    for training in (True, False):
        model.train(training)
        with torch.set_grad_enabled(training):
            mask = model(feats)
            for name, fn, args in (
                ("features", compute_features, (noisy, 1.0 if training else 0.0)),
                ("loss", mask_loss, (mask, noisy, clean)),
                ("mask network", model.mossformer, (feats,)),
                ("attention unit", blocks.layers[0], (x, angles)),
                ("FSMN block", blocks.fsmn[0], (x,)),
            ):
                report = torch._dynamo.explain(fn)(*args)
                assert report.graph_break_count == 0, (name, training, [b.reason for b in report.break_reasons])
                assert report.graph_count == 1, (name, training, report.graph_count)


def train_micro(model, features, loss_fn, noisy, clean) -> torch.Tensor:
    loss = loss_fn(model(features(noisy, dither=1.0)), noisy, clean)
    loss.backward()
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("regions", ["blocks", "model"])
def test_one_optimizer_step_compiled_agrees_with_eager(regions) -> None:
    """Same weights, same batch, same random streams (dither and dropout): the loss, the gradients and the weights
    after one clipped Adam step agree to 1e-5. fullgraph=True also compiles the backward of every region, so a
    graph break anywhere fails here.

    Weights are compared where the gradient is at least 1e-5: Adam's first update is lr * g / (|g| + eps), +-lr
    whatever g's last bits for |g| >> eps = 1e-8, but for |g| near eps it turns a rounding difference of g (1e-8
    in a gradient of order 1) into up to lr (5e-4) of weight. Below 1e-5 the weights only have to stay within
    the same +-lr of where they started, as Adam's step bounds them."""
    torch.manual_seed(0)
    eager_model = build_model("tiny").train()
    compiled_model = copy.deepcopy(eager_model)
    start = {n: p.detach().clone() for n, p in eager_model.named_parameters()}
    compiled = compile_regions(compiled_model, regions)
    assert compiled and all(m._compiled_call_impl is not None for m in compiled)
    features, loss_fn = compiled_step_functions()
    noisy, clean = pair(2, batch=1, seconds=LONG_SECONDS)
    results = []
    for model, feats_fn, loss_f in ((eager_model, compute_features, mask_loss), (compiled_model, features, loss_fn)):
        opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.999), eps=1e-8)
        torch.manual_seed(3)
        loss = train_micro(model, feats_fn, loss_f, noisy, clean)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        results.append((float(loss.detach()), grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_e, grads_e, weights_e), (loss_c, grads_c, weights_c) = results
    assert graphs() >= 3  # features, loss and at least one model region really were compiled
    assert abs(loss_c - loss_e) <= 1e-5
    assert grads_c.keys() == grads_e.keys() and weights_c.keys() == weights_e.keys()  # no _orig_mod. names
    assert max(float((grads_c[n] - grads_e[n]).abs().max()) for n in grads_e) <= 1e-5
    for n, g in grads_e.items():
        steady = g.abs() >= 1e-5
        assert float(((weights_c[n] - weights_e[n]) * steady).abs().max()) <= 1e-5, n
        assert float((weights_c[n] - start[n]).abs().max()) <= 5e-4 * (1 + 1e-3), n


@pytest.mark.slow
def test_one_compilation_per_region_over_steps_validation_and_a_reload() -> None:
    """Training steps, an eval-mode validation pass (dither 0, no_grad, another batch size) under eager(), a
    weight reload as a resume does, more steps: every graph is compiled on the first step and never again, and
    after the reload the compiled step computes what an eager model with the reloaded weights computes."""
    torch.manual_seed(0)
    model = build_model("tiny").train()
    compile_regions(model, "blocks")
    features, loss_fn = compiled_step_functions()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)

    def step(seed: int) -> float:
        noisy, clean = pair(seed)
        torch.manual_seed(seed)
        loss = train_micro(model, features, loss_fn, noisy, clean)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    step(10)
    first = graphs()
    # features, loss, one graph per block kind (the tiny preset's two layers of each kind share it)
    assert first == 4, first
    saved = copy.deepcopy(model.state_dict())
    with torch.compiler.set_stance("fail_on_recompile"):
        for epoch in range(2):
            step(11 + epoch)
            model.eval()
            with torch.no_grad(), eager():
                noisy, _ = pair(20 + epoch, batch=3)
                mask = model(compute_features(noisy, dither=0.0))
            assert mask.shape[0] == 3 and torch.isfinite(mask).all()
            model.train()
        model.load_state_dict(saved)  # resume: the same parameter objects get the checkpoint's values
        resumed = step(13)
    assert graphs() == first
    reference = build_model("tiny").train()
    reference.load_state_dict(saved)
    noisy, clean = pair(13)
    torch.manual_seed(13)
    assert abs(float(train_micro(reference, compute_features, mask_loss, noisy, clean).detach()) - resumed) <= 1e-5


def test_only_known_regions_and_only_the_model() -> None:
    model = build_model("tiny")
    with pytest.raises(ValueError, match="valid: off, blocks, model"):
        compile_regions(model, "everything")
    with pytest.raises(TypeError, match="MossFormer2"):
        compile_regions(model.mossformer, "blocks")
    assert compile_regions(model, "off") == []
    assert COMPILE_OPTIONS["fullgraph"] is True
