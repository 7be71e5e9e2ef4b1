"""What the benchmark scripts share: the description of the machine a result came from."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """CPU model, core count, OS and Python: recorded with every result, since results are per machine."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")
