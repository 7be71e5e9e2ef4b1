"""The wheels the GPU box lacks (bench/gpu_wheels.txt): fetch them into .whl/, and check a folder of them.

    python bench/gpu_wheels.py download .whl      # `make gpu-wheels`: pip download + DeepSpeed's wheel, then check
    python bench/gpu_wheels.py check .whl --assume-box   # here: requirements met by the folder or the box's list
    python3 bench/gpu_wheels.py check .whl        # on the box (bench/_gpu_env.sh): by the folder or what is installed

`check` fails (exit 1, one line per problem) unless every pin of gpu_wheels.txt has exactly one wheel of that
version for CPython 3.12 on manylinux x86_64, and every Requires-Dist of every wheel (markers evaluated for
that interpreter, no extras) is met by a wheel in the folder or by a package of the box. Only the standard
library and `packaging` (which the box has) are imported, so the check runs there before anything else.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PINS = Path(__file__).resolve().parent / "gpu_wheels.txt"
# The device tool's boxes (nvidia-h100-x1, nvidia-h200): Python 3.12.3 and the packages its image holds, as the
# workplace's machine notes list them (read 2026-11-17). Names only: a version there is not known here.
BOX_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
BOX = set(map(canonicalize_name, """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()))
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# DeepSpeed is published as a source archive only: its wheel is built here (pure Python, no ops, ~15 s).
SOURCE_ONLY = {"deepspeed"}


def pins(path: Path = PINS) -> dict[str, str]:
    """{canonical name: version} of gpu_wheels.txt."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def _fits_box(wheel: Path) -> bool:
    """A wheel that installs into CPython 3.12 on manylinux x86_64."""
    _, _, _, tags = parse_wheel_filename(wheel.name)
    for tag in tags:
        interpreter_ok = tag.interpreter in ("py3", "cp312") or (tag.abi == "abi3" and re.fullmatch(r"cp3\d+", tag.interpreter)
                                                               and int(tag.interpreter[3:]) <= 12)
        abi_ok = tag.abi in ("none", "cp312", "abi3")
        platform_ok = tag.platform == "any" or (tag.platform.startswith("manylinux") and tag.platform.endswith("x86_64"))
        if interpreter_ok and abi_ok and platform_ok:
            return True
    return False


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(z.read(meta).decode())
    reqs = [Requirement(r) for r in message.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(BOX_PYTHON)]


def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check(folder: Path, assume_box: bool = False, pins_file: Path = PINS) -> list[str]:
    """Problems with `folder` as the box's extra packages (empty: complete)."""
    pinned = pins(pins_file)
    if not folder.is_dir():
        return [f"{folder}/ does not exist: run `make gpu-wheels` in the repo root (a machine with pip and the "
                f"package registry), then carry it"]
    wheels: dict[str, list[tuple[str, Path]]] = {}
    for w in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(w.name)
        wheels.setdefault(canonicalize_name(name), []).append((str(version), w))
    problems = []
    for name, version in pinned.items():
        have = wheels.get(name, [])
        if not any(Version(v) == Version(version) for v, _ in have):
            problems.append(f"{folder}/: no wheel of {name}=={version} (have: {', '.join(w.name for _, w in have) or 'none'})")
    for name, have in wheels.items():
        if len(have) > 1:
            problems.append(f"{folder}/: {len(have)} wheels of {name} ({', '.join(w.name for _, w in have)}); pip "
                            f"refuses to install two versions: delete all but {pinned.get(name, 'one')}")
        for _, w in have:
            if not _fits_box(w):
                problems.append(f"{w}: not for CPython 3.12 on manylinux x86_64")
    for name, have in wheels.items():
        for _, w in have:
            for req in _requirements(w):
                dep = canonicalize_name(req.name)
                carried = [v for v, _ in wheels.get(dep, [])]
                installed = None if assume_box else _installed_version(dep)
                if any(req.specifier.contains(v, prereleases=True) for v in carried):
                    continue
                if installed is not None and req.specifier.contains(installed, prereleases=True):
                    continue
                if assume_box and dep in BOX and not carried:
                    continue
                have = [f"{v} in {folder}/" for v in carried] + ([f"{installed} installed"] if installed else [])
                if not have and dep in BOX:
                    have = [f"none installed in {sys.executable} (the box lists it: is this the box's Python?)"]
                problems.append(f"{w.name} requires {req}; found {', '.join(have) or 'nothing of that name'}: "
                                f"pin a wheel of it in {pins_file.name}")
    return problems


def download(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    wanted = pins()
    for w in folder.glob("*.whl"):  # stale versions would stop pip on the box
        name, version, _, _ = parse_wheel_filename(w.name)
        if wanted.get(canonicalize_name(name)) is None or Version(wanted[canonicalize_name(name)]) != version:
            print(f"removing {w.name} (not pinned in {PINS.name})")
            w.unlink()
    binary = [f"{n}=={v}" for n, v in wanted.items() if n not in SOURCE_ONLY]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *binary],
                   check=True)
    for name in SOURCE_ONLY & set(wanted):
        if not list(folder.glob(f"{name}-{wanted[name]}-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(folder), f"{name}=={wanted[name]}"], check=True)
    problems = check(folder, assume_box=True)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    size = sum(w.stat().st_size for w in folder.glob("*.whl"))
    if not problems:
        print(f"{folder}/: {len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB, complete for the box")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("download", "check"))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--assume-box", action="store_true",
                    help="check requirements against the box's package list, not this Python's installs")
    args = ap.parse_args(argv)
    if args.command == "download":
        return download(args.folder)
    problems = check(args.folder, args.assume_box)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
