"""The fp32 weights of a training run's checkpoint, as a reference-compatible checkpoint (`python -m launcher.export`).

Reads the newest complete checkpoint (or --tag) of any ZeRO stage and precision on the CPU — no GPU, no
process group — consolidates the fp32 weights, loads them strictly into a plain model of the run's preset
and writes `{'model': state_dict}` with `mossformer.` keys, as ClearerVoice's loader expects.

In a bf16/fp16 run the module DeepSpeed saves is a 16-bit copy; the weights the optimizer updates are the
fp32 masters in the optimizer state, and those are exported, at every stage:
- ZeRO-0 (DeepSpeed's fp16/bf16 optimizers): `optimizer.fp32_groups` (unfused) or `fp32_groups_flat`
  (fused) of the model-states file, in the order of the model's trainable parameters;
- ZeRO-1 with bf16 and fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, ds_configs/bf16.json):
  each rank's flat fp32 partition in `bf16_zero_pp_rank_*_optim_states.pt`, placed by its
  `param_slice_mappings`;
- ZeRO 1–3 otherwise: DeepSpeed's zero_to_fp32.
Tensors no optimizer owns (the frozen rotary frequencies, buffers) are constants of the preset: where the
checkpoint holds them rounded to 16 bits, the preset's exact fp32 values are written instead.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from pathlib import Path
from typing import Any

from launcher.checkpoint.marker import MARKER, complete_tags, read_marker

_BF16_OPTIMIZER_FILES = "bf16_zero_pp_rank_*_optim_states.pt"


class ExportError(RuntimeError):
    pass


def _trainable(model) -> list[tuple[str, Any]]:
    """(name, parameter) in the order launcher/train.py hands them to deepspeed.initialize."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _placed(tensors: list, model, source: Path) -> dict:
    """One fp32 tensor per trainable parameter, in order, checked and shaped."""
    params = _trainable(model)
    if len(tensors) != len(params):
        raise ExportError(f"{source}: {len(tensors)} fp32 master tensors for the {len(params)} trainable "
                          f"parameters of the model; was it saved from this preset?")
    out = {}
    for (name, p), t in zip(params, tensors):
        if t.numel() != p.numel():
            raise ExportError(f"{source}: the fp32 master of {name} has {t.numel()} elements, the parameter "
                              f"{p.numel()}; was it saved from this preset?")
        out[name] = t.detach().float().reshape(p.shape).clone()
    return out


def _zero0_masters(optimizer_state: Any, model, source: Path) -> dict | None:
    """fp32 masters of DeepSpeed's ZeRO-0 fp16/bf16 optimizers; None for a plain (fp32) optimizer."""
    if not isinstance(optimizer_state, dict):
        return None
    if "fp32_groups" in optimizer_state:
        return _placed([t for group in optimizer_state["fp32_groups"] for t in group], model, source)
    if "fp32_groups_flat" in optimizer_state:
        import torch

        flat = torch.cat([t.reshape(-1) for t in optimizer_state["fp32_groups_flat"]])
        sizes = [p.numel() for _, p in _trainable(model)]
        if flat.numel() != sum(sizes):
            raise ExportError(f"{source}: the flat fp32 masters hold {flat.numel()} elements, the model's "
                              f"trainable parameters {sum(sizes)}; was it saved from this preset?")
        return _placed(list(flat.split(sizes)), model, source)
    return None


def _rank_files(tag_dir: Path, pattern: str) -> list[str]:
    files = glob.glob(str(tag_dir / pattern))
    return sorted(files, key=lambda f: int(re.search(r"pp_rank_(\d+)_", os.path.basename(f)).group(1)))


def _bf16_optimizer_masters(files: list[str], model, source: Path) -> dict:
    """fp32 masters of DeepSpeed's BF16_Optimizer: each rank's flat partition, its fragments placed by name."""
    import torch

    fragments: dict[str, list] = {}
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, where in mapping.items():
                fragments.setdefault(name, []).append(flat.narrow(0, where.start, where.numel))
    missing = [name for name, _ in _trainable(model) if name not in fragments]
    if missing:
        raise ExportError(f"{source}: no fp32 master for {', '.join(missing[:5])}; was it saved from this preset?")
    return _placed([torch.cat(fragments[name]) for name, _ in _trainable(model)], model, source)


