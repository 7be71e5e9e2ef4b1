"""Fine-tuning: `train.init_from` reads every accepted source, refuses what does not fit, really lands in the
engine (ZeRO 0 and 3, fp32 masters with bf16), yields to a resume; evaluation during training is logged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_jsonl, run_deepspeed, train_env

DEMO = "recipes/demo_cpu.yaml"


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict:
    """A 'released' tiny model in the formats users hold it in: ClearerVoice's {'model': ...} with DDP's
    `module.` prefix, a bare state dict, and our export."""
    from launcher.checkpoint.weights import state_digest
    from model import build_model, export_reference_checkpoint

    out = tmp_path_factory.mktemp("released")
    torch.manual_seed(12345)  # not the recipe's seed: a fresh build cannot pass for the file
    model = build_model("tiny")
    state = model.state_dict()
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, out / "clearervoice.pt")
    torch.save(state, out / "bare.pt")
    export_reference_checkpoint(model, out / "export.pt")
    return {"dir": out, "state": state, "digest": state_digest(state)}


def small_lists(demo_corpus: dict, tmp_path: Path, train_pairs: int = 32) -> dict:
    """The first `train_pairs` demo training pairs (two optimizer steps of 16 per epoch) and the validation list."""
    demo = Path(demo_corpus["dir"])
    lines = [f"{demo / n} {demo / c}" for n, c, *_ in
             (line.split() for line in Path(demo_corpus["train_list"]).read_text().splitlines()
              if line.strip() and not line.startswith("#"))][:train_pairs]
    (tmp_path / "train32.lst").write_text("\n".join(lines) + "\n")
    return {"train_list": str(tmp_path / "train32.lst"), "valid_list": demo_corpus["valid_list"]}


def args(lists: dict, run_dir: Path, *extra: str, ds: str = "ds_configs/bs4.json") -> list[str]:
    return ["--ds_config", ds, "--config", DEMO, "--run_dir", str(run_dir), f"data.train_list={lists['train_list']}",
            f"data.valid_list={lists['valid_list']}", "train.progress_bar=false", "data.num_workers=0", *extra]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == kind]


# ---- sources and refusals, in process ----------------------------------------------------------------------
def test_every_source_format_reads_to_the_same_weights(released):
    from launcher.checkpoint.weights import read_weights, state_digest

    for name, kind, prefixed in (("clearervoice.pt", "ClearerVoice-format checkpoint", True),
                                 ("bare.pt", "ClearerVoice-format checkpoint", False),
                                 ("export.pt", "launcher.export file", False)):
        weights = read_weights(released["dir"] / name)
        assert state_digest(weights.state) == released["digest"], name
        assert (weights.kind, weights.prefix_removed) == (kind, prefixed), name
    # ClearerVoice's checkpoint folder, as its download leaves it: a pointer file names the checkpoint.
    folder = released["dir"] / "MossFormer2_SE_48K"
    folder.mkdir(exist_ok=True)
    (folder / "last_best_checkpoint.pt").write_bytes((released["dir"] / "clearervoice.pt").read_bytes())
    (folder / "last_best_checkpoint").write_text("last_best_checkpoint.pt\n")
    weights = read_weights(folder)
    assert state_digest(weights.state) == released["digest"] and weights.source.endswith("last_best_checkpoint.pt")


def test_what_does_not_fit_is_refused_with_the_reason(released, tmp_path):
    from launcher.checkpoint.weights import InitError, expected_shapes, match, read_weights

    state = dict(released["state"])
    dropped = "mossformer.conv1d_encoder.weight"
    del state[dropped]
    state["mossformer.extra_head.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "partial.pt")
    weights = read_weights(tmp_path / "partial.pt")
    with pytest.raises(InitError, match=f"1 of the 'tiny' model's {len(expected_shapes('tiny'))} tensors are "
                                        f"missing from the file: {dropped}; pass train.init_strict=false"):
        match(weights, expected_shapes("tiny"), True, "tiny")
    plan = match(weights, expected_shapes("tiny"), False, "tiny")
    assert plan.missing == [dropped] and plan.unexpected == ["mossformer.extra_head.weight"]
    assert f"1 missing, left at their fresh initialisation: {dropped}" in plan.summary
    assert "1 unexpected, ignored: mossformer.extra_head.weight" in plan.summary

    # A model of another size: every shape differs, and the message says which preset the file holds.
    with pytest.raises(InitError, match=r"shape mismatch.*the file holds a 'tiny' model: set model.preset=tiny"):
        match(read_weights(released["dir"] / "bare.pt"), expected_shapes("small"), True, "small")
    with pytest.raises(InitError, match="no such file or directory"):
        read_weights(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InitError, match="not a loadable PyTorch checkpoint"):
        read_weights(tmp_path / "garbage.pt")
    with pytest.raises(InitError, match="a folder without a checkpoint"):
        read_weights(tmp_path)
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "optim.pt")
    with pytest.raises(InitError, match="no weights found"):
        read_weights(tmp_path / "optim.pt")


def test_a_run_directory_gives_its_best_checkpoint(tmp_path, monkeypatch):
    """A run's best checkpoint (recorded in its newest marker) wins over its newest; without one, the newest."""
    import launcher.checkpoint.weights
    from launcher.checkpoint.weights import read_weights

    ckpt = tmp_path / "run" / "checkpoints"
    for step, best in ((4, None), (8, "step00000004"), (12, "step00000004")):
        tag = ckpt / f"step{step:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE.json").write_text(json.dumps({"step": step, "zero_stage": 3, "preset": "tiny",
                                                       "state": {"best_tag": best}}))
    seen = []
    monkeypatch.setattr(launcher.checkpoint.weights, "consolidated_state_dict",
                        lambda d, tag: seen.append((d, tag)) or {"w": torch.zeros(1)})
    weights = read_weights(tmp_path / "run")
    assert seen[-1] == (ckpt, "step00000004") and weights.preset == "tiny" and "best checkpoint" in weights.source
    read_weights(ckpt / "step00000012")  # one tag, named directly
    assert seen[-1] == (ckpt, "step00000012")
    (ckpt / "step00000004" / "COMPLETE.json").unlink()  # the best is gone: the newest complete one
    weights = read_weights(ckpt)
    assert seen[-1] == (ckpt, "step00000012") and "newest complete checkpoint" in weights.source


