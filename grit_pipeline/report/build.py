"""`grit report RUN`: write `report/index.html` (self-contained) and `report/summary.json` for a run.

Reads the per-shard stats (funnel), a few columns of the stage outputs (plots and the gallery's sample:
all shards, or an even spread of `max_shards` of them on a large run), the sampled rows' columns and
images, a few rejects per reason, and the names of the run logs and `failures.jsonl` (the "Run log"
section: `grit_pipeline.report.run_log`).
Same run + same options -> byte-identical files: no timestamps, sorted keys, a keyed-hash sample.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from grit_pipeline.report import measures, plots
from grit_pipeline.report.funnel import funnel_rows, totals
from grit_pipeline.report.gallery import GalleryItem, build_gallery
from grit_pipeline.report.page import render_page
from grit_pipeline.report.reject_examples import reject_groups
from grit_pipeline.report.run_files import RunFiles
from grit_pipeline.report.run_log import run_log_section
from stages.select import SelectConfig

log = logging.getLogger(__name__)

KEPT_TABLE_THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95


@dataclass
class ReportOptions:
    sample: int = 12  # gallery rows
    seed: int = 0  # gallery sample seed
    examples_per_reason: int = 5  # reject examples shown per stage and reason
    max_shards: int | None = None  # plots read at most this many shards (evenly spread); None = all
    max_candidates: int = 40  # candidate boxes drawn per image (best first)
    thumb_side: int = 448  # longest side of embedded thumbnails, pixels


@dataclass
class Report:
    index_url: str
    summary_url: str
    summary: dict
    kept_fraction: dict
    gallery_keys: list[str] = field(default_factory=list)


def spread(items: list[int], k: int | None) -> list[int]:
    """At most `k` items evenly spread over `items` (first and last included), in order."""
    if k is None or len(items) <= k:
        return list(items)
    if k <= 1:
        return items[:k]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def _read(run: RunFiles, stage: str, columns: list[str], max_shards: int | None) -> pa.Table | None:
    if run.stage_dir(stage) is None:
        return None
    return run.read(stage, spread(run.shards(stage), max_shards), columns=columns)


def select_input(run: RunFiles, shard: int) -> pa.Table:
    """What `select` saw for one shard: detect's key and candidates, with the row's chunks alongside."""
    detect = run.read("detect", [shard], columns=["key", "candidates"])
    if run.stage_dir("chunks") is None or shard not in run.shard_set("chunks"):
        return detect
    chunks = run.read("chunks", [shard], columns=["key", "chunks"], keys=detect["key"].to_pylist())
    idx = pc.index_in(detect["key"], chunks["key"])
    return detect.append_column("chunks", chunks["chunks"].take(idx))


@dataclass
class DetectMeasures:
    scores: np.ndarray  # every assigned candidate's chunk score (histogram)
    best: np.ndarray  # per detect row, its best pair score as select sees it (kept-fraction curve)
    shards: list[int]
    all_shards: int


def detect_measures(run: RunFiles, max_shards: int | None) -> DetectMeasures:
    if run.stage_dir("detect") is None:
        return DetectMeasures(np.array([]), np.array([]), [], 0)
    shards = spread(run.shards("detect"), max_shards)
    section = run.stage_config("select")
    scores, best = [], []
    for shard in shards:  # one shard at a time keeps memory flat on large runs
        table = select_input(run, shard)
        scores.append(measures.candidate_scores(table))
        best.append(measures.best_pair_scores(table, section))
    return DetectMeasures(np.concatenate(scores), np.concatenate(best), shards, len(run.shards("detect")))


def kept_fraction_data(run: RunFiles, dm: DetectMeasures) -> dict:
    """The kept-fraction curve of `select.min_score` (written to `report/kept_fraction.json`)."""
    min_score = float(run.stage_config("select").get("min_score", SelectConfig().min_score))
    grid = np.asarray(measures.SCORE_GRID)
    return {
        "min_score": min_score,
        "rows": int(dm.best.size),
        "kept_at_min_score": int((dm.best.astype(np.float32) > np.float32(min_score)).sum()),
        "thresholds": [float(t) for t in grid],
        "kept_share": [float(v) for v in measures.kept_fraction(dm.best, grid)],
    }


def _plots(run: RunFiles, dm: DetectMeasures, kept: dict, max_shards: int | None) -> list[dict]:
    out = []
    if dm.shards:
        out.append({"name": "scores", "title": "Detector scores, chunk–box pairs before threshold and NMS",
                    "svg": plots.score_histogram(dm.scores, kept["min_score"])})
        current = kept["kept_at_min_score"] / kept["rows"] if kept["rows"] else 0.0
        out.append({"name": "kept", "title": "Captions kept vs select.min_score (from stored candidates)",
                    "svg": plots.kept_fraction_curve(np.asarray(kept["thresholds"]), np.asarray(kept["kept_share"]),
                                                     kept["min_score"], current)})
    chunks = _read(run, "chunks", ["chunks"], max_shards)
    if chunks is not None:
        out.append({"name": "chunks", "title": "Noun chunks per caption (after the abstract filter)",
                    "svg": plots.count_bars(measures.list_lengths(chunks, "chunks"), "chunks per caption", "chunks",
                                             "captions")})
    final = _read(run, "compose", ["caption", "noun_chunks", "ref_exps"], max_shards)
    if final is not None:
        out.append({"name": "boxes", "title": "Boxes per GrIT caption",
                    "svg": plots.count_bars(measures.list_lengths(final, "noun_chunks"), "boxes per caption", "boxes",
                                             "captions")})
        out.append({"name": "exprlen", "title": "Referring-expression length",
                    "svg": plots.count_bars(measures.expression_word_counts(final), "words per expression", "exprlen",
                                             "expressions")})
    return out


def _gallery_population(run: RunFiles, max_shards: int | None) -> dict[str, int]:
    """key -> shard of the rows the gallery samples from: those the detector saw (else the last stage),
    over the same shards as the plots."""
    stages = run.stages()
    if not stages:
        return {}
    stage = "detect" if "detect" in stages else stages[-1]
    population: dict[str, int] = {}
    for shard in spread(run.shards(stage), max_shards):
        for k in run.read(stage, [shard], columns=["key"])["key"].to_pylist():
            population.setdefault(k, shard)
    return population


def _chips(run: RunFiles) -> list[tuple[str, str]]:
    chips = []
    for stage, keys in (("select", ("min_score", "nms_scope", "nms_iou", "max_box_area")), ("detect", ("backend",)),
                        ("compose", ("location_encoder", "containment_filter"))):
        cfg = run.stage_config(stage)
        chips += [(f"{stage}.{k}", str(cfg[k])) for k in keys if cfg.get(k) is not None]
    return chips


def build_report(run_uri: str, options: ReportOptions | None = None, storage_options: dict | None = None) -> Report:
    opts = options or ReportOptions()
    run = RunFiles.open(run_uri, storage_options)
    summary = run.summary()  # also (re)writes report/summary.json
    dm = detect_measures(run, opts.max_shards)
    kept = kept_fraction_data(run, dm)
    plot_list = _plots(run, dm, kept, opts.max_shards)
    gallery: list[GalleryItem] = build_gallery(run, _gallery_population(run, opts.max_shards), opts.sample, opts.seed,
                                               opts.max_candidates, opts.thumb_side)
    groups = reject_groups(run, summary, opts.examples_per_reason)

    thresholds = sorted(set(KEPT_TABLE_THRESHOLDS) | {kept["min_score"]}) if dm.best.size else []
    best32 = dm.best.astype(np.float32)
    kept_table = []
    for t in thresholds:
        n = int((best32 > np.float32(t)).sum())
        kept_table.append({"threshold": f"{t:g}", "kept": n, "total": int(dm.best.size),
                           "share": n / dm.best.size if dm.best.size else 0.0, "current": t == kept["min_score"]})
    note = ("Computed over all committed shards." if len(dm.shards) == dm.all_shards else
            f"Computed over {len(dm.shards)} of {dm.all_shards} shards (evenly spread).")

    stages = run.stages()
    html = render_page(
        stages=stages, gallery_stage="detect" if "detect" in stages else (stages[-1] if stages else ""),
        run_name=run.root.rsplit("/", 1)[-1], run_uri=run.uri, totals=totals(summary), chips=_chips(run),
        funnel=funnel_rows(summary), shards=max((d["shards"] for d in summary["stages"].values()), default=0),
        plots=plot_list, plots_note=note, kept_table=kept_table, gallery=gallery, seed=opts.seed,
        rejects=[(stage, [g for g in groups if g.stage == stage])
                 for stage in dict.fromkeys(g.stage for g in groups)],
        examples_per_reason=opts.examples_per_reason,
        config_yaml=yaml.safe_dump(run.config, sort_keys=False) if run.config else "(no run.yaml)",
        run_log=run_log_section(run),
    )
    index_url = run.write_text("report/index.html", html)
    run.write_text("report/kept_fraction.json", json.dumps(kept, indent=2) + "\n")
    log.info("report written to %s", index_url)
    return Report(index_url=index_url, summary_url=run.url("report/summary.json"), summary=summary,
                  kept_fraction=kept, gallery_keys=[g.key for g in gallery])
