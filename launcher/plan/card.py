"""The plan card: a plan and its rendered DeepSpeed config, printed for a human with rich."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import IO, Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from launcher.plan.compiled import compile_text
from launcher.plan.ds_config import communication_dtype, grad_accum_dtype, precision, stage_named, zero_stage
from launcher.plan.memory import MemoryEstimate, MemoryEstimateError, estimate_for, fmt_bytes
from launcher.plan.rules import Plan, format_lr


def _seconds(s: float) -> str:
    text = f"{s:g} s"
    if s >= 3600:
        return f"{text} ({s / 3600:.3g} h)"
    if s >= 60:
        return f"{text} ({s / 60:.3g} min)"
    return text


def memory_rows(est: MemoryEstimate) -> Table:
    """The per-GPU memory estimate (launcher/plan/memory.py) as card rows."""
    rows = _grid()
    s = est.states
    shared = f" (N = {est.world_size})" if "/N" in s.params_formula + s.grads_formula + s.optimizer_formula else ""
    rows.add_row("memory per GPU", f"ZeRO {est.stage}, {est.precision}, Ψ = {est.num_params:,} ({est.preset})"
                                   f"{shared}")
    persist = (f" (Ψₚ = {est.persistent_params:,} in small tensors stay whole)" if est.persistent_params else "")
    rows.add_row("  parameters", f"{s.params_formula} = {fmt_bytes(s.params)}{persist}")
    rows.add_row("  gradients", f"{s.grads_formula} = {fmt_bytes(s.grads)}")
    master = not (est.stage == 0 and est.precision == "fp32")  # see launcher/plan/memory.py
    rows.add_row("  optimizer states", f"{s.optimizer_formula} = {fmt_bytes(s.optimizer)} (Adam moments"
                                       f"{' + fp32 master weights' if master else ''})")
    if est.stage:
        rows.add_row("  reduce buckets", f"{fmt_bytes(est.buffers)} (reduce_bucket_size × element size"
                                         f"{'; held for the run' if est.stage == 3 else '; during backward'})")
    if est.activations is None:
        rows.add_row("  activations", f"not measured for preset {est.preset}")
        rows.add_row("  total", f"{fmt_bytes(est.total_without_activations)} + activations")
    else:
        rows.add_row("  activations", f"{est.micro_batch} × {est.segment_seconds:g} s × "
                                      f"{fmt_bytes(est.activations_per_sample_second)}/sample-s "
                                      f"= {fmt_bytes(est.activations)} (measured)")
        rows.add_row("  total", f"{fmt_bytes(est.total)} (not counted: CUDA context, fragmentation, "
                                f"backward transients)")
    for note in est.notes:
        rows.add_row("  note", note)
    return rows


def accumulation_text(ds_config: Mapping[str, Any], ds_spec: str | None, accumulation_steps: int) -> str:
    """The dtypes gradients are summed across micro-batches and all-reduced in, and why (ds_configs/bf16.json)."""
    dtype, comm, model = grad_accum_dtype(ds_config), communication_dtype(ds_config), precision(ds_config)
    text = f"{dtype}, all-reduced in {comm}"
    if model == "fp32":
        return text
    stage = zero_stage(ds_config)
    if dtype == "fp32" and stage == 1 and model == "bf16":
        text += " (DeepSpeed's BF16 optimizer"
        if ds_spec and not stage_named(ds_spec):
            text += f"; ZeRO 1 derived: no preset names a stage, and ZeRO 0 cannot accumulate {model} in fp32"
        return text + ")"
    if dtype != "fp32":
        sums = f"{accumulation_steps} micro-batches summed in {dtype}" if accumulation_steps > 1 else "no accumulation"
        text += f" ({sums}{', loss-scaled' if dtype == 'fp16' else ''}; ds_configs/bf16.json accumulates in fp32)"
    return text


def _grid() -> Table:
    rows = Table.grid(padding=(0, 2))
    rows.add_column(style="cyan", no_wrap=True)
    rows.add_column()
    return rows


def _origin_rows(plan: Plan, nodes: str) -> Table:
    """Each number of the headline, the LR and the warmup, with where it came from: the command line, the recipe,
    the preset, a checkpoint, or derived from those."""
    origin = _grid()
    origin.add_row("micro-batch", f"{plan.micro_batch} — {plan.source('micro_batch')}")
    origin.add_row("accumulation", f"{plan.accumulation_steps} — {plan.source('accumulation_steps')}")
    origin.add_row("world", f"{plan.world_size} ({nodes}) — {plan.source('world_size')}")
    origin.add_row("global batch", f"{plan.global_batch} — {plan.source('global_batch')}")
    k = plan.lr_factor
    origin.add_row("learning rate", f"{format_lr(plan.peak_lr)} — {plan.source('peak_lr')}"
                                    + (f"; k = {k:.3g} × base_lr" if k != 1 else ""))
    if plan.warmup_steps:
        ramp = (f"{plan.warmup_samples} samples → {plan.warmup_steps} optimizer steps (ceil({plan.warmup_samples} / "
                f"{plan.global_batch})"
                + (f", {plan.warmup_samples / plan.dataset_size:.3g} epochs" if plan.dataset_size else "")
                + f"), LR {format_lr(plan.warmup_from_lr) if plan.warmup_from_lr else '0'} → "
                  f"{format_lr(plan.peak_lr)}")
    else:
        ramp = "none"
    origin.add_row("warmup", f"{ramp} — {plan.source('warmup_samples')}")
    return origin


def _engine_text(plan: Plan, ds_config: Mapping[str, Any]) -> str:
    clip = ds_config.get("gradient_clipping")
    engine = f"ZeRO {zero_stage(ds_config)}, {precision(ds_config)}"
    if clip:
        engine += f", clip {clip:g}"
    opt = ds_config.get("optimizer") or {}
    if opt:
        engine += f", {opt.get('type')} lr {format_lr(opt.get('params', {}).get('lr', plan.peak_lr))}"
    return engine


def _run_rows(plan: Plan, ds_spec: str | None, ds_config: Mapping[str, Any] | None, recipe: str | None,
              data_rows: Sequence[tuple[str, str]], compile_regions: str | None) -> Table:
    rows = _grid()
    rows.add_row("audio per update",
                 f"{plan.global_batch} × {plan.segment_seconds:g} s = {_seconds(plan.audio_seconds_per_update)}")
    if plan.steps_per_epoch is not None:
        dropped = plan.dataset_size - plan.steps_per_epoch * plan.global_batch
        rows.add_row("steps per epoch",
                     f"{plan.dataset_size} // {plan.global_batch} = {plan.steps_per_epoch} optimizer steps"
                     + (f" ({dropped} samples dropped per epoch)" if dropped else ""))
    else:
        rows.add_row("steps per epoch", "unknown (give --dataset_size)")
    for label, text in data_rows:
        rows.add_row(label, text)
    rows.add_row("per GPU", f"{plan.samples_per_gpu_per_update} samples per update "
                            f"(the reference's effec_batch_size)")
    if plan.resumed_from is not None:
        rows.add_row("resume", f"global batch {plan.global_batch} held from {plan.resumed_from}, with its LR and "
                               f"warmup; the accumulation is re-derived for this world")
    elif plan.accumulation_source.startswith("derived"):
        rows.add_row("hold", f"{plan.hold}: on another micro-batch or world the recipe's "
                             f"{'accumulation' if plan.hold == 'accumulation' else 'global batch'} is kept "
                             f"(recipe written for {plan.recipe_num_nodes}×{plan.recipe_gpus_per_node} GPUs)")
    if ds_config is not None:
        engine = _engine_text(plan, ds_config)
        rows.add_row("DeepSpeed", f"{ds_spec}: {engine}" if ds_spec else engine)
        rows.add_row("grad accumulation", accumulation_text(ds_config, ds_spec, plan.accumulation_steps))
    if compile_regions is not None:
        rows.add_row("compile", compile_text(compile_regions))
    if recipe:
        rows.add_row("recipe", recipe)
    for note in plan.notes:
        rows.add_row("note", note)
    return rows


def card(plan: Plan, ds_spec: str | None = None, ds_config: Mapping[str, Any] | None = None,
         recipe: str | None = None, memory: MemoryEstimate | None = None,
         data_rows: Sequence[tuple[str, str]] = (), compile_regions: str | None = None) -> Panel:
    """The card; `data_rows` are (label, text) rows on what is trained on, from whoever read the lists (the planner
    reads none); `compile_regions` is the recipe's train.compile (None: no row)."""
    nodes = f"{plan.num_nodes} node{'s' if plan.num_nodes > 1 else ''} × {plan.gpus_per_node} GPUs"
    head = Text(plan.headline, style="bold")
    legend = Text(f"per-GPU micro-batch × accumulation × world ({nodes}) = global batch", style="dim")
    parts = [head, legend, Text(""), _origin_rows(plan, nodes), Text(""),
             _run_rows(plan, ds_spec, ds_config, recipe, data_rows, compile_regions)]
    for warning in plan.warnings:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    if memory is not None:
        parts += [Text(""), memory_rows(memory)]
    return Panel(Group(*parts), title="MossFormer2 training plan", title_align="left", expand=False)


def print_card(plan: Plan, ds_spec: str | None = None, ds_config: Mapping[str, Any] | None = None,
               recipe: str | None = None, file: IO[str] | None = None, memory: MemoryEstimate | None = None,
               data_rows: Sequence[tuple[str, str]] = (), compile_regions: str | None = None) -> None:
    Console(file=file, highlight=False, soft_wrap=False).print(card(plan, ds_spec, ds_config, recipe, memory,
                                                                    data_rows, compile_regions))


def print_plan(plan: Plan, ds_config: dict[str, Any] | None = None, *, ds_spec: str | None = None,
               recipe: str | None = None, file: Any = None, model_preset: str | None = None,
               data_rows: Sequence[tuple[str, str]] = (), compile_regions: str | None = None) -> None:
    """The rich plan card on stdout (or `file`); with `model_preset`, its per-GPU memory estimate too."""
    memory = None
    if model_preset is not None and ds_config is not None:
        try:
            memory = estimate_for(plan, ds_config, model_preset)
        except MemoryEstimateError:
            memory = None  # a preset without a parameter count: the card shows the plan alone
    print_card(plan, ds_spec, ds_config, recipe=recipe, file=file, memory=memory, data_rows=data_rows,
               compile_regions=compile_regions)