def test_resume_wins_over_init_from(released, tmp_path):
    from launcher.config import load_config
    from launcher.checkpoint.weights import prepare_init

    run_dir = tmp_path / "run"
    cfg = load_config(DEMO, [f"train.run_dir={run_dir}", f"train.init_from={released['dir'] / 'clearervoice.pt'}"])
    assert prepare_init(cfg, None).state and prepare_init(cfg, "auto").state  # nothing to resume yet
    tag = run_dir / "checkpoints" / "step00000007"
    tag.mkdir(parents=True)
    (tag / "COMPLETE.json").write_text("{}")
    plan = prepare_init(cfg, "auto")
    assert not plan.state and f"resuming from {tag}" in plan.skipped and "is ignored" in plan.skipped
    assert prepare_init(load_config(DEMO, [f"train.run_dir={run_dir}"]), "auto") is None


# ---- real 2-rank runs, tiny preset -------------------------------------------------------------------------
@pytest.mark.slow
def test_init_at_zero0_from_a_ddp_prefixed_file_then_resume_wins(demo_corpus, released, tmp_path):
    lists = small_lists(demo_corpus, tmp_path)
    run_dir = tmp_path / "ft0"
    init = f"train.init_from={released['dir'] / 'clearervoice.pt'}"
    ds = "ds_configs/bs4.json+ds_configs/zero0.json"
    proc = ok(run_deepspeed(*args(lists, run_dir, init, "train.max_steps=2", "data.valid_list=none", ds=ds)))
    assert "'module.' prefix removed" in proc.stdout and "93 of 93 tensors" in proc.stdout
    (record,) = records(run_dir, "init")
    # What the engine holds after deepspeed.initialize is the file, tensor for tensor.
    assert record["sha256"] == released["digest"] and record["tensors"] == 93 and record["zero_stage"] == 0
    assert json.loads((run_dir / "plan.json").read_text())["peak_lr"] == 2e-3  # the recipe's LR, untouched

    # A requeued fine-tune resumes instead of starting over from the released weights.
    proc = ok(run_deepspeed(*args(lists, run_dir, init, "train.max_steps=3", "data.valid_list=none", "--resume", "auto",
                                  ds=ds)))
    assert "[init_from] resuming from" in proc.stdout and "is ignored" in proc.stdout
    assert "[resume]" in proc.stdout and "step 2" in proc.stdout
    assert len(records(run_dir, "init")) == 1 and records(run_dir, "end")[-1]["step"] == 3

    # The run directory itself is a source (for the next fine-tune, or launcher.evaluate): its newest checkpoint.
    from launcher.checkpoint.export import export_run
    from launcher.checkpoint.weights import read_weights, state_digest

    weights = read_weights(run_dir)
    export_run(run_dir, tmp_path / "exported.pt")
    assert weights.preset == "tiny" and "step00000003 (newest complete checkpoint" in weights.source
    assert state_digest(weights.state) == state_digest(torch.load(tmp_path / "exported.pt")["model"])


