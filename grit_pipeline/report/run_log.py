"""The report's "Run log" section: links to the logs every `grit run` left in the run directory
(`<run>/logs/<start>.log`) and to `<run>/failures.jsonl` (`failures/` on object stores), with the failure count per stage and the latest
failures (`grit_pipeline.rundir.runlog` writes both). Links are relative to `report/index.html`, so they work
wherever the run directory is opened from; the full URL is shown next to each.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from typing import Any

from grit_pipeline.report.run_files import RunFiles
from grit_pipeline.rundir.runlog import failures_location, log_files, read_failures

LATEST = 10  # failures listed on the page (all are in the file)


def run_log_section(run: RunFiles) -> dict[str, Any]:
    logs = [{"name": posixpath.basename(p), "href": f"../{p}", "url": run.url(p)} for p in log_files(run.rundir)]
    failures = read_failures(run.rundir)
    by_stage = Counter(str(f.get("stage")) for f in failures)
    latest = [{k: f.get(k) for k in ("time", "run_start", "stage", "shard", "key", "error_type", "message")}
              for f in reversed(failures[-LATEST:])]
    where = failures_location(run.rundir)
    return {"logs": logs, "failures": {"count": len(failures), "href": f"../{where}", "url": run.url(where),
                                       "by_stage": sorted(by_stage.items()), "latest": latest}}
