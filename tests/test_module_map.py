"""The shape of trainer/: subpackages in layers that import downward only, modules with no import
cycle (function-local imports count too), and no function or module grows past what a reader takes in
at once. docs/design.md draws the same map."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "trainer"
# Dotted module name (without the leading "trainer.") -> file.
MODULES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
           for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
# The layers of trainer/, lowest first: a module imports only from its own layer or a lower one.
# errors/log/config are the base every layer stands on.
LAYERS = [
    {"errors", "log"},
    {"config"},
    {"io"},
    {"data", "model"},
    {"parallel"},
    {"state"},
    {"evaluation"},
    {"training"},
    {"job"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def layer(module: str) -> int:
    return LAYER_OF[module.split(".")[0]]


def trainer_imports(path: Path) -> set[str]:
    """Dotted names (without "trainer.") of the trainer modules `path` imports anywhere, top level or
    inside functions. `from trainer.pkg import mod` names the module `pkg.mod` when there is one."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "trainer" or node.module.startswith("trainer."):
                base = node.module.removeprefix("trainer").removeprefix(".")
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    out.add(full if full in MODULES else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("trainer.") for a in node.names if a.name.startswith("trainer.")}
    return {m for m in out if m}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_top_level_name_has_a_layer():
    tops = {m.split(".")[0] for m in MODULES}
    assert tops <= set(LAYER_OF), tops - set(LAYER_OF)
    assert len([p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]) >= 3


def test_trainer_modules_import_downward_only():
    graph = {name: trainer_imports(path) - {name} for name, path in MODULES.items()}
    assert find_cycle(graph) is None
    upward = sorted(f"trainer/{name.replace('.', '/')}.py imports trainer.{dep}"
                    for name, deps in graph.items() for dep in deps if layer(dep) > layer(name))
    assert upward == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from trainer.job import stages\n    from trainer.io.storage import Storage\n")
    assert trainer_imports(probe) == {"job.stages", "io.storage"}
    assert layer("job.stages") > layer("io.storage")


def test_no_function_is_longer_than_a_screenful():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"trainer/{name.replace('.', '/')}.py:{node.lineno} {node.name}: {n} lines")
    assert long == []


def test_no_module_is_longer_than_a_sitting():
    long = [f"trainer/{name.replace('.', '/')}.py: {n} lines" for name, path in MODULES.items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert long == []


def test_design_doc_lists_every_module():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`trainer/([a-z_/]+)\.py`", design))
    assert {name.replace(".", "/") for name in MODULES} <= listed, \
        {name.replace(".", "/") for name in MODULES} - listed
