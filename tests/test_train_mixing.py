"""Dynamic mixing in the launcher: the recipe section, the card, the records, resume, and real training.

Three multi-rank runs of one setting (mixtures plus a quarter of pre-mixed pairs, fixed validation mixtures) show that
a step trains on the same mixtures at world sizes 2, 3 and 1, also across a kill -9 and a resume on another world:
every train record carries the step's flag counts and the level of its inputs and targets, summed over all ranks
(launcher/training/mixing.py MixTally) — a fingerprint of which mixtures the step used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, deepspeed_cmd, read_jsonl, run_deepspeed, train_env
from test_dry_run import flat

RECIPE = "recipes/demo_mixing_cpu.yaml"
LISTS = ("clean_train", "noise_train", "rir_train", "clean_valid", "noise_valid", "rir_valid")
KEYS = ("clean_lists", "noise_lists", "rir_lists", "valid_clean_lists", "valid_noise_lists", "valid_rir_lists")


def mixing_overrides(corpus: dict) -> list[str]:
    d = Path(corpus["dir"])
    return [f"mixing.{key}={d / name}.lst" for key, name in zip(KEYS, LISTS)]


def run_args(corpus: dict, run_dir: Path, *extra: str) -> list[str]:
    """Micro-batch 2 and a global batch of 12 (accumulation 6, 3 and 2 at world sizes 1, 2 and 3); 36 mixtures and
    12 pre-mixed pairs per epoch: 4 optimizer steps an epoch."""
    return ["--ds_config", "ds_configs/base.json", "--config", RECIPE, "--run_dir", str(run_dir),
            "--batch_size", "2", "--global_batch", "12", *mixing_overrides(corpus),
            f"data.train_list={corpus['train_list']}", "mixing.premixed_share=0.25", "mixing.samples_per_epoch=36",
            "data.num_workers=0", "train.progress_bar=false", "train.log_interval_steps=1", *extra]


def squash(text: str) -> str:
    """Without any whitespace: a long path may wrap anywhere in a card."""
    return "".join(text.split())


def absolute_list(src: Path, dst: Path, lines: slice = slice(None), extra: str = "") -> Path:
    """A copy of a list file elsewhere, its entries' relative paths made absolute (they resolve against the list's
    folder)."""
    entries = [line for line in src.read_text().splitlines() if line and not line.startswith("#")]
    dst.write_text("".join(f"{src.parent / line}\n" for line in entries[lines]) + extra)
    return dst


def dry_run(capsys, *argv: str) -> tuple[int, str, str]:
    from launcher.train import main

    rc = main(["--dry_run", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == kind]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-5000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def fingerprints(run_dir: Path) -> dict[int, dict]:
    """Per logged step: what its mixtures were (all ranks together)."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("mix_")} for r in records(run_dir, "train")}


def same_mixtures(a: dict, b: dict) -> bool:
    levels = ("mix_noisy_dbfs", "mix_clean_dbfs")  # float64 sums over ranks: only the order of addition differs
    return ({k: v for k, v in a.items() if k not in levels} == {k: v for k, v in b.items() if k not in levels}
            and all(abs(a[k] - b[k]) < 1e-9 for k in levels))


def valid_input_snr(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["si_snr_db"] - r["si_snr_improvement_db"] for r in records(run_dir, "valid")}


# The recipe section


@pytest.mark.parametrize("override, message", [
    ("mixing.snr_db=[0, 100]", "mixing.snr_db must be between -30 and 60, got (0.0, 100.0)"),
    ("mixing.short_noise=loop", "mixing.short_noise must be one of repeat, pad, got 'loop'"),
    ("mixing.premixed_share=1", "mixing.premixed_share must be in [0, 1), got 1.0"),
    ("mixing.noise_weights=[2, 0]", "mixing.noise_weights must be > 0, got (2.0, 0.0)"),
    ("mixing.noise_sources=[0, 2]", "mixing.noise_sources must be between 1 and 16, got (0, 2)"),
    ("mixing.snr_db=[15, 5]", "mixing.snr_db: [15.0, 5.0] has low above high; write [5.0, 15.0]"),
    ("mixing.target=early", "mixing.target: 'early' needs mixing.rir_lists"),
    ("mixing.noise_weights=[1, 1]", "mixing.noise_weights: 2 weight(s) for 1 noise list(s)"),
])
def test_bad_settings_name_the_key_the_value_and_the_layer(override, message) -> None:
    from launcher.config import ConfigError, load_config

    base = ["mixing.clean_lists=c.lst", "mixing.noise_lists=n.lst"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, override])
    text = str(e.value)
    assert text.startswith(f"command line {override!r}: ") and message in text, text


