"""`grit report RUN`: write `report/index.html` (self-contained) and `report/summary.json` for a run.

The funnel and totals are the run's summary (`grit_pipeline.engine.summary`, every shard, never read shard
by shard here). Everything drawn from rows -- the plots, the kept-fraction curve, the gallery and the
reject examples -- is read from a seeded sample of at most `max_shards` committed shards per stage
(`grit_pipeline.report.shard_sample`; 0 or None: every shard), one shard at a time into running sums, so
memory and objects read are bounded by the sample, not the run. The page, `summary.json` (`sample`) and
`kept_fraction.json` say which shards were read, out of how many. Also linked: the run logs and
`failures.jsonl` (the "Run log" section: `grit_pipeline.report.run_log`).
Same run + same options -> byte-identical files: no timestamps, sorted keys, keyed-hash samples.
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
from grit_pipeline.report.gallery import GalleryItem, build_gallery, sample_rows
from grit_pipeline.report.page import render_page
from grit_pipeline.report.reject_examples import reject_groups
from grit_pipeline.report.run_files import RunFiles
from grit_pipeline.report.run_log import run_log_section
from grit_pipeline.report.shard_sample import DEFAULT_MAX_SHARDS, ShardSample
from stages.select import SelectConfig

log = logging.getLogger(__name__)

KEPT_TABLE_THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(14))  # 0.30 ... 0.95


@dataclass
class ReportOptions:
    sample: int = 12  # gallery rows
    seed: int = 0  # seed of the gallery's rows and of the shard sample
    examples_per_reason: int = 5  # reject examples shown per stage and reason
    max_shards: int | None = DEFAULT_MAX_SHARDS  # rows are read from at most this many shards per stage; 0/None: all
    max_candidates: int = 40  # candidate boxes drawn per image (best first)
    thumb_side: int = 448  # longest side of embedded thumbnails, pixels


@dataclass
class Report:
    index_url: str
    summary_url: str
    summary: dict  # as written to report/summary.json: the run's summary plus `sample`
    kept_fraction: dict
    sample: ShardSample
    gallery_keys: list[str] = field(default_factory=list)


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
    scores: measures.ScoreHistogram  # every assigned candidate's chunk score
    kept: measures.KeptCounts  # per detect row, is its best pair (as select sees it) above each threshold
    shards: list[int]


def detect_measures(run: RunFiles, shards: list[int]) -> DetectMeasures:
    """Score histogram and kept counts over `shards` of detect, one shard at a time."""
    section = run.stage_config("select")
    min_score = float(section.get("min_score", SelectConfig().min_score))
    dm = DetectMeasures(measures.ScoreHistogram(min_score),
                        measures.KeptCounts(sorted({*measures.SCORE_GRID, *KEPT_TABLE_THRESHOLDS, min_score})),
                        shards)
    if run.stage_dir("detect") is None:
        return DetectMeasures(dm.scores, dm.kept, [])
    for shard in shards:
        table = select_input(run, shard)
        dm.scores.add(measures.candidate_scores(table))
        dm.kept.add(measures.best_pair_scores(table, section))
    return dm


def kept_fraction_data(dm: DetectMeasures, sample: ShardSample) -> dict:
    """The kept-fraction curve of `select.min_score` (written to `report/kept_fraction.json`), over the
    sampled detect shards."""
    min_score = dm.scores.threshold
    return {
        "min_score": min_score,
        "rows": dm.kept.rows,
        "kept_at_min_score": dm.kept.count(min_score),
        "thresholds": [float(t) for t in measures.SCORE_GRID],
        "kept_share": [dm.kept.share(t) for t in measures.SCORE_GRID],
        "shards_read": len(sample.of("detect")),
        "shards_committed": sample.committed.get("detect", 0),
    }


def _count_plot(dist: measures.CountDistribution, xlabel: str, name: str, ylabel: str) -> str:
    return plots.count_bars(*dist.arrays(), xlabel, name, ylabel)


def _plots(run: RunFiles, dm: DetectMeasures, kept: dict, sample: ShardSample) -> list[dict]:
    out = []
    if dm.shards:
        out.append({"name": "scores", "title": "Detector scores, chunk–box pairs before threshold and NMS",
                    "svg": plots.score_histogram(dm.scores.counts, measures.HISTOGRAM_EDGES, dm.scores.n,
                                                 dm.scores.above, kept["min_score"])})
        current = kept["kept_at_min_score"] / kept["rows"] if kept["rows"] else 0.0
        out.append({"name": "kept", "title": "Captions kept vs select.min_score (from stored candidates)",
                    "svg": plots.kept_fraction_curve(np.asarray(kept["thresholds"]), np.asarray(kept["kept_share"]),
                                                     kept["min_score"], current)})
    if run.stage_dir("chunks") is not None:
        chunks = measures.CountDistribution()
        for shard in sample.of("chunks"):
            chunks.add(measures.list_lengths(run.read("chunks", [shard], columns=["chunks"]), "chunks"))
        out.append({"name": "chunks", "title": "Noun chunks per caption (after the abstract filter)",
                    "svg": _count_plot(chunks, "chunks per caption", "chunks", "captions")})
    if run.stage_dir("compose") is not None:
        boxes, words = measures.CountDistribution(), measures.CountDistribution()
        for shard in sample.of("compose"):
            final = run.read("compose", [shard], columns=["caption", "noun_chunks", "ref_exps"])
            boxes.add(measures.list_lengths(final, "noun_chunks"))
            words.add(measures.expression_word_counts(final))
        out.append({"name": "boxes", "title": "Boxes per GrIT caption",
                    "svg": _count_plot(boxes, "boxes per caption", "boxes", "captions")})
        out.append({"name": "exprlen", "title": "Referring-expression length",
                    "svg": _count_plot(words, "words per expression", "exprlen", "expressions")})
    return out


def choose_sample(run: RunFiles, opts: ReportOptions) -> ShardSample:
    """The shards each stage's rows are read from (committed shards from `RunFiles.shards`: listings only)."""
    return ShardSample.choose({stage: run.shards(stage) for stage in run.stages()}, opts.max_shards, opts.seed)


