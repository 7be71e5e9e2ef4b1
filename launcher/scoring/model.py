"""The model a checkpoint holds, for evaluation: a plain fp32 model, whatever the checkpoint's kind."""

from __future__ import annotations

from launcher.checkpoint.weights import InitError, expected_shapes, match, read_weights, source_preset


def load_model(checkpoint: str, preset: str | None):
    """A plain fp32 model holding the checkpoint's weights, and one line saying what was loaded."""
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
