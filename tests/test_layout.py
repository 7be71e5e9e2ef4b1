"""The layout keeps its promises, checked by parsing the code (every import at any depth of a file counts).

- launcher/ has no import cycle between its modules, and its packages import each other one way only;
- nothing in launcher/ imports an entry point (what users run);
- the planner and the config import neither torch nor deepspeed, and import without them;
- test-only fault injection is loaded only when MF2_TEST_FAULT is set;
- model/ and data/ import nothing of launcher/ or deepspeed;
- no function in launcher/ is longer than a screen.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

LAUNCHER = ROOT / "launcher"
ENTRY_POINTS = {"launcher.train", "launcher.evaluate", "launcher.export", "launcher.report", "launcher.hostfile",
                "launcher.plan.__main__"}
# The packages from the bottom up: each may import only the ones before it (and the standard library, model, data).
LAYERS = ("launcher.testing", "launcher.config", "launcher.checkpoint", "launcher.plan", "launcher.dist",
          "launcher.scoring", "launcher.training")
TORCH_FREE = ("launcher.config", "launcher.plan", "launcher.checkpoint.marker", "launcher.checkpoint.integrity")
MAX_FUNCTION_LINES = 62


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(LAUNCHER.rglob("*.py"))}


def imports(path: Path, tree: ast.AST | None = None) -> list[tuple[str, ast.AST]]:
    """Every module a file imports, at any depth (function bodies included), with the node that imports it;
    `importlib.import_module("...")` with a constant name counts too."""
    tree = tree or ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found += [(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base, node)
                      for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node))
    return found


def launcher_graph() -> dict[str, set[str]]:
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _ in imports(path):
            while target and target not in MODULES and target.startswith("launcher"):
                target = target.rpartition(".")[0]  # `import launcher.a.b` names a module; a name inside one
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_of(module: str) -> str:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), module)


def test_the_import_graph_is_read_from_every_file() -> None:
    graph = launcher_graph()
    # Sanity: function-level and lazy imports are seen (these edges exist only inside functions).
    assert "launcher.training.setup" in graph["launcher.training.launch"]
    assert "launcher.config.load" in graph["launcher.config"]
    assert "launcher.testing.faults" in graph["launcher.checkpoint.store"]


def test_no_import_cycle_in_launcher() -> None:
    cycle = find_cycle(launcher_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_packages_import_one_way() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    wrong = []
    for module, targets in launcher_graph().items():
        if module in ENTRY_POINTS or module == "launcher":
            continue
        for target in targets:
            src, dst = package_of(module), package_of(target)
            if src != dst and rank[dst] > rank[src]:
                wrong.append(f"{module} → {target} ({src} sits below {dst})")
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_an_entry_point() -> None:
    graph = launcher_graph()
    offenders = [f"{m} → {t}" for m, targets in graph.items() for t in targets if t in ENTRY_POINTS]
    assert not offenders, offenders
    top = {name for name in MODULES if name.count(".") == 1}
    assert top == ENTRY_POINTS - {"launcher.plan.__main__"} | {"launcher.plan", "launcher.config", "launcher.dist",
                                                                "launcher.checkpoint", "launcher.scoring",
                                                                "launcher.training", "launcher.testing"}, \
        "the top of launcher/ holds entry points and packages only"


def test_the_planner_and_the_config_import_no_torch() -> None:
    heavy = []
    for module, path in MODULES.items():
        if any(module == t or module.startswith(t + ".") for t in TORCH_FREE):
            heavy += [f"{module}: {name}" for name, _ in imports(path)
                      if name.split(".")[0] in ("torch", "deepspeed", "torchaudio", "numpy")]
    assert not heavy, heavy
    names = sorted(m for m in MODULES if any(m == t or m.startswith(t + ".") for t in TORCH_FREE)
                   and not m.endswith("__main__"))
    # With torch and deepspeed unimportable, every one of them imports.
    code = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'deepspeed', 'numpy'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            f"for m in {names!r}:\n    __import__(m)\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_fault_injection_is_loaded_only_when_its_variable_is_set() -> None:
    for module, path in MODULES.items():
        if module.startswith("launcher.testing"):
            continue
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for name, node in imports(path, tree):
            if not name.startswith("launcher.testing"):
                continue
            guard = node
            while guard in parents and not (isinstance(guard, ast.If) and "MF2_TEST_FAULT" in ast.unparse(guard.test)):
                guard = parents[guard]
            assert isinstance(guard, ast.If), f"{module} imports {name} outside an `if ...MF2_TEST_FAULT...` block"


@pytest.mark.parametrize("package", ["model", "data"])
def test_model_and_data_import_neither_launcher_nor_deepspeed(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name, _ in imports(path)
                      if name.split(".")[0] in ("launcher", "deepspeed")]
    assert not offenders, offenders


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long
