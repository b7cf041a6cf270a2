"""The benchmark scripts share one scaffolding (`bench/harness.py`): each imports it, so each has `--out`,
runs against this checkout and writes its figures the way `bench/run_all.py` reads them. A script added
later without it fails here."""

from __future__ import annotations

import ast
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
NOT_BENCHMARKS = {"harness.py", "run_all.py"}


def test_every_benchmark_uses_the_harness():
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name not in NOT_BENCHMARKS)
    assert scripts
    without = []
    for path in scripts:
        tree = ast.parse(path.read_text(), str(path))
        imports = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
        uses_parser = any(isinstance(n, ast.Attribute) and n.attr == "parser"
                          and getattr(n.value, "id", "") == "harness" for n in ast.walk(tree))
        if "harness" not in imports or not uses_parser:
            without.append(path.name)
    assert without == [], f"not on bench/harness.py (import harness; harness.parser(__doc__)): {without}"


def test_every_benchmark_is_run_by_make_bench():
    """`make bench` (bench/run_all.py) runs and records every script, so none is left out of RESULTS.md."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", BENCH / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    scripts = {p.stem for p in BENCH.glob("*.py") if p.name not in NOT_BENCHMARKS}
    assert scripts - set(run_all.SCRIPTS) == set()
