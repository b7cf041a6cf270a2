"""What detect v3's score rules change, and what `grit calibrate` recovers (issue 19).

1. `hand`: the issue's hand-set token probabilities (`a .30 dog .90`, `the .20 red .10 ball .80`) through
   `entries_from_probs`, the chunk scores under the max (before) and the mean (after), and how many pass
   the paper's 0.65.
2. `synthetic`: `grit_pipeline.assets.synthetic.write_img2dataset` (3 shards x 40 rows, bad rows
   included) through ingest -> chunks (spaCy) -> detect with the tiny random HF GroundingDINO
   (`stages/detectors/tiny.py`, fp32, CPU) -> select at min_score 0.65, under max/chunks (v2's rules),
   mean/chunks and mean/caption (v3's default): pairs and captions kept. Random weights: the figures show
   that the rules move the selection, not what a trained model would keep.
3. `batch`: the largest change of any candidate's score across batch sizes 1, 4 and 8, on the synthetic
   input (its images share one size) and on the same images resized to four sizes, where the previous
   batching (images of any size padded into one batch) is shown beside v3's (one pixel size per batch).
   Also the CPU bf16-autocast change against fp32 (a stand-in: bf16 vs fp32 on a GPU is unmeasured here).
   Random weights magnify every perturbation (padding, bf16) far beyond what trained weights show; the
   figures say whether a setting moves scores at all, and the one-size batches move them by float noise.
4. `calibrate`: `grit calibrate` on the test fixture (`grit_pipeline.assets.grit_calibration`: scores are
   GLIP's squared, so the paper's 0.65 maps to 0.4225; 400 rows, seed 1), run in this process through the
   real ingest, spaCy chunks and replay detect, committed through RunDir; then the interval width on 100,
   300, 1,000 and 3,000 rows (how many rows make the estimate stable).

    python bench/score_rules.py [--input-size 320] [--out bench/out/score_rules.json]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: E402 - this checkout on sys.path, offline environment
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from grit_pipeline.engine.stage_io import join_upstream  # noqa: E402

RULES = {"max_chunks": {"chunk_score": "max", "prompt": "chunks"},
         "mean_chunks": {"chunk_score": "mean", "prompt": "chunks"},
         "mean_caption": {"chunk_score": "mean", "prompt": "caption"}}


def hand_case() -> dict:
    from stages.detectors.postprocess import entries_from_probs

    probs = np.array([[0.30, 0.90, 0.20, 0.10, 0.80]], np.float32)  # a dog | the red ball
    token_chunk = np.array([0, 0, 1, 1, 1])
    box = np.array([[0.1, 0.1, 0.5, 0.5]])
    out = {}
    for rule in ("max", "mean"):
        _, chunk, _, score, _ = entries_from_probs(probs, token_chunk, box, 2, floor=0.0, rule=rule)
        scores = dict(zip(chunk.tolist(), score.tolist(), strict=True))
        out[f"{rule}_a_dog"] = round(scores[0], 4)
        out[f"{rule}_the_red_ball"] = round(scores[1], 4)
        out[f"{rule}_kept_at_065"] = int((score > np.float32(0.65)).sum())
    return out


def upstream(input_uri: str) -> list[list[pa.Table]]:
    """Per shard: the ingest and chunks outputs."""
    from stages.chunks import ChunksConfig, ChunksStage
    from stages.ingest import IngestConfig, IngestStage

    ingest, chunks = IngestStage(IngestConfig(format="img2dataset")), ChunksStage(ChunksConfig())
    chunks.setup()
    out = []
    for src in ingest.discover(input_uri):
        a = ingest.process_batch(ingest.read(src)).output
        b = chunks.process_batch(join_upstream(["ingest"], [a])).output
        out.append([a, b])
    return out


def detect_stage(model: str, size: int, batch_size: int = 8, **rules):
    from stages.detect import DetectConfig, DetectStage
    from stages.detectors.config import DetectExecution

    cfg = DetectConfig(backend="hf", hf_model=model, input_size=size, max_size=round(size * 1333 / 800), **rules)
    return DetectStage(cfg, DetectExecution(device="cpu", gpus=0, batch_size=batch_size))


def synthetic_rules(model: str, shards: list[list[pa.Table]], size: int) -> dict:
    from stages.select import SelectConfig, SelectStage

    select = SelectStage(SelectConfig(min_score=0.65))
    out = {"rows": sum(t[1].num_rows for t in shards), "chunks": sum(len(c) for t in shards for c in
                                                                   t[1]["chunks"].to_pylist())}
    for name, rules in RULES.items():
        stage = detect_stage(model, size, **rules)
        pairs = captions = candidates = 0
        started = time.perf_counter()
        for tables in shards:
            det_in = stage.prepare_batch(join_upstream(["ingest", "chunks"], tables)).output
            det = stage.process_batch(det_in).output
            candidates += sum(len(c) for c in det["candidates"].to_pylist())
            sel = select.process_batch(join_upstream(["ingest", "chunks", "detect"], [*tables, det])).output
            pairs += sum(len(p) for p in sel["pairs"].to_pylist())
            captions += sel.num_rows
        out[name] = {"candidates": candidates, "pairs_kept_065": pairs, "captions_kept_065": captions,
                     "seconds": round(time.perf_counter() - started, 1)}
    return out


def largest_change(a_list, b_list) -> tuple[float, int]:
    """Max |score change| of any candidate, matched entry by entry where both runs give the same boxes in
    the same order (corners within 1e-4), and the number of images where they do not: those are compared
    by their sorted scores per chunk (a lower bound of the change of a query's score; the runs keep every
    (query, chunk) entry, no floor, no cap, so each chunk has as many in both)."""
    worst, differ = 0.0, 0
    for a, b in zip(a_list, b_list, strict=True):
        if a.chunk.tolist() == b.chunk.tolist() and a.box.tolist() == b.box.tolist() and \
                np.abs(a.xyxy - b.xyxy).max(initial=0.0) <= 1e-4:
            worst = max(worst, float(np.abs(a.score - b.score).max(initial=0.0)))
            continue
        differ += 1
        for c in set(a.chunk.tolist()) | set(b.chunk.tolist()):
            sa, sb = np.sort(a.score[a.chunk == c]), np.sort(b.score[b.chunk == c])
            assert len(sa) == len(sb), "compare runs without floor or cap"
            worst = max(worst, float(np.abs(sa - sb).max(initial=0.0)))
    return worst, differ


def batch_figures(model: str, shards: list[list[pa.Table]], size: int) -> dict:
    from PIL import Image

    from stages.detectors import ChunkPrompt, ImageInput
    from stages.detectors.hf import HFGroundingDino

    stage = detect_stage(model, size)
    images, prompts = [], []
    for tables in shards:
        prepared = stage.prepare_batch(join_upstream(["ingest", "chunks"], tables)).output
        for row in prepared.select(["key", "caption", "chunks", "pixels", "pix_h", "pix_w"]).to_pylist():
            pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["pix_h"], row["pix_w"], 3)
            images.append(ImageInput(row["key"], pixels))
            prompts.append(ChunkPrompt.from_caption(row["caption"], [(c["start"], c["end"]) for c in row["chunks"]]))
    h, w = images[0].pixels.shape[:2]
    shapes = [(h, w), (w, h), (h * 5 // 4, w * 5 // 4), (h, h)]  # four sizes, cycling
    mixed = [ImageInput(im.key, np.asarray(Image.fromarray(im.pixels).resize(shapes[i % 4][::-1])))
             for i, im in enumerate(images)]

    class PaddedBatches(HFGroundingDino):
        """The previous batching: images of any size padded into one batch (for the 'before' figure)."""

        def _batch_key(self, job):
            return 0

    def run(cls, imgs, batch_size, precision="fp32"):
        det = cls(model, floor=0.0, max_candidates=10**6, device="cpu", batch_size=batch_size, precision=precision)
        return det.detect(imgs, prompts)

    out = {"images": len(images), "synthetic_size": f"{w}x{h}", "mixed_sizes": "/".join(f"{b}x{a}" for a, b in shapes)}
    for name, cls, imgs in (("synthetic", HFGroundingDino, images), ("mixed", HFGroundingDino, mixed),
                            ("mixed_padded_before", PaddedBatches, mixed)):
        ref = run(cls, imgs, 1)
        for bs in (4, 8):
            change, differ = largest_change(ref, run(cls, imgs, bs))
            out[f"{name}_max_change_bs{bs}"] = float(f"{change:.3g}")
            out[f"{name}_images_differing_bs{bs}"] = differ
    change, differ = largest_change(run(HFGroundingDino, images, 8), run(HFGroundingDino, images, 8, "bf16"))
    out["bf16_cpu_autocast_max_change"] = float(f"{change:.3g}")
    out["bf16_cpu_autocast_images_differing"] = differ
    return out


def calibration_run(folder: Path, fixture, rows_per_shard: int = 1000) -> Path:
    """ingest (grit20m) -> chunks (spaCy) -> detect (replay) in this process, committed through RunDir."""
    import yaml

    from grit_pipeline.engine.stats import shard_stats
    from grit_pipeline.rundir.store import RunDir, ShardFiles
    from stages.chunks import ChunksConfig, ChunksStage
    from stages.detect import DetectConfig, DetectStage
    from stages.ingest import IngestConfig, IngestStage

    fps = {"ingest": "b0000000000000a1", "chunks": "b0000000000000b2", "detect": "b0000000000000c3"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump({"select": {"min_score": 0.65, "nms_iou": 0.7},
                                                     "fingerprints": fps}))
    stages = {"ingest": IngestStage(IngestConfig(format="grit20m", rows_per_shard=rows_per_shard)),
              "chunks": ChunksStage(ChunksConfig()),
              "detect": DetectStage(DetectConfig(backend="replay", replay_path=str(fixture.replay), floor=0.05,
                                                 check_images=False))}
    stages["chunks"].setup()
    rundir = RunDir(str(folder))
    for src in stages["ingest"].discover(str(fixture.release)):
        raw = stages["ingest"].read(src)
        tables, rows_in = [], raw.num_rows
        for name, stage in stages.items():
            res = stage.process_batch(raw if name == "ingest" else join_upstream(list(fps)[:len(tables)], tables))
            st = shard_stats(name, src.index, fps[name], rows_in, res.output, res.rejects)
            rundir.commit_shard(name, fps[name], src.index, ShardFiles(res.output, res.rejects, st.to_json()))
            tables.append(res.output)
            rows_in = res.output.num_rows
    return folder


def calibrate_figures(tmp: Path) -> dict:
    from grit_pipeline.assets.grit_calibration import write_calibration_fixture
    from grit_pipeline.commands.calibrate import CalibrateOptions, calibrate

    out = {}
    for rows in (400, 100, 300, 1000, 3000):
        fx = write_calibration_fixture(tmp / f"release-{rows}", rows=rows, seed=1)
        started = time.perf_counter()
        run = calibration_run(tmp / f"run-{rows}", fx)
        rep = calibrate(str(run), CalibrateOptions())
        rec = rep["recommended"]
        if rows == 400:
            out.update({"fixture_rows": rows, "mapped_065": round(fx.mapped_threshold, 4),
                        "recommended_min_score": rec["min_score"], "recommended_nms_iou": rec["nms_iou"],
                        "interval_lo": rec["interval"][0], "interval_hi": rec["interval"][1], "f1": rec["f1"],
                        "rows_compared": rep["rows"]["compared"], "rows_chunks_differ": rep["rows"]["chunks_differ"],
                        "f1_at_065": rep["at_paper_threshold"]["f1"], "recall_at_065": rep["at_paper_threshold"]["recall"],
                        "seconds": round(time.perf_counter() - started, 1)})
        else:
            out[f"interval_width_{rows}_rows"] = round(rec["interval"][1] - rec["interval"][0], 4)
            out[f"recommended_{rows}_rows"] = rec["min_score"]
    return out


def main() -> int:
    ap = harness.parser(__doc__)
    ap.add_argument("--input-size", type=int, default=320, help="detector input (shorter side) for the tiny model")
    args = ap.parse_args()

    from grit_pipeline.assets.synthetic import write_img2dataset
    from stages.detectors import tiny

    figures = {"hand": hand_case()}
    print("hand-set probabilities (chunk score, kept at 0.65):", figures["hand"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny.hf_grounding_dino(tmp / "gd")
        inp = write_img2dataset(tmp / "input", shards=3, rows_per_shard=40)
        shards = upstream(str(inp.root))
        figures["synthetic"] = synthetic_rules(model, shards, args.input_size)
        print("synthetic, tiny GroundingDINO fp32, select at 0.65:", figures["synthetic"], flush=True)
        figures["batch"] = batch_figures(model, shards, args.input_size)
        print("largest score change vs batch size 1:", figures["batch"], flush=True)
        figures["calibrate"] = calibrate_figures(tmp)
        print("grit calibrate on the fixture:", figures["calibrate"], flush=True)
    flat = {}
    for group, values in figures.items():
        for k, v in values.items():
            if isinstance(v, dict):
                flat.update({f"{group}_{k}_{kk}": vv for kk, vv in v.items()})
            else:
                flat[f"{group}_{k}"] = v
    flat["bf16_vs_fp32_gpu"] = "unmeasured (no GPU)"
    harness.write_figures(flat, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