@pytest.mark.slow
def test_init_at_zero3_reaches_the_partitions_and_evaluation_runs_each_epoch(demo_corpus, released, tmp_path):
    lists = small_lists(demo_corpus, tmp_path)
    run_dir = tmp_path / "ft3"
    # 3 evaluation pairs over 2 ranks: shares of different sizes at ZeRO-3 must not hang.
    ok(run_deepspeed(*args(lists, run_dir, f"train.init_from={released['dir'] / 'bare.pt'}", "train.max_epoch=1",
                           "train.eval_interval_epochs=1", "train.eval_max_pairs=3", "train.eval_metric_workers=1",
                           ds="ds_configs/bs4.json+ds_configs/zero3.json")))
    (record,) = records(run_dir, "init")
    assert record["sha256"] == released["digest"] and record["zero_stage"] == 3
    (evaluation,) = records(run_dir, "eval")
    assert evaluation["pairs"] == 3 and evaluation["seconds"] > 0 and evaluation["step"] == 2
    for name in ("pesq_wb", "stoi", "estoi", "si_sdr", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"):
        assert isinstance(evaluation[name], float) and isinstance(evaluation[f"{name}_noisy"], float), name
        assert evaluation[f"{name}_improvement"] == pytest.approx(evaluation[name] - evaluation[f"{name}_noisy"],
                                                                  abs=1e-5)
    assert 1.0 <= evaluation["pesq_wb_noisy"] <= 4.7 and 0 <= evaluation["stoi_noisy"] <= 1
    proc = subprocess.run([sys.executable, "-m", "launcher.report", str(run_dir), "--out", str(tmp_path / "r.png")],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "r.png").stat().st_size > 10_000, proc.stderr


@pytest.mark.slow
def test_bf16_fp32_masters_start_from_the_file(demo_corpus, released, tmp_path):
    lists = small_lists(demo_corpus, tmp_path)
    run_dir = tmp_path / "bf16"
    proc = ok(run_deepspeed(*args(lists, run_dir, f"train.init_from={released['dir'] / 'export.pt'}",
                                  "train.max_steps=1", "data.valid_list=none",
                                  ds="ds_configs/bs4.json+ds_configs/zero3.json+ds_configs/bf16.json")))
    (record,) = records(run_dir, "init")
    # DeepSpeed builds the fp32 masters from the bf16 module; they were set from the file and read back equal.
    assert record["fp32_masters_from_file"] is True and "fp32 master weights set from the file" in proc.stdout


@pytest.mark.slow
def test_a_missing_key_is_refused_before_any_process_group(demo_corpus, released, tmp_path):
    state = {k: v for k, v in released["state"].items() if k != "mossformer.conv1d_encoder.weight"}
    torch.save({"model": state}, tmp_path / "partial.pt")
    lists = small_lists(demo_corpus, tmp_path)
    proc = run_deepspeed(*args(lists, tmp_path / "r", f"train.init_from={tmp_path / 'partial.pt'}"), timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "are missing from the file: mossformer.conv1d_encoder.weight" in out and "init_strict=false" in out
    assert "Initializing TorchBackend" not in out and not (tmp_path / "r" / "checkpoints").exists()
