"""Evaluation: the metrics (undefined ones become notes), exact batching, and `python -m launcher.evaluate` on
one process and on two ranks (equal files)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import BIN, ROOT, free_port, train_env

SR = 48000


def speechy(seconds: float, seed: int) -> np.ndarray:
    """Harmonic bursts with pauses: enough structure for PESQ's voice activity and STOI's frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = (np.sin(2 * np.pi * 2.5 * t) > -0.2).astype(float)
    x = voiced * envelope + 0.01 * rng.standard_normal(t.size)
    return (0.1 * x / np.abs(x).max()).astype(np.float32)


def test_si_sdr_is_le_roux_scale_invariant_sdr():
    from model.loss import si_snr
    from model.metrics import si_sdr

    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.standard_normal(SR))
    n = torch.from_numpy(rng.standard_normal(SR))
    s, n = s - s.mean(), n - n.mean()
    n = n - (n @ s) / (s @ s) * s  # zero-mean and orthogonal to s: alpha is exactly 3, the residual 0.5 n
    expected = 10 * math.log10(9 * float(s @ s) / (0.25 * float(n @ n)))
    assert si_sdr(3.0 * s + 0.5 * n, s).item() == pytest.approx(expected, abs=1e-9)
    # Scale of the estimate and an offset do not matter; the training's SI-SNR is the same quantity.
    est = s + 0.3 * n
    assert si_sdr(7.0 * est + 0.2, s).item() == pytest.approx(si_sdr(est, s).item(), abs=1e-9)
    batch = torch.stack([est, s + n]).float()
    ref = torch.stack([s, s]).float()
    assert torch.allclose(si_sdr(batch, ref).float(), si_snr(batch, ref), atol=1e-3)
    # Undefined: a reference without energy, and an estimate proportional to the reference (infinite).
    assert math.isnan(si_sdr(est, torch.zeros_like(s)).item())
    assert math.isnan(si_sdr(2 * s, s).item())


def test_undefined_metrics_are_reported_not_raised():
    from model.metrics import METRIC_NAMES, pair_metrics

    # 2.3 s: DNSMOS tiles a clip shorter than its 9.01 s window by doubling (2.3 → 9.2 s: one window); 2.0 s tiles
    # to 16 s and is scored in 7 windows, 7× the time.
    clean = speechy(2.3, 1)
    rng = np.random.default_rng(1)
    noisy = clean + 0.03 * rng.standard_normal(clean.size).astype(np.float32)
    enhanced = clean + 0.01 * rng.standard_normal(clean.size).astype(np.float32)

    values, notes = pair_metrics(enhanced, noisy, clean, SR)
    assert all(values[n] is not None and values[n + "_noisy"] is not None for n in METRIC_NAMES), values
    assert notes == ""
    assert values["pesq_wb"] > values["pesq_wb_noisy"] and values["si_sdr"] > values["si_sdr_noisy"]

    values, notes = pair_metrics(enhanced, noisy, np.zeros_like(clean), SR)  # silent clean
    for name in ("pesq_wb", "stoi", "estoi", "si_sdr"):
        assert values[name] is None and values[name + "_noisy"] is None
    assert values["dnsmos_ovrl"] is not None  # needs no reference
    assert "clean signal is silent" in notes and "pesq_wb" in notes

    short = int(0.2 * SR)  # under PESQ's 1/4 s
    values, notes = pair_metrics(enhanced[:short], noisy[:short], clean[:short], SR, groups=["pesq", "si_sdr"])
    assert values["pesq_wb"] is None and values["si_sdr"] is not None
    assert "pesq_wb, pesq_wb_noisy: PESQ: buffer needs to be at least 1/4 of a second long" in notes

    broken = noisy.copy()
    broken[100] = np.nan
    values, notes = pair_metrics(None, broken, clean, SR, enhanced_missing="not enhanced")
    assert all(v is None for v in values.values())
    assert "noisy signal has non-finite samples" in notes and "not enhanced" in notes


def test_batches_hold_one_key_and_change_nothing():
    from launcher.scoring.batches import batch_key, plan_batches
    from launcher.scoring.score import enhance_files
    from model import build_model, enhance

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    rng = np.random.default_rng(2)
    # Two pairs of one frame count (lengths 100 samples apart), one of another, one under a frame, and two
    # windowed files (over 20 s) of one window count.
    lengths = [SR + 10, SR + 110, SR + 2000, 1000, int(21.0 * SR), int(21.3 * SR)]
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    assert batch_key(lengths[0]) == batch_key(lengths[1]) != batch_key(lengths[2])
    assert batch_key(lengths[4]) == batch_key(lengths[5]) == ("windows", 7)
    batches = plan_batches(lengths, batch_size=16)
    assert sorted(p for b in batches for p in b) == list(range(len(lengths)))
    assert all(len({batch_key(lengths[p]) for p in b}) == 1 for b in batches)
    together = enhance_files(model, waves, batch_size=16, device="cpu")
    assert together[3] is None
    for k in (0, 1, 2, 4, 5):
        alone = enhance(model, torch.from_numpy(waves[k])).numpy()
        assert together[k].shape == alone.shape
        np.testing.assert_allclose(together[k], alone, rtol=0, atol=1e-6)
    # Windowed files: at most batch_size windows per batch, at least one file.
    windows = batch_key(lengths[4])[1]
    assert [len(b) for b in plan_batches(lengths[4:], batch_size=windows)] == [1, 1]
    assert [len(b) for b in plan_batches(lengths[4:], batch_size=2 * windows)] == [2]


