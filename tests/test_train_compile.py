"""Training with `train.compile=blocks` for real: `deepspeed launcher/train.py`, 2 CPU ranks, the tiny preset.

Two runs in a module fixture, shared by the tests: one eager optimizer step, and a compiled run over two epochs and a
bit, validating every 5 steps and at each epoch end, with a NaN gradient injected at step 3, a checkpoint every step
and a watchdog step budget (10 s) that only the slow first step can hold a cold compile within. A third run resumes
the compiled one from its step 4 under a preemption notice sent to every process of the ranks (compile workers
included) while they compile. One in-process test shows that a graph break in the model's training path stops a
compiled step; a ZeRO 3 launch is refused before any process group.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT, deepspeed_cmd, read_jsonl, run_deepspeed, train_env

pytestmark = pytest.mark.slow

DEMO = "recipes/demo_cpu.yaml"
MAX_STEPS = 26  # 12 optimizer steps per epoch on the demo corpus: two whole epochs and two steps of the third
STEP_TIMEOUT_S = 10.0  # far above a tiny micro-batch, far below a cold compile (~45 s on 2 cores here)


def demo_args(corpus: dict, run_dir: Path, *extra: str, ds: str = "ds_configs/bs4.json") -> list[str]:
    return ["--ds_config", ds, "--config", DEMO, "--run_dir", str(run_dir),
            f"data.train_list={corpus['train_list']}", f"data.valid_list={corpus['valid_list']}",
            "train.progress_bar=false", "data.num_workers=0", "train.log_interval_steps=1",
            "train.save_interval_steps=1", "train.keep_last=40", *extra]


def compiled_args(corpus: dict, run_dir: Path) -> list[str]:
    return demo_args(corpus, run_dir, "train.compile=blocks", f"train.max_steps={MAX_STEPS}",
                     "train.valid_interval_steps=5", f"train.step_timeout_s={STEP_TIMEOUT_S:g}",
                     "train.slow_phase_timeout_s=900")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == kind]


def tag(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step{step:08d}"


def model_states(run_dir: Path, step: int) -> dict:
    return torch.load(tag(run_dir, step) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def weights_and_moments(run_dir: Path, step: int) -> tuple[dict, dict]:
    """The module's tensors and Adam's first moments by parameter name, from a ZeRO 0 checkpoint (torch's Adam keeps
    its state by the index of the parameter in the order the engine was given them: model.parameters())."""
    from model import build_model

    states = model_states(run_dir, step)
    names = [n for n, p in build_model("tiny").named_parameters() if p.requires_grad]
    state = states["optimizer"]["state"]
    return states["module"], {names[i]: s["exp_avg"] for i, s in state.items()}


@pytest.fixture(scope="module")
def runs(demo_corpus, tmp_path_factory) -> dict:
    """The eager step and the compiled run, with a cold inductor cache of their own."""
    root = tmp_path_factory.mktemp("compile")
    cache = root / "inductor_cache"
    eager = root / "eager"
    t0 = time.perf_counter()
    eager_proc = ok(run_deepspeed(*demo_args(demo_corpus, eager, "train.max_steps=1"), TORCHINDUCTOR_CACHE_DIR=str(cache)))
    compiled = root / "compiled"
    t1 = time.perf_counter()
    compiled_proc = ok(run_deepspeed(*compiled_args(demo_corpus, compiled), timeout=900,
                                     MF2_TEST_FAULT="nonfinite_grad@3@1", TORCHINDUCTOR_CACHE_DIR=str(cache)))
    t2 = time.perf_counter()
    print(f"eager 1 step: {t1 - t0:.0f} s; compiled {MAX_STEPS} steps: {t2 - t1:.0f} s")
    return {"root": root, "eager": eager, "compiled": compiled, "eager_proc": eager_proc,
            "compiled_proc": compiled_proc}


def test_compiled_run_validates_over_epochs_without_a_graph_break_or_a_recompile(runs):
    run_dir = runs["compiled"]
    [compiled] = records(run_dir, "compile")
    # features, loss, and one graph per block kind (the tiny preset's attention units share one, its FSMN blocks one).
    assert (compiled["step"], compiled["regions"], compiled["graphs"], compiled["graph_breaks"]) == (1, "blocks", 4, 0)
    valid = records(run_dir, "valid")
    assert [r["step"] for r in valid] == [5, 10, 12, 15, 20, 24, 25]
    assert all(r["loss"] == r["loss"] for r in valid)
    assert not records(run_dir, "recompile")
    end = records(run_dir, "end")[-1]
    assert (end["step"], end["exit_code"], end["compiled_graphs"]) == (MAX_STEPS, 0, 4)
    a, b = end["param_fingerprints"]
    assert a == b, "the ranks disagree"
    losses = [r["loss"] for r in records(run_dir, "train")]
    assert sum(losses[-4:]) < sum(losses[:4]), f"the loss did not fall: {losses}"


def test_the_cold_compile_ran_inside_the_watchdogs_slow_phase(runs):
    """A 10 s step budget would have ended the run during its first step, had that step not been a slow phase."""
    [compiled] = records(runs["compiled"], "compile")
    assert STEP_TIMEOUT_S < compiled["first_step_s"] < compiled["slow_phase_timeout_s"] == 900, compiled
    assert "[compile] train.compile=blocks: 4 graphs compiled in the first optimizer step" in \
        runs["compiled_proc"].stdout


def test_one_compiled_optimizer_step_agrees_with_eager(runs):
    """Same seed, data and random streams: step 1's loss, gradients (Adam's first moment is 0.1 × the gradient after
    one step) and updated weights agree to 1e-5. Weights are held to 1e-5 where |gradient| >= 1e-5: below that,
    Adam's first update lr · g / (|g| + 1e-8) turns a rounding difference of g into up to lr (tests/
    test_model_compile.py), so there both need only stay within lr of the same start."""
    eager, compiled = runs["eager"], runs["compiled"]
    [loss_e] = [r for r in records(eager, "train") if r["step"] == 1]
    [loss_c] = [r for r in records(compiled, "train") if r["step"] == 1]
    assert abs(loss_e["loss"] - loss_c["loss"]) <= 1e-5, (loss_e, loss_c)
    lr = loss_e["lr"]
    weights_e, moments_e = weights_and_moments(eager, 1)
    weights_c, moments_c = weights_and_moments(compiled, 1)
    assert moments_e.keys() == moments_c.keys() and weights_e.keys() == weights_c.keys()
    grad_diff = max(float((moments_c[n] - moments_e[n]).abs().max()) / 0.1 for n in moments_e)
    assert grad_diff <= 1e-5, grad_diff
    for name, moment in moments_e.items():
        steady = moment.abs() / 0.1 >= 1e-5
        diff = (weights_c[name] - weights_e[name]).abs()
        assert float((diff * steady).max()) <= 1e-5, name
        assert float(diff.max()) <= 2 * lr * (1 + 1e-3), name


def test_every_train_record_has_the_flop_rate_and_no_mfu_on_the_cpu(runs):
    """FLOPs per optimizer step counted once at the start (one rank's 4 crops of 1 s, 2 micro-batches); each train
    record, its TensorBoard scalar and its log line get the rate; the CPU has no peak, so no MFU."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from model.flops import training_flops

    for name in ("eager", "compiled"):
        run_dir = runs[name]
        [flops] = records(run_dir, "flops")
        assert flops["flops_per_step"] == 2 * flops["flops_per_micro_batch"] == 2 * training_flops("tiny", 4, 48000)
        assert (flops["device"], flops["precision"], flops["peak_kind"], flops["peak_tflops"]) == ("cpu", "fp32",
                                                                                                    None, None)
        train = records(run_dir, "train")
        assert train and all(r["tflops"] > 0 and "mfu" not in r for r in train)
        assert runs[f"{name}_proc"].stdout.count(" TFLOP/s") == len(train)
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        assert len(events.Scalars("train/tflops")) == len(train) and "train/mfu" not in events.Tags()["scalars"]


def test_the_nonfinite_skip_works_under_compile(runs):
    """The fault hook sits on the engine's module, above the compiled regions: it still fires, and step 3 is skipped
    on both ranks with weights and Adam's state untouched."""
    run_dir = runs["compiled"]
    [nonfinite] = records(run_dir, "nonfinite")
    assert (nonfinite["step"], nonfinite["reason"]) == (3, "non-finite gradients")
    assert [r["step"] for r in records(run_dir, "train") if r["lr"] == 0.0] == [3]
    before, skipped = model_states(run_dir, 2), model_states(run_dir, 3)
    for key, value in before["module"].items():
        assert torch.equal(value, skipped["module"][key]), key
    for index, state in before["optimizer"]["state"].items():
        assert all(torch.equal(state[k], skipped["optimizer"]["state"][index][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert records(run_dir, "end")[-1]["skipped_steps"] == 1


def test_checkpoints_exports_and_init_from_keep_plain_names(runs, tmp_path):
    from launcher.checkpoint.weights import expected_shapes, match, read_weights
    from model import build_model

    run_dir = runs["compiled"]
    expected = set(build_model("tiny").state_dict())
    assert set(model_states(run_dir, MAX_STEPS)["module"]) == expected
    proc = subprocess.run([sys.executable, "-m", "launcher.export", str(run_dir), str(tmp_path / "out.pt")], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert set(torch.load(tmp_path / "out.pt", weights_only=True)["model"]) == expected
    init = match(read_weights(run_dir), expected_shapes("tiny"), True, "tiny")  # what train.init_from=RUN_DIR does
    assert set(init.state) == expected and not init.missing and not init.unexpected


def rank_processes(launcher: psutil.Process) -> list[psutil.Process]:
    """The ranks (`--local_rank` in their command line) below a deepspeed launch, and every process below them."""
    found = []
    for p in launcher.children(recursive=True):
        try:
            if any(arg.startswith("--local_rank") for arg in p.cmdline()):
                found += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return found


def test_preempted_while_compiling_exits_75_and_a_resumed_compiled_run_equals_the_uninterrupted_one(demo_corpus,
                                                                                                    runs, tmp_path):
    """As srun delivers a preemption notice to every process of the step, SIGUSR1 reaches the ranks, their inductor
    compile workers and the compilers they run while they compile the first step after a resume (from the compiled
    run's step 4). The run finishes that step or the next, saves and exits 75; its checkpoint and losses equal the
    uninterrupted run's."""
    straight, resumed = runs["compiled"], tmp_path / "resumed"
    shutil.copytree(tag(straight, 4), tag(resumed, 4))
    # A cache of its own, cold as on the node a requeued job lands on: the ranks start inductor's compile workers.
    proc = subprocess.Popen(deepspeed_cmd(*compiled_args(demo_corpus, resumed), "--resume", "auto"), cwd=ROOT,
                            env=train_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache")), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        # After the resume message the ranks' only children are the compile workers.
        while not (any("[resume]" in line for line in lines) and len(rank_processes(psutil.Process(proc.pid))) > 2):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-50:])
            time.sleep(0.05)
        compiled_before_signal = bool(records(resumed, "compile"))
        # The notice again to every process below the ranks, the compilers they start meanwhile included, until the
        # step has compiled: a g++ that the notice killed used to fail the compile and the run (make test, issue 21).
        while proc.poll() is None and not records(resumed, "compile"):
            for p in rank_processes(psutil.Process(proc.pid)):
                try:
                    p.send_signal(signal.SIGUSR1)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.1)
        assert proc.wait(timeout=600) == 75, "".join(lines[-80:])
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert not compiled_before_signal, "the notice was meant to arrive while compiling"
    saved = records(resumed, "train")
    stop = saved[-1]["step"]
    assert 5 <= stop <= 7 and f"[preempt] checkpoint saved at step {stop}" in out, out[-4000:]
    assert records(resumed, "compile")[0]["step"] == 5
    want = {r["step"]: r["loss"] for r in records(straight, "train")}
    assert all(abs(r["loss"] - want[r["step"]]) <= 1e-6 * abs(want[r["step"]]) for r in saved), saved
    a, b = model_states(straight, stop), model_states(resumed, stop)
    for key, value in a["module"].items():
        assert float((value - b["module"][key]).abs().max()) <= 1e-6, key
    for index, state in a["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert float((state[k] - b["optimizer"]["state"][index][k]).abs().max()) <= 1e-6, (index, k)


def test_zero3_with_compile_is_refused_before_any_process_group(demo_corpus, tmp_path):
    proc = run_deepspeed(*demo_args(demo_corpus, tmp_path / "z3", "train.compile=blocks",
                                    ds="ds_configs/bs4.json+ds_configs/zero3.json"), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Initializing TorchBackend" not in out
    assert "error: train.compile=blocks (command line 'train.compile=blocks') with ZeRO stage 3" in out
    assert "https://github.com/pytorch/pytorch/issues/115484" in out


def test_a_graph_break_in_the_training_path_stops_a_compiled_step(monkeypatch):
    """What the compiled runs above would meet if a change to the model broke its graph in training only: the step
    stops with dynamo's error (fullgraph), while eager validation of the same model still runs."""
    from launcher.training.engine import step_functions
    from model import build_model, compute_features
    from model.compile import eager

    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "fallback_random", torch._inductor.config.fallback_random)
    torch.manual_seed(0)
    model = build_model("tiny").train()
    block = model.mossformer.mdl.intra_mdl.mossformerM.fsmn[0]
    forward = block.forward

    def breaking(*args, **kwargs):
        if block.training:
            torch._dynamo.graph_break()  # e.g. a host read, a print, an unsupported call added in training mode
        return forward(*args, **kwargs)

    monkeypatch.setattr(block, "forward", breaking)
    features, loss_fn = step_functions(model, "blocks", "cpu")
    noisy = torch.randn(2, 48000) * 0.1
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        loss_fn(model(features(noisy, dither=1.0)), noisy, noisy * 0.5).backward()
    model.eval()
    with torch.no_grad(), eager():
        assert torch.isfinite(model(compute_features(noisy, dither=0.0))).all()
    torch._dynamo.reset()
