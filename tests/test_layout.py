"""The rollout package's layout: sub-packages by role whose imports run downward only (net -> engine -> model), no
import cycle among its modules, no module over 450 lines, and nothing below `r3rl.rollout` (sample, trace, models)
importing it. Imports are read with `ast` (function-local and TYPE_CHECKING imports count too), nothing is imported.

    pytest tests/test_layout.py -q

Negative controls: a synthetic tree with an upward import, a cycle, a long module and a lower module that names
`r3rl.rollout` is flagged by each checker.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ("model", "engine", "net")  # lowest first: a sub-package may import only those at or before it
MAX_LINES = 450
BELOW_ROLLOUT = ("r3rl/sample.py", "r3rl/trace.py", "r3rl/models")  # the floor under r3rl.rollout


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, src: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from pkg import mod` gives `pkg.mod` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, src) if path.name == "__init__.py" else module_name(path, src).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if (src / sub.replace(".", "/")).with_suffix(".py").exists() or (src / sub.replace(".", "/")).is_dir():
                    names.add(sub)
    return names


def layer_of(module: str, root: str) -> int | None:
    """Rank of the sub-package of `root` that `module` is in (0 lowest); len(LAYERS) for `root` itself (its
    __init__ imports every layer); None outside `root`."""
    if module == root:
        return len(LAYERS)
    if not module.startswith(root + "."):
        return None
    sub = module[len(root) + 1 :].split(".")[0]
    return LAYERS.index(sub) if sub in LAYERS else len(LAYERS)


def upward_imports(src: Path, root: str = "r3rl.rollout") -> list[str]:
    """'module -> imported' for every import from a sub-package of `root` into a higher one (or into `root`)."""
    bad = []
    for path in sorted((src / root.replace(".", "/")).rglob("*.py")):
        me = module_name(path, src)
        mine = layer_of(me, root)
        if mine is None or mine == len(LAYERS):
            continue
        for target in sorted(imported(path, src)):
            theirs = layer_of(target, root)
            if theirs is not None and theirs > mine:
                bad.append(f"{me} -> {target}")
    return bad


def cycles(src: Path, root: str = "r3rl.rollout") -> list[list[str]]:
    """Import cycles among the modules under `root` (sub-package __init__ files included)."""
    paths = sorted((src / root.replace(".", "/")).rglob("*.py"))
    graph = {module_name(p, src): imported(p, src) for p in paths}
    graph = {m: sorted(t for t in targets if t in graph and t != m) for m, targets in graph.items()}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    return found


def long_modules(src: Path, root: str = "r3rl.rollout") -> list[str]:
    return [f"{p.relative_to(src)}: {n} lines" for p in sorted((src / root.replace(".", "/")).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]


def floor_imports(src: Path, floor: tuple[str, ...] = BELOW_ROLLOUT, root: str = "r3rl.rollout") -> list[str]:
    """'module -> imported' for every module below `root` that imports it."""
    bad = []
    for entry in floor:
        path = src / entry
        for p in sorted(path.rglob("*.py") if path.is_dir() else [path]):
            bad += [f"{module_name(p, src)} -> {t}" for t in sorted(imported(p, src))
                    if t == root or t.startswith(root + ".")]
    return bad


# --- the real tree ------------------------------------------------------------------------------------------------
def test_the_sub_packages_are_the_layers():
    rollout = SRC / "r3rl" / "rollout"
    found = sorted(p.name for p in rollout.iterdir() if (p / "__init__.py").exists())
    assert found == sorted(LAYERS), f"rollout sub-packages: got {found}, expected {sorted(LAYERS)}"
    assert not [p.name for p in rollout.glob("*.py") if p.name != "__init__.py"], "modules left beside the layers"
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((rollout / layer / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"rollout/{layer}/__init__.py: the docstring must say what it may import"


def test_rollout_imports_run_downward_only():
    assert upward_imports(SRC) == []


def test_rollout_has_no_import_cycle():
    assert cycles(SRC) == []


def test_no_rollout_module_is_over_450_lines():
    assert long_modules(SRC) == []


def test_no_module_of_the_package_is_over_450_lines():  # the checker's negative control is the synthetic tree below
    assert long_modules(SRC, root="r3rl") == []


def test_nothing_below_rollout_imports_it():
    assert floor_imports(SRC) == []


# --- negative controls: a synthetic tree breaking each rule ------------------------------------------------------
def _write(src: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)


def test_the_checkers_flag_a_synthetic_tree_that_breaks_each_rule(tmp_path):
    _write(tmp_path, {
        "r3rl/__init__.py": "",
        "r3rl/sample.py": "if TYPE_CHECKING:\n    from r3rl.rollout.engine.a import X\n",  # TYPE_CHECKING counts
        "r3rl/trace.py": "",
        "r3rl/models/__init__.py": "",
        "r3rl/rollout/__init__.py": "from r3rl.rollout.net.c import Z\n",
        "r3rl/rollout/model/__init__.py": "",
        "r3rl/rollout/model/m.py": "def f():\n    from r3rl.rollout.engine import a  # upward, function-local\n",
        "r3rl/rollout/engine/__init__.py": "",
        "r3rl/rollout/engine/a.py": "from r3rl.rollout.engine.b import Y\nX = 1\n",
        "r3rl/rollout/engine/b.py": "from . import a\nY = 2\n" + "\n" * MAX_LINES,  # a relative import: a cycle
        "r3rl/rollout/net/__init__.py": "",
        "r3rl/rollout/net/c.py": "from r3rl.rollout import SamplingParams\nZ = 3\n",  # the package: upward too
    })
    assert upward_imports(tmp_path) == ["r3rl.rollout.model.m -> r3rl.rollout.engine",
                                        "r3rl.rollout.model.m -> r3rl.rollout.engine.a",
                                        "r3rl.rollout.net.c -> r3rl.rollout"]
    assert ["r3rl.rollout.engine.a", "r3rl.rollout.engine.b", "r3rl.rollout.engine.a"] in cycles(tmp_path)
    assert long_modules(tmp_path) == [f"r3rl/rollout/engine/b.py: {MAX_LINES + 2} lines"]
    assert floor_imports(tmp_path) == ["r3rl.sample -> r3rl.rollout.engine.a"]