def _exact_constants(state: dict, model) -> dict:
    """`state` in fp32, with each tensor no optimizer owns taken from the preset's fresh model where the
    checkpoint holds it rounded to 16 bits (a bf16 rotary table moves a phase by radians at frame 500)."""
    import torch

    trainable = {name for name, _ in _trainable(model)}
    fresh = model.state_dict()
    out = {}
    for key, value in state.items():
        exact = fresh.get(key)
        if (key not in trainable and exact is not None and value.dtype in (torch.float16, torch.bfloat16)
                and exact.dtype == torch.float32 and exact.shape == value.shape
                and torch.equal(exact.to(value.dtype), value)):
            out[key] = exact.detach().clone()
        else:
            out[key] = value.float() if value.is_floating_point() else value
    return out


def _fresh_model(ckpt_dir: Path, tag: str):
    from model import build_model

    if not (ckpt_dir / tag / MARKER).is_file():
        raise ExportError(f"{ckpt_dir / tag}: no {MARKER} (not a complete checkpoint of launcher/train.py)")
    return build_model(read_marker(ckpt_dir, tag)["preset"])


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """The fp32 weights of one complete checkpoint tag, whatever its ZeRO stage and precision: the
    optimizer's fp32 masters for trained tensors, the preset's exact values for its constants."""
    return _consolidate(Path(ckpt_dir), tag, _fresh_model(Path(ckpt_dir), tag))


def _consolidate(ckpt_dir: Path, tag: str, model) -> dict:
    import torch

    tag_dir = ckpt_dir / tag
    bf16_optimizer = _rank_files(tag_dir, _BF16_OPTIMIZER_FILES)
    # The ZeRO optimizers save bf16 runs under the same file names; they record their stage, which
    # zero_to_fp32 needs and DeepSpeed's BF16_Optimizer (not a ZeRO optimizer) does not write.
    if bf16_optimizer and "zero_stage" not in torch.load(
            bf16_optimizer[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]:
        state = _module(tag_dir)[0]
        state.update(_bf16_optimizer_masters(bf16_optimizer, model, tag_dir))
    elif glob.glob(str(tag_dir / "*optim_states.pt")):
        if "deepspeed" not in sys.modules:
            # Consolidation is CPU work: a process that has not chosen DeepSpeed's accelerator yet gets the CPU's.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        state, optimizer_state = _module(tag_dir)
        state.update(_zero0_masters(optimizer_state, model, tag_dir) or {})
    return _exact_constants(state, model)


def _module(tag_dir: Path) -> tuple[dict, Any]:
    """(module state dict, optimizer state) of a ZeRO 0–2 model-states file."""
    import torch

    files = sorted(glob.glob(str(tag_dir / "mp_rank_*_model_states.pt")))
    if not files:
        raise ExportError(f"{tag_dir}: no DeepSpeed model-states file found")
    model_states = torch.load(files[0], map_location="cpu", weights_only=False)
    return dict(model_states["module"]), model_states.get("optimizer")


def export_run(run_dir: Path, out: Path, tag: str | None = None):
    from model import export_reference_checkpoint

    ckpt_dir = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    tags = complete_tags(ckpt_dir)
    if not tags:
        raise ExportError(f"{run_dir}: no complete checkpoint (a folder stepNNNNNNNN holding COMPLETE.json)")
    if tag is None:
        tag = tags[-1]
    elif tag not in tags:
        raise ExportError(f"{run_dir}: no complete checkpoint {tag}; complete ones: {', '.join(tags)}")
    marker = read_marker(ckpt_dir, tag)
    model = _fresh_model(ckpt_dir, tag)
    state = _consolidate(ckpt_dir, tag, model)
    model.load_state_dict(state, strict=True)
    export_reference_checkpoint(model, out)
    return model, tag, marker
