"""metrics.jsonl on a disk that fills up: training goes on, nothing is torn, the held records go out once space returns.

Found by the chaos storm of issue 21 with the small disk holding the whole run directory: rank 0 died with a
traceback from its first record after the disk filled, instead of training on until the next checkpoint save
stops the job cleanly (or space returns). The failures here are the kernel's: /dev/full (ENOSPC) and a file-size
limit (a write cut short at the byte, then EFBIG).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launcher.training.metrics import Metrics, RecordFile

ROOT = Path(__file__).resolve().parents[1]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # a torn line fails here


def test_a_full_disk_holds_the_records_and_writes_them_once_space_returns(tmp_path, capsys):
    metrics = Metrics(tmp_path, max_epoch=1, progress_bar=False)
    metrics.log({"kind": "train", "step": 1})
    metrics.jsonl.file = open("/dev/full", "ab", buffering=0)  # every write: ENOSPC
    for step in (2, 3, 4):
        metrics.log({"kind": "train", "step": step}, line=f"step {step}")
    err = capsys.readouterr().err
    assert err.count("a write failed (the disk or a quota is full)") == 1, err
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [1]
    metrics.jsonl.file = open(tmp_path / "metrics.jsonl", "ab", buffering=0)  # space is back
    metrics.log({"kind": "train", "step": 5})
    assert "writing again; 4 held records written" in capsys.readouterr().err
    metrics.close()
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_beyond_the_held_limit_records_are_counted_and_the_close_says_what_was_lost(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(RecordFile, "MAX_HELD", 3)
    metrics = Metrics(tmp_path, max_epoch=1, progress_bar=False)
    metrics.jsonl.file = open("/dev/full", "ab", buffering=0)
    for step in range(5):
        metrics.log({"kind": "train", "step": step})
    metrics.close()
    assert "5 records could not be written" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_failing_stops_tensorboard_not_training(tmp_path, capsys):
    class FailingWriter:
        def add_scalar(self, *args) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            raise OSError(28, "No space left on device")

    metrics = Metrics(tmp_path, max_epoch=1, progress_bar=False)
    metrics.tb = FailingWriter()
    metrics.log({"kind": "train", "step": 1, "loss": 0.5})
    metrics.log({"kind": "train", "step": 2, "loss": 0.4})
    metrics.close()
    assert capsys.readouterr().err.count("TensorBoard stops for the rest of this run") == 1
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [1, 2]


WRITER = """
import json, resource, signal, sys
from pathlib import Path
from launcher.training.metrics import Metrics
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
run_dir = Path(sys.argv[1])
metrics = Metrics(run_dir, max_epoch=1, progress_bar=False)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
for step in range(40):  # about 1.9 KB of records: the limit cuts one of them short
    metrics.log({"kind": "train", "step": step, "note": "x" * 20})
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
metrics.log({"kind": "train", "step": 40, "note": "x" * 20})
metrics.close()
"""


def test_a_write_cut_short_at_the_byte_is_completed_not_torn(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "a write failed" in proc.stderr and "writing again" in proc.stderr, proc.stderr
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == list(range(41))