def test_batches_are_shared_by_audio_length_and_the_same_on_every_rank():
    from launcher.scoring.batches import assign_batches, plan_batches

    rng = np.random.default_rng(3)
    samples = [int(rng.uniform(1, 8) * SR) for _ in range(300)]
    batches = plan_batches(samples, batch_size=4)
    shares = assign_batches(batches, samples, 3)
    assert sorted(b for share in shares for b in share) == list(range(len(batches)))
    load = [sum(len(batches[b]) * max(samples[p] for p in batches[b]) for b in share) for share in shares]
    assert max(load) - min(load) <= max(len(b) * max(samples[p] for p in b) for b in batches)
    assert assign_batches(batches, samples, 3) == shares


def test_enhanced_names_keep_apart_equal_names_in_different_folders(tmp_path):
    from launcher.scoring.audio import enhanced_paths

    out = enhanced_paths(["/data/a/noisy/x.wav", "/data/b/noisy/x.wav", "/data/a/noisy/y.wav"], str(tmp_path))
    assert len(set(out)) == 3
    assert out[0] == str(tmp_path / "a/noisy/x.wav") and out[1] == str(tmp_path / "b/noisy/x.wav")
    assert enhanced_paths(["/d/n/x.wav", "/d/n/y.wav"], "/o") == ["/o/x.wav", "/o/y.wav"]


def _corpus(tmp_path: Path, demo_corpus: dict) -> Path:
    """Six demo validation pairs plus the awkward ones: a silent clean, a file under one frame, a file over 20 s
    (windowed), and a pair whose noisy name repeats in another folder."""
    demo = Path(demo_corpus["dir"])
    lines = [f"{demo / n} {demo / c}" for n, c, *_ in
             (line.split() for line in Path(demo_corpus["valid_list"]).read_text().splitlines()
              if line.strip() and not line.startswith("#"))][:6]
    extra = tmp_path / "extra"
    (extra / "other").mkdir(parents=True)
    rng = np.random.default_rng(4)
    clean = speechy(1.5, 5)
    sf.write(extra / "silent_noisy.wav", clean + 0.05 * rng.standard_normal(clean.size).astype(np.float32), SR)
    sf.write(extra / "silent_clean.wav", np.zeros_like(clean), SR)
    sf.write(extra / "tiny_noisy.wav", 0.1 * rng.standard_normal(1000).astype(np.float32), SR)
    sf.write(extra / "tiny_clean.wav", 0.1 * rng.standard_normal(1000).astype(np.float32), SR)
    long_clean = speechy(21.5, 6)
    sf.write(extra / "long_clean.wav", long_clean, SR)
    sf.write(extra / "long_noisy.wav", long_clean + 0.03 * rng.standard_normal(long_clean.size).astype(np.float32), SR)
    first_noisy = Path(lines[0].split()[0])
    (extra / "other" / first_noisy.name).write_bytes(first_noisy.read_bytes())  # same name, another folder
    lines += [f"{extra}/silent_noisy.wav {extra}/silent_clean.wav", f"{extra}/tiny_noisy.wav {extra}/tiny_clean.wav",
              f"{extra}/long_noisy.wav {extra}/long_clean.wav",
              f"{extra}/other/{first_noisy.name} {lines[0].split()[1]}"]
    lst = tmp_path / "eval.lst"
    lst.write_text("\n".join(lines) + "\n")
    return lst


