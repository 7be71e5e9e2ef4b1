"""The DeepSpeed engine: DeepSpeed's own verdict on the rendered config before any process group, the engine built
from the model (identical initial weights on every rank, init_from's weights confirmed after, `train.compile`'s
regions compiled in place), and the ranks' agreement on the parameters at the end.
"""

from __future__ import annotations

import copy
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from unittest import mock

import deepspeed
import deepspeed.runtime.config as ds_runtime_config
import torch
import torch.distributed as dist
from pydantic import ValidationError

from launcher.checkpoint.weights import InitPlan
from launcher.plan.ds_config import DsConfigError, setting_file
from launcher.training.init_from import confirm_after_initialize, load_before_initialize
from model import build_model, compute_features, mask_loss
from model.compile import compile_regions, compiled_step_functions, configure_inductor

# The pydantic models behind the blocks, to name a block in DeepSpeed's own errors.
_MODEL_BLOCKS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                 "DeepSpeedFP16Config": "fp16"}


def validate_with_deepspeed(config: Mapping[str, Any], world_size: int, source: str) -> None:
    """DeepSpeed's own verdict on a rendered config at `world_size`, before any process group exists.

    DeepSpeedConfig asks its communication module for the world size and, without a process group,
    falls back to 1; for the length of this call it is handed a stand-in that answers rank 0 of
    `world_size`, so its batch assertion runs at the real world. Its pydantic models then check every
    block (ZeRO, precision, ...). Raises DsConfigError with one line that names the key and the value.
    """
    world = types.SimpleNamespace(get_rank=lambda group=None: 0, get_world_size=lambda group=None: world_size)
    log = logging.getLogger("DeepSpeed")
    level = log.level
    log.setLevel(logging.WARNING)  # DeepSpeedConfig logs its world size at INFO on every rank
    try:
        with mock.patch.object(ds_runtime_config, "dist", world):
            ds = ds_runtime_config.DeepSpeedConfig(copy.deepcopy(dict(config)))
    except ValidationError as e:
        problems = [_pydantic_problem(e.title, err, config) for err in e.errors()]
        where = setting_file(source, problems[0][1])
        raise DsConfigError(f"{where}: DeepSpeed {deepspeed.__version__} refuses "
                            + "; ".join(text for text, _ in problems), rule="DeepSpeed config model") from None
    except (AssertionError, ValueError, TypeError, KeyError, ds_runtime_config.DeepSpeedConfigError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise DsConfigError(f"{source}: DeepSpeed {deepspeed.__version__} refuses the config at world size "
                            f"{world_size}: {text}", rule="DeepSpeed config model") from None
    finally:
        log.setLevel(level)
    name = ds.optimizer_name
    if name is not None and name not in ds_runtime_config.DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, name):
        raise DsConfigError(f"{source}: optimizer.type {config['optimizer']['type']!r} is neither a DeepSpeed "
                            f"optimizer ({', '.join(ds_runtime_config.DEEPSPEED_OPTIMIZERS)}) nor a torch.optim "
                            f"class", rule="DeepSpeed config model")


def _pydantic_problem(model: str, err: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """One pydantic error as `block.key = VALUE: message`, and the key's path; the block is found from the model,
    else from the key."""
    loc = tuple(str(part) for part in err.get("loc", ()))
    block = _MODEL_BLOCKS.get(model)
    if block is None:
        owners = [k for k, v in config.items() if isinstance(v, Mapping) and loc and loc[0] in v]
        block = owners[0] if len(owners) == 1 else model
    value = f" = {err['input']!r}" if err.get("type") != "missing" else " missing"
    return f"{'.'.join((block, *loc))}{value}: {err.get('msg', '')}", (block, *loc)


@dataclass(frozen=True)
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine
    input_dtype: Any  # torch dtype of the model's inputs (the precision the engine runs the module in)
    zero_stage: int
    # The training micro-batch's features (waveforms -> fbank) and loss (mask, noisy, clean), compiled with the
    # model's regions or eager; validation calls the eager ones.
    features: Callable = compute_features
    loss_fn: Callable = mask_loss


def step_functions(module, regions: str, device_type: str) -> tuple[Callable, Callable]:
    """Compile `regions` of the engine's module in place (model/compile.py: below DeepSpeed's forward hooks, plain
    parameter names, one graph per region, a graph break an error) and return the training micro-batch's features
    and loss functions, compiled alike; with "off", the eager ones. Compilation itself happens on the first call."""
    if regions == "off":
        return compute_features, mask_loss
    configure_inductor(device_type)
    compile_regions(module, regions)
    return compiled_step_functions()


def build_engine(preset: str, seed: int, ds_config: Mapping[str, Any], rank: int, init: InitPlan | None,
                 load_universal: bool, log, *, regions: str, device_type: str) -> Engine:
    """deepspeed.initialize on a fresh `preset` model (with init_from's weights, confirmed after), its `regions`
    compiled (train.compile); with `load_universal` the engine is configured to load a universal checkpoint (a
    resume on another world size)."""
    # Identical initial weights on every rank (ZeRO-3 partitions what each rank built), then
    # per-rank streams for dropout and dither.
    torch.manual_seed(seed)
    model = build_model(preset)
    load_before_initialize(model, init, log)
    torch.manual_seed(seed + 1000 * (rank + 1))
    config = dict(ds_config)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    input_dtype = (torch.bfloat16 if config.get("bf16", {}).get("enabled")
                   else torch.float16 if config.get("fp16", {}).get("enabled") else torch.float32)
    zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if zero_stage == 3:
        zero_partition_padding(engine.optimizer)
    confirm_after_initialize(engine, init, zero_stage, log)
    features, loss_fn = step_functions(engine.module, regions, device_type)
    return Engine(engine, input_dtype, zero_stage, features, loss_fn)


def zero_partition_padding(optimizer) -> None:
    """Zero the tail of the last rank's ZeRO-3 partitions, which DeepSpeed 0.19.8 leaves as uninitialised memory.

    ZeRO 3 splits each parameter into world-size pieces of ceil(numel / world) elements; the last rank's piece
    is padded and DeepSpeed allocates it with torch.empty (partition_parameters.py `_partition_param`) and copies
    only the real elements in. Never read for the model, the padding still reaches the checkpoints: seen as
    1.2e23 in the fp32 master weights, and as NaN once (CI), which made two checkpoints of the same weights
    compare unequal and two identical runs' checkpoints differ in bits. Zeroed once here, before any step or
    checkpoint load, it stays zero: its gradients are zero padding too.
    """
    for i, params in enumerate(optimizer.fp16_groups):
        # The rank's flat weights and fp32 master copy (one tensor in fp32; None or empty where swapped to NVMe).
        flats = [t for t in (optimizer.fp16_partitioned_groups_flat[i], optimizer.fp32_partitioned_groups_flat[i])
                 if t is not None and t.numel()]
        offset = 0
        for param, padding in zip(params, optimizer.groups_padding[i], strict=True):
            size = param.partition_numel()
            if padding:
                with torch.no_grad():
                    param.ds_tensor.narrow(0, size - padding, padding).zero_()
                    for flat in flats:
                        flat.narrow(0, offset + size - padding, padding).zero_()
            offset += size


def param_fingerprints(engine, zero_stage: int, device) -> list[list[float]]:
    """(sum, sum of squares) of every rank's full parameters: equal lists mean the ranks agree. A collective."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        local = torch.tensor([sum(p.detach().double().sum().item() for p in params),
                              sum(p.detach().double().pow(2).sum().item() for p in params)], dtype=torch.float64,
                             device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [g.cpu().tolist() for g in gathered]
