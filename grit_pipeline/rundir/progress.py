"""`<run>/progress.json`: the live view of a running `grit run`, a few KB whatever the run's size.

Written by the driver's bookkeeping thread (`grit_pipeline.engine.bookkeeping`) whenever the ledgers are
flushed, at least every heartbeat of the lease, and at the end of the run:

    {"format": 1, "written": <driver's epoch seconds>, "run_start": "2026-12-05T00:00:00Z",
     "state": "running" | "finished" | "stopped" | "aborted",
     "planned": "0-99999",                                   # the run's selected shards, as ranges
     "stages": {"detect": {"fingerprint": "...", "inflight": "812-830",   # admitted, not committed
                           "ledger": [segment, lines]}, ...},           # where its ledger stands
     "published": 811, "failures": 3}

`grit status` reads it to know what is in flight and whether a stage's ledger moved since its last read
(so a `--watch` refresh re-reads only the ledgers that changed); the next `grit run` reads it to find the
leftovers of shards that were in flight when the last one stopped, and, where it says `finished` and a
stage's ledger still stands at the position given, takes that stage's committed shards from the ledger
instead of listing `_done/` (`grit_pipeline.engine.plan.ledger_committed`). It is a view, not a record:
the ledgers and the `_done` markers are the record; it is written as `running` before a run's first
marker, so only a run that ended cleanly leaves `finished`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from grit_pipeline.rundir.store import RunDir, entry_mtime

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
FORMAT = 1


def read_progress(rundir: RunDir, *, with_mtime: bool = False) -> Any:
    """The progress document (None if absent or unreadable); with `with_mtime`, (document, store-side
    modification time or None)."""
    path = rundir.path(PROGRESS)
    doc: dict[str, Any] | None = None
    mtime = None
    try:
        data = rundir.read_bytes(path)
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            doc = None
        elif with_mtime:
            mtime = entry_mtime(rundir.fs.info(path))
    except FileNotFoundError:
        doc = None
    except ValueError:
        log.warning("%s is not JSON; ignored", rundir.url(PROGRESS))
        doc = None
    return (doc, mtime) if with_mtime else doc


def write_progress(rundir: RunDir, doc: dict[str, Any]) -> None:
    rundir.put_atomic(rundir.path(PROGRESS), (json.dumps({"format": FORMAT, **doc}, sort_keys=True,
                                                         ensure_ascii=True) + "\n").encode("ascii"))
