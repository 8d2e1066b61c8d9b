"""The house's rules, checked on the source: imports run one way (no circle, top-level or inside a function, and no
module importing a layer above its own), the analysis commands start without torch, and no module outgrows the
project's ~350 lines by much."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fractal_vmap"
# layers, lowest first: a module may import its own layer and the ones below, never one above
LAYERS = [
    ("leaves", {"errors", "files", "console", "options", "machine", "progress", "axes"}),
    ("analysis", {"analysis"}),
    (
        "core",
        {
            "model",
            "lora",
            "head",
            "optim",
            "recompute",
            "kernels",
            "recipe",
            "lanes",
            "reference",
            "tokenizer",
            "checkpoint",
            "data",
            "synth",
            "default_model",
            "sources",
            "tracking",
        },
    ),
    ("tasks", {"tasks"}),
    ("grid", {"grid"}),
    ("study", {"study"}),
    ("perf", {"perf"}),
    ("commands", {"cli", "finetune", "__main__", "__init__"}),
]
MAX_LINES = 400  # the project's files stay under ~350 lines; this catches one that outgrows it


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fractal_vmap":
            base = node.module.removeprefix("fractal_vmap").lstrip(".")
            names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
            found |= {n for n in names if n in known} or ({base} if base in known else set())
            if base in known:
                found.add(base)
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("fractal_vmap.")
                for a in node.names
                if a.name.removeprefix("fractal_vmap.") in known
            }
    return found - {""}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for k, (_, members) in enumerate(LAYERS):
        if top in members or module in members:
            return k
    raise AssertionError(
        f"fractal_vmap.{module} is in no layer of tests/test_layout.py: add it to the layer it belongs to"
    )


def test_no_import_circle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_imports_run_down_the_layers():
    upward = [(a, b) for a, targets in graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "modules importing a layer above their own: " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_the_analysis_commands_start_without_torch():
    names = [f"fractal_vmap.{m}" for m in modules() if m.startswith("analysis")]
    code = f"import sys; import {', '.join(names)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_module_stays_readable_in_length():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


def test_the_layer_test_catches_a_circle_and_an_upward_import(tmp_path):
    """The checks above would fail on a tree that had either fault (the graph code reads real imports)."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from fractal_vmap.grid.pipeline import run_grid\n")
    b.write_text("def f():\n    from fractal_vmap.model import forward\n")
    known = set(modules())
    assert imports_of(a, known) == {"grid.pipeline"}
    assert imports_of(b, known) == {"model"}
    assert layer_of("grid.pipeline") > layer_of("model")