@pytest.mark.slow
def test_evaluate_on_two_ranks_equals_one_process(demo_corpus, tmp_path):
    from model import build_model, export_reference_checkpoint

    torch.manual_seed(1)
    export_reference_checkpoint(build_model("tiny"), tmp_path / "tiny.pt")
    lst = _corpus(tmp_path, demo_corpus)
    # DNSMOS left out (93 % of the metric time, BENCHMARKS §7; it needs no rank): the shares, the order and the notes
    # are what two ranks could get wrong.
    common = ["--checkpoint", str(tmp_path / "tiny.pt"), "--list", str(lst), "--batch_size", "3",
              "--metric_workers", "1", "--metrics", "pesq,stoi,si_sdr"]
    one = subprocess.run([sys.executable, "-m", "launcher.evaluate", *common, "--out", str(tmp_path / "one"),
                          "--enhanced_dir", str(tmp_path / "one_wav")],
                         cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                          "launcher/evaluate.py", *common, "--out", str(tmp_path / "two"),
                          "--enhanced_dir", str(tmp_path / "two_wav")],
                         cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "2 rank(s)" in two.stdout

    text_one = (tmp_path / "one" / "metrics.csv").read_text()
    assert text_one.replace("one_wav", "two_wav") == (tmp_path / "two" / "metrics.csv").read_text()
    summary_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary_one["metrics"] == summary_two["metrics"] and summary_two["world_size"] == 2

    rows = list(csv.DictReader(text_one.splitlines()))
    listed = [line.split()[0] for line in lst.read_text().splitlines()]
    assert [r["noisy"] for r in rows] == listed  # list order
    by_noisy = {r["noisy"]: r for r in rows}
    silent = by_noisy[listed[6]]
    assert silent["pesq_wb"] == silent["stoi_noisy"] == "" and "clean signal is silent" in silent["notes"]
    assert "dnsmos_ovrl" not in silent  # not asked for
    tiny = by_noisy[listed[7]]
    assert tiny["pesq_wb"] == tiny["enhanced"] == "" and "not enhanced" in tiny["notes"]
    assert all(r["si_sdr"] != "" and r["pesq_wb_noisy"] != "" for r in rows if r not in (silent, tiny))
    # Enhanced WAVs: equal names in different folders kept apart, the same bytes from one and two ranks.
    written = sorted(p.relative_to(tmp_path / "one_wav") for p in (tmp_path / "one_wav").rglob("*.wav"))
    assert len(written) == len(rows) - 1  # all but the one under a frame
    for rel in written:
        assert (tmp_path / "one_wav" / rel).read_bytes() == (tmp_path / "two_wav" / rel).read_bytes(), rel
    long_out, _ = sf.read(next((tmp_path / "one_wav").rglob("long_noisy.wav")))
    assert long_out.shape[0] == int(21.5 * SR)
    assert summary_one["metrics"]["pesq_wb"]["pairs"] == len(rows) - 2


def test_bad_inputs_are_refused_or_become_rows(demo_corpus, tmp_path, capsys):
    from launcher.evaluate import main
    from model import build_model, export_reference_checkpoint

    torch.manual_seed(1)
    model = build_model("tiny")
    export_reference_checkpoint(model, tmp_path / "tiny.pt")
    state = {k: v for k, v in model.state_dict().items() if k != "mossformer.conv1d_encoder.weight"}
    torch.save({"model": state}, tmp_path / "missing.pt")
    demo = Path(demo_corpus["dir"])
    lst = tmp_path / "bad.lst"
    lst.write_text(f"{demo}/valid/noisy/0000.wav {demo}/valid/clean/0000.wav\n"
                   f"{demo}/valid/noisy/nope.wav {demo}/valid/clean/0001.wav\n")
    base = ["--list", str(lst), "--out", str(tmp_path / "out"), "--metrics", "si_sdr", "--metric_workers", "0"]

    assert main(["--checkpoint", str(tmp_path / "missing.pt"), *base]) == 2
    err = capsys.readouterr().err
    assert "mossformer.conv1d_encoder.weight" in err and "missing" in err and not (tmp_path / "out").exists()

    assert main(["--checkpoint", str(tmp_path / "tiny.pt"), *base]) == 2
    assert "nope.wav" in capsys.readouterr().err

    assert main(["--checkpoint", str(tmp_path / "tiny.pt"), *base, "--skip_bad"]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 2 and rows[0]["si_sdr"] != "" and "pesq_wb" not in rows[0]
    assert rows[1]["si_sdr"] == "" and rows[1]["notes"].startswith("skipped:") and "nope.wav" in rows[1]["notes"]

    # Writing the enhanced files over the inputs is refused.
    assert main(["--checkpoint", str(tmp_path / "tiny.pt"), *base, "--skip_bad",
                 "--enhanced_dir", str(demo / "valid" / "noisy")]) == 2
    assert "would overwrite the input file" in capsys.readouterr().err


def test_a_file_that_cannot_be_read_becomes_a_note(demo_corpus, tmp_path):
    """Files vanish or break between validation and reading (network file systems): that pair's row says so."""
    from launcher.scoring.batches import Item
    from launcher.scoring.score import enhance_and_score
    from model import build_model

    demo = Path(demo_corpus["dir"])
    good = (str(demo / "valid/noisy/0000.wav"), str(demo / "valid/clean/0000.wav"))
    items = [Item(0, *good, SR * 2), Item(1, str(tmp_path / "gone.wav"), good[1], SR * 2),
             Item(2, good[0], str(tmp_path / "gone_clean.wav"), SR * 2)]
    rows = enhance_and_score(build_model("tiny"), items, [[0], [1], [2]], device="cpu", batch_size=2,
                             metric_workers=0, groups=("si_sdr",))
    rows = {r["row"]: r for r in rows}
    assert rows[0]["si_sdr_noisy"] is not None and rows[0]["notes"] == ""
    assert rows[1]["si_sdr"] is None and rows[1]["notes"].startswith("noisy file:") and "gone.wav" in rows[1]["notes"]
    assert rows[2]["si_sdr_noisy"] is None and "gone_clean.wav" in rows[2]["notes"]
