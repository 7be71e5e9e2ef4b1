"""The GPU scripts, in their CPU mode and at their edges, so that a lent GPU's minutes measure rather than debug:
a missing or incomplete .whl/ stops them at once, the wheel check reads every Requires-Dist, a torch.compile that
cannot build is a skipped variant, and gpu_train_check stops each torchrun's whole process tree by the deadline
or on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, train_env

sys.path.insert(0, str(ROOT / "bench"))
import gpu_wheels  # noqa: E402


def _python_without_torch(tmp_path: Path) -> Path:
    """An interpreter as bare as the box's, less torch: this Python without site-packages, `packaging` (which
    the box has) on its path."""
    import packaging

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "packaging").symlink_to(Path(packaging.__file__).parent)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={lib} exec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), tag: str = "py3-none-any") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


@pytest.mark.parametrize("wheels", ["missing", "partial"])
def test_the_scripts_stop_at_once_when_the_wheels_cannot_supply_what_the_box_lacks(tmp_path, wheels) -> None:
    folder = tmp_path / "whl"
    if wheels == "partial":
        _wheel(folder, "hjson", "3.1.0")
    env = {**os.environ, "PYTHON": str(_python_without_torch(tmp_path)), "WHEELS": str(folder), "OUT": str(tmp_path / "out")}
    for script in ("bench/gpu_check.sh", "bench/gpu_train_check.sh"):
        proc = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "make gpu-wheels" in proc.stderr and 'carry=[".whl"]' in proc.stderr
        if wheels == "missing":
            assert f"{folder}/ does not exist" in proc.stderr
        else:
            assert "no wheel of deepspeed==0.19.8" in proc.stderr and "no wheel of hjson" not in proc.stderr
        assert "deepspeed 0" not in proc.stdout  # stopped before any import of the runs
        assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_the_wheel_check_reads_pins_tags_and_every_requires_dist(tmp_path) -> None:
    pins = tmp_path / "pins.txt"
    pins.write_text("# comment\nalpha==1.0\nbeta-pkg==2.0  # trailing\n")
    folder = tmp_path / "whl"
    _wheel(folder, "alpha", "1.0", ("beta-pkg>=2", "torch>=2.0", "gamma; python_version < '3.10'",
                                     "delta; extra == 'docs'"))
    _wheel(folder, "beta-pkg", "2.0", tag="cp312-cp312-manylinux_2_17_x86_64")
    assert gpu_wheels.check(folder, assume_box=True, pins_file=pins) == []

    _wheel(folder, "beta-pkg", "2.1")  # two versions of one package: pip would refuse the lot
    assert any("2 wheels of beta-pkg" in p for p in gpu_wheels.check(folder, assume_box=True, pins_file=pins))
    (folder / "beta_pkg-2.1-py3-none-any.whl").unlink()

    _wheel(folder, "alpha", "1.0", ("beta-pkg>=3", "epsilon"))  # replaces alpha's wheel
    problems = gpu_wheels.check(folder, assume_box=True, pins_file=pins)
    assert any("requires beta-pkg>=3; found 2.0 in" in p for p in problems)
    assert any("requires epsilon; found nothing of that name" in p for p in problems)

    (folder / "beta_pkg-2.0-cp312-cp312-manylinux_2_17_x86_64.whl").unlink()
    _wheel(folder, "beta-pkg", "2.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    problems = gpu_wheels.check(folder, assume_box=True, pins_file=pins)
    assert any("not for CPython 3.12" in p for p in problems)
    (folder / "alpha-1.0-py3-none-any.whl").unlink()
    assert any("no wheel of alpha==1.0" in p for p in gpu_wheels.check(folder, assume_box=True, pins_file=pins))


def test_the_pinned_set_is_complete_where_make_gpu_wheels_has_run() -> None:
    if not (ROOT / ".whl").is_dir():
        pytest.skip("no .whl/ here (make gpu-wheels downloads it)")
    assert gpu_wheels.check(ROOT / ".whl", assume_box=True) == []


def test_a_torch_compile_that_fails_is_a_skipped_variant(tmp_path, monkeypatch) -> None:
    import torch

    import gpu_check

    def broken(*_, **__):
        raise RuntimeError("inductor: cannot find Python.h\nmore")

    monkeypatch.setattr(torch, "compile", broken)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        rc = gpu_check.main(["--device", "cpu", "--preset", "tiny", "--batch", "1", "--seconds", "1", "--steps", "1",
                             "--warmup", "0", "--variants", "fp32,bf16_compile", "--zero_stages", "",
                             "--out", str(tmp_path / "g.json")])
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = json.loads((tmp_path / "g.json").read_text())
    assert rc == 0 and "s_per_batch" in result["variants"]["fp32"]
    assert result["variants"]["bf16_compile"] == {
        "skipped": "torch.compile failed: RuntimeError: inductor: cannot find Python.h"}


def test_compile_needs_python_headers_and_a_compiler(monkeypatch, tmp_path) -> None:
    import torch

    import gpu_check

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(gpu_check.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert gpu_check.compile_blocker(cuda) == f"no Python headers ({tmp_path}/Python.h missing)"
    (tmp_path / "Python.h").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert gpu_check.compile_blocker(cuda) == "no C compiler ($CC or gcc, clang, cc)"
    assert gpu_check.compile_blocker(cpu) == "no C++ compiler ($CXX or g++, clang++, c++)"
    compiler = tmp_path / "gcc"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    assert gpu_check.compile_blocker(cuda) is None
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert gpu_check.compile_blocker(cuda).startswith("no C compiler")


@pytest.mark.slow
def test_gpu_check_cpu_mode_within_its_budget(tmp_path) -> None:
    """The header's CPU mode (torch.compile left out: its first step alone takes a minute or more here)."""
    env = {**train_env(), "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--preset", "tiny", "--batch", "2",
                           "--seconds", "1", "--steps", "2", "--warmup", "1", "--variants", "fp32,tf32,bf16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["flops_per_step"] > 0
    assert all("s_per_batch" in result["variants"][v] for v in ("fp32", "tf32", "bf16"))
    zero = {(r["stage"], r["precision"]): r for r in result["zero"]}
    assert zero[(0, "bf16")]["skipped"].startswith("refused")
    assert all("s_per_batch" in zero[k] for k in zero if k != (0, "bf16")) and len(zero) == 8
    assert "gpu_check exit status 0 after" in proc.stdout


@pytest.mark.slow
def test_gpu_train_check_cpu_mode_runs_the_launcher_four_times(tmp_path) -> None:
    env = {**train_env(), "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "bench/gpu_train_check.sh", "--device", "cpu", "--preset", "tiny", "--seconds", "1",
                           "--steps", "8", "--workdir", str(tmp_path / "work"),
                           # bf16_compile's cold compile (~1 min here) is tests/test_train_compile.py's to cover
                           "--runs", "bf16,bf16_resume,bf16_zero3,bf16_nice19"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads((tmp_path / "gpu_train_check.json").read_text())["runs"]}
    assert list(runs) == ["bf16", "bf16_resume", "bf16_zero3", "bf16_nice19"]
    assert all(r["exit_code"] == 0 for r in runs.values()) and runs["bf16_resume"]["resume_continues"]
    device = json.loads((tmp_path / "work" / "bf16" / "device.json").read_text())
    assert device["cuda_settings"] == "not applied (cpu)"
    ds_config = json.loads((tmp_path / "work" / "bf16" / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 1 and ds_config["data_types"]["grad_accum_dtype"] == "fp32"


def _leftovers(marker: str) -> list[str]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                out.append(" ".join(p.info["cmdline"]))
        except psutil.Error:
            pass
    return out


@pytest.mark.slow
def test_each_run_gets_the_time_left_and_its_whole_tree_is_stopped(tmp_path) -> None:
    work = tmp_path / "deadline_work"
    cmd = [sys.executable, "bench/gpu_train_check.py", "--device", "cpu", "--preset", "tiny", "--seconds", "1",
           "--steps", "100000", "--budget_s", "32", "--min_run_s", "5", "--run_timeout_s", "1000",
           "--workdir", str(work), "--out", str(tmp_path / "t.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    runs = json.loads((tmp_path / "t.json").read_text())["runs"]
    assert proc.returncode == 1 and "failed: bf16" in proc.stdout
    assert runs[0]["exit_code"] == "timeout" and runs[0]["limit_s"] <= 32 - 15
    assert [r["name"] for r in runs] == ["bf16", "bf16_resume", "bf16_zero3", "bf16_nice19", "bf16_compile"]
    assert [r.get("skipped", "")[:11] for r in runs[1:]] == ["time budget"] * 4
    assert _leftovers(str(work)) == []


@pytest.mark.slow
def test_sigterm_stops_the_running_tree_and_keeps_the_results(tmp_path) -> None:
    import psutil

    work = tmp_path / "sigterm_work"
    cmd = [sys.executable, "bench/gpu_train_check.py", "--device", "cpu", "--preset", "tiny", "--seconds", "1",
           "--steps", "100000", "--workdir", str(work), "--out", str(tmp_path / "t.json")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def training() -> bool:
        try:
            return any("launcher/train.py" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            return False

    for _ in range(600):  # until torchrun's worker runs launcher/train.py
        time.sleep(0.2)
        if training():
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 124, out[-3000:]
    assert "SIGTERM" in json.loads((tmp_path / "t.json").read_text())["stopped"]
    assert _leftovers(str(work)) == []
