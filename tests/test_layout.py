"""The package layout stays one-way: no import cycles, and no import against the layering

    schemas <- stages <- grit_pipeline base (version, config, logs, errors, assets) <- grit_pipeline.rundir
            <- grit_pipeline.engine <- commands / report / train <- cli, api, demo, the package facade

Every import statement counts, also those inside functions (a lazy import is still a dependency), read
from the source with `ast`, so a module added later is covered without anyone listing it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "stages", "grit_pipeline")

# first matching prefix wins
LAYERS: list[tuple[str, int]] = [
    ("schemas", 0),
    ("stages", 1),
    ("grit_pipeline.version", 2),
    ("grit_pipeline.config", 2),
    ("grit_pipeline.logs", 2),
    ("grit_pipeline.shard_ranges", 2),
    ("grit_pipeline.errors", 2),
    ("grit_pipeline.assets", 2),
    ("grit_pipeline.rundir", 3),
    ("grit_pipeline.engine", 4),
    ("grit_pipeline.commands", 5),
    ("grit_pipeline.report", 5),
    ("grit_pipeline.train", 5),
    ("grit_pipeline.cli", 6),
    ("grit_pipeline.api", 6),
    ("grit_pipeline.demo", 6),
    ("grit_pipeline", 6),  # the package itself: a facade over the API
]


def layer(module: str) -> int:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise AssertionError(f"{module}: no layer; add its package to LAYERS in {__file__}")


def project_modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            while name and name not in known:  # `import a.b.c` of a module: its longest known prefix
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer(graph):
    for m in graph:
        layer(m)


def test_imports_follow_the_layering(graph):
    wrong = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                   for m, deps in graph.items() for d in deps if layer(d) > layer(m))
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components; any component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_violation_and_a_cycle():
    """The walk itself can fail: a planted upward import and a planted cycle are both found."""
    bad = {"grit_pipeline.rundir.store": {"grit_pipeline.engine.plan"}, "grit_pipeline.engine.plan": set()}
    assert any(layer(d) > layer(m) for m, deps in bad.items() for d in deps)
    src = "from grit_pipeline.engine import plan\nfrom . import store\n"
    tmp = ROOT / "tests" / "__layout_probe__.py"
    try:
        tmp.write_text(src)
        found = imports_of("grit_pipeline.rundir.lease", tmp, {"grit_pipeline.engine.plan", "grit_pipeline.engine",
                                                               "grit_pipeline.rundir.store"})
    finally:
        tmp.unlink()
    assert found == {"grit_pipeline.engine.plan", "grit_pipeline.rundir.store"}
