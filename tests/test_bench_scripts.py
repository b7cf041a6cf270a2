"""The benchmark scripts share one scaffolding (`bench/harness.py`): each imports it, so each has `--out`,
runs against this checkout and writes its figures the way `bench/run_all.py` reads them. A script added
later without it fails here."""

from __future__ import annotations

import ast
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
NOT_BENCHMARKS = {"harness.py", "run_all.py", "moto_listing.py"}  # shared parts, not benchmarks


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


def test_the_benchmark_s3_server_lists_the_pages_moto_lists():
    """bench/run_scale.py's server answers ListObjectsV2 from a sorted index (bench/moto_listing.py) so a
    page costs what it costs on AWS, not a scan of the bucket: every page equals moto's own, across
    prefixes, folders (a delimiter), keys that sort around a folder, deleted keys, start-after and page
    sizes."""
    import importlib.util
    import random

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    spec = importlib.util.spec_from_file_location("moto_listing", BENCH / "moto_listing.py")
    listing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(listing)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    bucket = "bench-listing-check"
    backend.create_bucket(bucket, "us-east-1")
    rng = random.Random(0)
    names = {f"run/stages/{st}/fp{f}/_done/shard-{n:05d}" for st in ("a", "b") for f in (1, 2) for n in range(120)}
    names |= {f"run/grit/shard-{n:05d}.parquet" for n in range(50)} | {"run/a-b", "run/a/b/c", "run/a/x", "run/a0",
                                                                      "run/x/", "top", "run/stages/a.txt"}
    names |= {f"run/{''.join(rng.choice('ab-/_0') for _ in range(rng.randint(1, 6)))}" for _ in range(200)}
    for name in sorted(names):
        backend.put_object(bucket, name, b"x")
    for name in rng.sample(sorted(names), 40):
        backend.delete_object(bucket, name)
    cases = [(prefix, delimiter, start_after, max_keys)
             for prefix in ("", "run/", "run/a", "run/stages/a/fp1/_done/", "run/stages/", "nothing/")
             for delimiter in (None, "/") for start_after in (None, "run/a", "run/stages/b")
             for max_keys in (1, 3, 7, 1000)]

    def pages(prefix, delimiter, start_after, max_keys):
        out, token = [], None
        for _ in range(2000):
            entries, truncated, token = backend.list_objects_v2(
                backend.get_bucket(bucket), prefix, delimiter, token, start_after if token is None else None,
                max_keys)
            out.append(([e if isinstance(e, str) else e.name for e in entries], truncated))
            if not truncated:
                return out
        raise AssertionError("the listing does not end")

    try:
        expected = [pages(*case) for case in cases]
        listing.install(backend)
        listing.touch()
        assert [pages(*case) for case in cases] == expected
        backend.put_object(bucket, "run/a/new", b"x")  # a write makes the index stale: rebuilt
        listing.touch()
        assert "run/a/new" in [n for page, _ in pages("run/a/", None, None, 1000) for n in page]
    finally:
        vars(backend).pop("list_objects_v2", None)  # moto's own method again
        for name in [k for k in backend.get_bucket(bucket).keys]:
            backend.delete_object(bucket, name)
        backend.delete_bucket(bucket)