def sample_note(sample: ShardSample, stage: str) -> str:
    """One sentence on what the plots read (of `stage`, the one the gallery and curves come from)."""
    if sample.complete:
        return "Computed over all committed shards."
    return (f"Computed over {len(sample.of(stage)):,} of {sample.committed.get(stage, 0):,} shards (a sample "
            f"of the committed shards seeded by --seed {sample.seed}, at most {sample.max_shards:,} per stage; "
            "--all-shards reads them all). The funnel counts every shard.")


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
    stages = run.stages()
    sample = choose_sample(run, opts)
    summary = {**run.summary(), "sample": sample.to_json()}
    gallery_stage = "detect" if "detect" in stages else (stages[-1] if stages else "")

    dm = detect_measures(run, sample.of("detect"))
    kept = kept_fraction_data(dm, sample)
    plot_list = _plots(run, dm, kept, sample)
    rows = sample_rows(run, gallery_stage, sample.of(gallery_stage), opts.sample, opts.seed) if stages else {}
    gallery: list[GalleryItem] = build_gallery(run, rows, opts.max_candidates, opts.thumb_side)
    groups = reject_groups(run, summary, sample.of, opts.examples_per_reason)

    thresholds = sorted(set(KEPT_TABLE_THRESHOLDS) | {kept["min_score"]}) if dm.kept.rows else []
    kept_table = [{"threshold": f"{t:g}", "kept": dm.kept.count(t), "total": dm.kept.rows,
                   "share": dm.kept.share(t), "current": t == kept["min_score"]} for t in thresholds]

    html = render_page(
        stages=stages, gallery_stage=gallery_stage,
        run_name=run.root.rsplit("/", 1)[-1], run_uri=run.uri, totals=totals(summary), chips=_chips(run),
        funnel=funnel_rows(summary), shards=max((d["shards"] for d in summary["stages"].values()), default=0),
        plots=plot_list, plots_note=sample_note(sample, gallery_stage), kept_table=kept_table, gallery=gallery,
        seed=opts.seed, sample=sample,
        rejects=[(stage, [g for g in groups if g.stage == stage])
                 for stage in dict.fromkeys(g.stage for g in groups)],
        examples_per_reason=opts.examples_per_reason,
        config_yaml=yaml.safe_dump(run.config, sort_keys=False) if run.config else "(no run.yaml)",
        run_log=run_log_section(run),
    )
    index_url = run.write_text("report/index.html", html)
    run.write_text("report/kept_fraction.json", json.dumps(kept, indent=2) + "\n")
    summary_url = run.write_json("report/summary.json", summary)
    log.info("report written to %s", index_url)
    return Report(index_url=index_url, summary_url=summary_url, summary=summary, kept_fraction=kept, sample=sample,
                  gallery_keys=[g.key for g in gallery])