def test_a_key_the_run_would_not_use_is_refused_naming_the_recipe(tmp_path) -> None:
    from launcher.config import ConfigError, load_config

    recipe = ROOT / RECIPE
    share = tmp_path / "share.yaml"
    share.write_text(f"extends: {recipe}\nmixing:\n  premixed_share: 0.2\n")
    with pytest.raises(ConfigError) as e:
        load_config(share)
    assert str(e.value) == (f"{share}: mixing.premixed_share 0.2 asks for that share of pre-mixed pairs per epoch, but "
                            "data.train_list (the pairs) is not set: name it, or set mixing.premixed_share=0")
    cases = [
        (["data.train_list=x.lst"], "data.train_list x.lst would not be used: with mixing on, every training pair is "
                                    "mixed unless mixing.premixed_share > 0"),
        (["data.valid_list=v.lst"], "data.valid_list v.lst would not be used: validation mixes mixing.valid_clean_lists"),
        (["mixing.clean_lists=[]", "mixing.noise_lists=[]", "mixing.rir_lists=[]", "mixing.valid_clean_lists=[]",
          "mixing.valid_noise_lists=[]", "mixing.valid_rir_lists=[]", "mixing.samples_per_epoch=40"],
         "mixing.samples_per_epoch is 40 but mixing is off"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(recipe, overrides)
        assert message in str(e.value), str(e.value)
    # Evaluation during training scores data.valid_list's whole files while the validation loss mixes.
    cfg = load_config(recipe, ["data.valid_list=v.lst", "train.eval_interval_epochs=1"])
    assert cfg.data.valid_list == "v.lst" and cfg.mixing.valid_enabled


def test_the_recipe_ranges_are_the_mixing_settings_own() -> None:
    """Each interval of data/mixing_config.py LIMITS is the recipe's range: a value just outside is refused by both."""
    from data import DataError, MixingConfig
    from data.mixing_config import LIMITS
    from launcher.config import RANGES

    pairs = {"noise_sources", "source_level_db", "snr_db", "speech_level_dbfs"}
    for key, (low, high, low_open, high_open) in LIMITS.items():
        rule = RANGES["mixing"][key]
        for bound, is_open, step in ((low, low_open, -1), (high, high_open, 1)):
            if bound is None:
                continue
            inside = bound if not is_open else bound - step * 1e-3
            outside = bound + step * (1 if isinstance(bound, int) else 1e-3) if not is_open else bound
            assert rule.holds(inside) and not rule.holds(outside), (key, inside, outside)
            if key == "noise_weights":
                continue  # one weight per list: checked with a list below
            value = (min(outside, inside), max(outside, inside)) if key in pairs else outside
            with pytest.raises(DataError, match=f"mixing.{key}"):
                MixingConfig(clean_lists=["c"], noise_lists=["n"], **{key: value})
    with pytest.raises(DataError, match="mixing.noise_weights"):
        MixingConfig(clean_lists=["c"], noise_lists=["n"], noise_weights=[0.0])


# The card and the checks before any process group


def test_the_cards_say_what_is_trained_on(capsys, demo_corpus) -> None:
    from conftest import run_dry_run

    rc, out, _ = run_dry_run(capsys, "--ds_config", "ds_configs/bs4.json", "--config", RECIPE)
    assert rc == 0
    assert ("trained on dynamic: 1 clean × 1 noise list(s), SNR 0 to 15 dB, RIR on 50% of mixtures (dry target); "
            "launcher/train.py --dry_run reads the lists") in flat(out)
    rc, out, _ = dry_run(capsys, "--ds_config", "ds_configs/bs4.json", "--config", RECIPE, *mixing_overrides(demo_corpus))
    text = flat(out)
    assert rc == 0 and "steps per epoch 200 // 16 = 12 optimizer steps (8 samples dropped per epoch)" in text
    assert ("trained on dynamic: clean 0.14 h (200 files) × noise 0.03 h (25 files in 1 list(s)), SNR 0 to 15 dB, "
            "speech -25 dBFS, 1 noise source(s), RIR 50% of mixtures (16 responses, dry target); 200 mixtures per "
            "epoch") in text
    # A share of pre-mixed pairs: 0.2 / 0.8 × 200 mixtures = 50 pairs more per epoch.
    rc, out, _ = dry_run(capsys, "--ds_config", "ds_configs/bs4.json", "--config", RECIPE, *mixing_overrides(demo_corpus),
                         f"data.train_list={demo_corpus['train_list']}", "mixing.premixed_share=0.2")
    text = flat(out)
    assert rc == 0 and "steps per epoch 250 // 16 = 15 optimizer steps" in text
    assert ("200 mixtures per epoch + 50 pre-mixed pairs (20% of 250) drawn from 200 pairs / 0.14 h") in text
    rc, out, _ = dry_run(capsys, "--ds_config", "ds_configs/bs4.json", "--config", "recipes/demo_cpu.yaml",
                         f"data.train_list={demo_corpus['train_list']}")
    assert rc == 0 and squash(f"trained on pre-mixed 200 pairs / 0.14 h ({demo_corpus['train_list']})") in squash(flat(out))


def test_a_malformed_line_or_an_impossible_share_is_refused_before_any_process_group(capsys, demo_corpus, tmp_path) -> None:
    clean = tmp_path / "clean.lst"
    lines = (Path(demo_corpus["dir"]) / "clean_train.lst").read_text().splitlines()
    clean.write_text("\n".join(lines[:3] + ["a.wav b.wav c.wav"] + lines[3:]) + "\n")
    rc, out, err = dry_run(capsys, "--ds_config", "ds_configs/bs4.json", "--config", RECIPE,
                           *mixing_overrides(demo_corpus), f"mixing.clean_lists={clean}")
    assert rc == 2 and out == ""
    assert f'{clean}:4: "a.wav b.wav c.wav": expected \'path [duration]\', found 3 fields' in err, err
    # A share of pre-mixed pairs that the pair list cannot give without repeating pairs within an epoch.
    rc, out, err = dry_run(capsys, "--ds_config", "ds_configs/bs4.json", "--config", RECIPE,
                           *mixing_overrides(demo_corpus), f"data.train_list={demo_corpus['train_list']}",
                           "mixing.premixed_share=0.9")
    assert rc == 2 and out == ""
    assert ("mixing.premixed_share 0.9 with 200 mixtures per epoch asks for 1800 pre-mixed pairs per epoch, but "
            "data.train_list has 200; the largest share without repeating a pair is 0.5") in err, err


def test_a_missing_list_is_refused_before_any_process_group(demo_corpus, tmp_path) -> None:
    absent = tmp_path / "absent.lst"
    proc = subprocess.run([sys.executable, "launcher/train.py", "--ds_config", "ds_configs/bs4.json", "--config",
                           RECIPE, "--run_dir", str(tmp_path / "r"), *mixing_overrides(demo_corpus),
                           f"mixing.noise_lists={absent}"], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: no such list file: mixing.noise_lists {absent}"
    assert not (tmp_path / "r").exists()


def test_bad_audio_stops_every_rank_before_training_with_the_whole_report(demo_corpus, tmp_path) -> None:
    """Audio is opened when the run starts, as for pair lists: rank 0 reports every bad line, every rank stops."""
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "silent.wav", np.zeros(48000, np.float32), 48000)
    noise = absolute_list(Path(demo_corpus["dir"]) / "noise_train.lst", tmp_path / "noise.lst",
                          extra=f"{tmp_path / 'silent.wav'}\n")
    lines = len(noise.read_text().splitlines())
    run_dir = tmp_path / "bad"
    proc = run_deepspeed(*run_args(demo_corpus, run_dir, f"mixing.noise_lists={noise}", "train.max_steps=1"), nproc=1,
                         timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert f"{noise}:{lines}: {tmp_path / 'silent.wav'}: silent: RMS -inf dBFS (all zero) over the whole file" in out
    assert "mixing lists (train): bad data (rank 0 printed the report)" in out
    assert not records(run_dir, "train")


# The records and a resume's checks, without training


def test_a_checkpoint_of_other_data_is_refused_unless_allowed(tmp_path) -> None:
    from launcher.config import ConfigError, load_config
    from launcher.training.trained_on import TrainedOn, check_resume

    def checkpoint(state: dict) -> None:
        tag = tmp_path / "run" / "checkpoints" / "step00000002"
        tag.mkdir(parents=True, exist_ok=True)
        (tag / "COMPLETE.json").write_text(json.dumps({"state": state}))

    record = {"settings": {"snr_db": [0.0, 15.0]}, "lists": [], "digest": "abc"}
    premixed = load_config(None, [f"train.run_dir={tmp_path / 'run'}"])
    mixing = load_config(None, [f"train.run_dir={tmp_path / 'run'}", "mixing.clean_lists=c.lst",
                                "mixing.noise_lists=n.lst"])
    allowed = load_config(None, [f"train.run_dir={tmp_path / 'run'}", "mixing.allow_changed_lists=true"])
    checkpoint({"sampler": {}})  # a checkpoint of pre-mixed pairs
    check_resume(premixed, TrainedOn(None, (), None), "auto")  # pre-mixed on pre-mixed: nothing to compare
    with pytest.raises(ConfigError, match="the checkpoint trained on pre-mixed pairs only; this run mixes"):
        check_resume(mixing, TrainedOn(10, (), record), "auto")
    checkpoint({"sampler": {}, "mixing": record})
    with pytest.raises(ConfigError, match=r"the checkpoint trained with dynamic mixing \(record abc\); this run has no"):
        check_resume(premixed, TrainedOn(None, (), None), "auto")
    check_resume(allowed, TrainedOn(None, (), None), "auto")


def test_loading_a_checkpoint_compares_its_record_on_every_rank() -> None:
    from launcher.checkpoint.marker import ResumeRefused
    from launcher.training.metrics import NullMetrics
    from launcher.training.mixing import MixingRun

    class Log(NullMetrics):
        def __init__(self) -> None:
            self.records: list[dict] = []

        def log(self, record, line=None) -> None:
            self.records.append(record)

    def record(kept: str) -> dict:
        lists = [{"role": "noise", "list": "n.lst", "sha256": "s", "entries": 3, "kept_sha256": kept}]
        return {"settings": {"seed": 1}, "lists": lists, "digest": kept}

    # With data.skip_bad another file went bad since: only checking the lists (after the start) shows it.
    with pytest.raises(ResumeRefused, match=r"noise list 1 n.lst: other lines are skipped now") as e:
        MixingRun(record("new"), {}, False, Log()).load_state_dict(record("old"))
    assert e.value.exit_code == 2
    log = Log()
    MixingRun(record("new"), {}, True, log).load_state_dict(record("old"))
    assert [r["kind"] for r in log.records] == ["resume_mixing_changed"]
    assert log.records[0]["checkpoint_digest"] == "old" and log.records[0]["digest"] == "new"
    MixingRun(record("same"), {}, False, log).load_state_dict(record("same"))
    assert len(log.records) == 1


def test_the_tally_counts_flags_and_levels() -> None:
    import torch

    from data.mixing import PREMIXED, REVERBERANT, SILENT_CLEAN
    from launcher.training.mixing import MixTally

    tally = MixTally(torch.device("cpu"))
    noisy = torch.full((3, 100), 0.1)
    clean = torch.cat([torch.full((2, 100), 0.01), torch.zeros(1, 100)])
    flags = torch.tensor([REVERBERANT, REVERBERANT | SILENT_CLEAN, PREMIXED])
    sums = (tally.of(noisy, clean, flags) * 2).tolist()  # two micro-batches alike
    record = tally.record(sums)
    assert record["mix_reverberant"] == 4 and record["mix_silent_clean"] == 2 and record["mix_premixed"] == 2
    assert record["mix_clipped"] == 0 and record["mix_samples"] == 6
    assert record["mix_noisy_dbfs"] == pytest.approx(-20.0) and record["mix_clean_dbfs"] == pytest.approx(-41.76, abs=0.01)


# Real training


def _kill_after_a_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout_s: float = 400) -> None:
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            marker = run_dir / "checkpoints" / "step00000002" / "COMPLETE.json"
            steps = [r["step"] for r in records(run_dir, "train")] if (run_dir / "metrics.jsonl").exists() else []
            if marker.exists() and steps and max(steps) >= 3:
                return
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.2)
        raise AssertionError("no checkpoint at step 2 in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_mixtures_are_the_same_at_any_world_size_and_across_a_kill_and_resume(demo_corpus, tmp_path, capsys) -> None:
    two, three = tmp_path / "world2", tmp_path / "world3"
    # World 2, straight through 2 epochs of 4 steps, validating (fixed mixtures) at the end of each, a checkpoint
    # every 2 steps.
    proc = ok(run_deepspeed(*run_args(demo_corpus, two, "train.max_epoch=2", "train.save_interval_steps=2")))
    assert "36 mixtures per epoch + 12 pre-mixed pairs (25% of 48)" in flat(proc.stdout)
    plan = json.loads((two / "plan.json").read_text())
    assert (plan["steps_per_epoch"], plan["global_batch"], plan["accumulation_steps"]) == (4, 12, 3)
    a = fingerprints(two)
    assert sorted(a) == list(range(1, 9))
    assert all(f["mix_samples"] == 12 for f in a.values()) and sum(f["mix_premixed"] for f in a.values()) == 2 * 12
    assert sum(f["mix_reverberant"] for f in a.values()) > 0
    assert len({round(f["mix_noisy_dbfs"], 6) for f in a.values()}) == 8, "a fingerprint that tells steps apart"
    assert all(r["loss"] == r["loss"] for r in records(two, "train"))
    snr = valid_input_snr(two)
    assert sorted(snr) == [4, 8] and snr[4] == pytest.approx(snr[8], abs=1e-9), "the same validation mixtures every epoch"
    # The record: in the run directory, in metrics.jsonl and in every checkpoint.
    saved = json.loads((two / "mixing.json").read_text())
    logged = records(two, "mixing")[-1]
    marker = json.loads((two / "checkpoints" / "step00000008" / "COMPLETE.json").read_text())
    assert {k: logged[k] for k in ("settings", "lists", "digest")} == {k: saved[k] for k in ("settings", "lists", "digest")}
    assert marker["state"]["mixing"] == {k: saved[k] for k in ("settings", "lists", "digest")}
    roles = [r["role"] for r in saved["lists"]]
    assert roles == ["clean", "noise", "rir", "valid clean", "valid noise", "valid rir", "pre-mixed pairs"]

    # World 3, killed (-9) once a checkpoint exists, then resumed on 1 rank.
    killed = subprocess.Popen(deepspeed_cmd(*run_args(demo_corpus, three, "train.max_steps=100",
                                                      "train.save_interval_steps=2"), nproc=3),
                              cwd=ROOT, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    _kill_after_a_checkpoint(three, killed)
    b = fingerprints(three)
    resumed = ok(run_deepspeed(*run_args(demo_corpus, three, "train.max_epoch=2", "--resume", "auto"), nproc=1))
    assert "[resume]" in resumed.stdout and "world 3 → 1" in resumed.stdout
    c = {step: f for step, f in fingerprints(three).items()}  # the resumed run's records follow the killed run's
    for name, run in (("world 3", b), ("world 3 then 1", c)):
        wrong = [step for step, f in run.items() if not same_mixtures(a[step], f)]
        assert not wrong, f"{name}: other mixtures at steps {wrong}: {[(a[s], run[s]) for s in wrong]}"
    assert max(b) >= 3 and sorted(c) == list(range(1, 9))
    assert valid_input_snr(three)[8] == pytest.approx(snr[8], abs=1e-6)

    # Changed lists or settings: refused before any process group, unless mixing.allow_changed_lists.
    noise = absolute_list(Path(demo_corpus["dir"]) / "noise_train.lst", tmp_path / "noise.lst", slice(0, -1))
    changed = (*run_args(demo_corpus, two, "train.max_steps=9", f"mixing.noise_lists={noise}"), "--resume", "auto")
    rc, _, err = dry_run(capsys, *changed)
    assert rc == 2 and f"was trained on other data than this run would mix:\n  - noise list 1 {noise} (was " in err
    assert "its content changed (25 entries used then, 24 now)" in err and "mixing.allow_changed_lists=true" in err
    rc, _, err = dry_run(capsys, *run_args(demo_corpus, two, "mixing.snr_db=[5, 15]"), "--resume", "auto")
    assert rc == 2 and "setting snr_db: [0.0, 15.0] in the checkpoint, [5.0, 15.0] now" in err
    proc = ok(run_deepspeed(*changed, "mixing.allow_changed_lists=true", nproc=1))
    assert "[mixing] resuming on changed data (mixing.allow_changed_lists)" in proc.stdout
    change = records(two, "resume_mixing_changed")
    assert len(change) == 1 and change[0]["checkpoint_digest"] == saved["digest"]
    assert json.loads((two / "mixing.json").read_text())["digest"] == change[0]["digest"] != saved["digest"]
    assert records(two, "train")[-1]["step"] == 9
