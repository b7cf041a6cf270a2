"""Does the streaming engine keep a (simulated) GPU busy, publish early and stay small? Figures, not a test.

Ray starts with one GPU resource on this CPU machine. `detect` runs a benchmark-only detector, defined
here and nowhere in the product: the replay backend plus a fixed sleep per image, in an actor that
reserves the GPU. It asks for pixels (images are read and decoded to GroundingDINO's 800 px input in the
prepare step, exactly as a real detector's are), so decoding really has to run ahead of it. Over N shards:

- wall time of the run vs detect's busy time (the union of the detector's calls, logged by the actor);
- when the first final shard appeared in `grit/`, as a fraction of the wall time;
- peak memory of the whole process tree (this driver plus every Ray process, summed PSS) and whether Ray
  spilled objects to disk.

    python bench/pipeline_overlap.py                       # 16 shards x 200 images, 50 ms per image
    python bench/pipeline_overlap.py --shards 24 --out bench/out/pipeline_overlap.json

Targets (issue "streaming engine"): wall <= 1.15 x detect busy; first final shard before 25% of the
wall; tree peak <= 3 GB with nothing spilled. The same script runs against the stage-by-stage engine of
commit 6771668 for the "before" figures: `GRIT_REPO=<a checkout of 6771668> python bench/pipeline_overlap.py
--out bench/out/pipeline_overlap_before.json` (`bench/harness.py`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment
from peak_rss import Sampler

from stages.base import Resources
from stages.detect import DetectStage


class SleepyReplay:
    """The replay detector, then `per_image` seconds of sleep per image: a stand-in for a GPU forward."""

    needs_pixels = False  # pixels are decoded anyway (see SlowDetect.prepare_batch); the replay needs none

    def __init__(self, inner, per_image: float, log_path: str):
        self.inner, self.per_image, self.log_path = inner, per_image, log_path

    def detect(self, images, prompts):
        t0 = time.time()
        found = self.inner.detect(images, prompts)
        time.sleep(self.per_image * len(images))
        with open(self.log_path, "a") as f:
            f.write(f"{t0} {time.time()}\n")
        return found


class SlowDetect(DetectStage):
    """`detect` with the benchmark detector, on the (simulated) GPU; same name, config and fingerprint."""

    PER_IMAGE = 0.05
    LOG = ""
    BATCH = 8

    def __init__(self, config=None, execution=None):
        try:
            super().__init__(config, execution)
        except TypeError:  # the stage-by-stage engine's stages take only a config
            super().__init__(config)

    @property
    def resources(self) -> Resources:
        fields = {"cpus": 1.0, "gpus": 1.0, "actor": True, "batch_size": self.BATCH, "pool_size": 1}
        if "part_rows" in Resources.model_fields:  # parts as a pixel detector's default (earlier engines: none)
            from stages.detectors.config import default_part_rows

            fields["part_rows"] = default_part_rows(self.BATCH)
        return Resources(**fields)

    def setup(self) -> None:
        if self._detector is None:
            from stages.detectors.replay import ReplayDetector

            inner = ReplayDetector(path=self.config.replay_path, mode=self.config.replay_mode,
                                   floor=self.config.floor, max_candidates=self.config.max_candidates)
            self._detector = SleepyReplay(inner, self.PER_IMAGE, self.LOG)

    def prepare_batch(self, table):
        import stages.detect as detect_module
        from stages.images import ResizeSpec

        original = detect_module.resize_spec
        detect_module.resize_spec = lambda config: ResizeSpec(size=800, max_size=1333)  # GroundingDINO's input
        try:
            return super().prepare_batch(table)
        finally:
            detect_module.resize_spec = original


def detector_calls(log: Path) -> list[tuple[float, float]]:
    return sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines() if line.strip())


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def first_final_at(folder: Path) -> float | None:
    """When the first final shard was written (the earliest modification time in `grit/`)."""
    times = [p.stat().st_mtime for p in folder.glob("shard-*.parquet")]
    return min(times) if times else None


def spilled_mib() -> float:
    """MiB of objects Ray spilled to disk in this session (its default spill folder, under the session)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [f for f in session.rglob("*") if f.is_file() and "spill" in str(f.relative_to(session))]
    return round(sum(f.stat().st_size for f in files) / 2**20, 1)


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--rows", type=int, default=200, help="images per shard")
    # 50 ms: GroundingDINO Swin-T at 800 px does about 10-20 images/s on one GPU
    ap.add_argument("--per-image", type=float, default=0.05, help="simulated GPU seconds per image")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--workdir")
    args = ap.parse_args()

    import ray
    import ray.cloudpickle

    from grit_pipeline.assets.synthetic import replay_overrides, write_img2dataset
    from grit_pipeline.config import load_config
    from grit_pipeline.engine.plan import build_plan, default_stage_classes
    from grit_pipeline.engine.runner import execute

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import bench/
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        inp = write_img2dataset(work / "input", shards=args.shards, rows_per_shard=args.rows, bad_rows=False,
                                image_size=(320, 240))
        SlowDetect.PER_IMAGE, SlowDetect.LOG = args.per_image, str(work / "detect-calls.log")
        overrides = [*replay_overrides(inp.detections), "run.progress=false"]
        try:
            config = load_config(None, [*overrides, f"run.resources.detect.batch_size={SlowDetect.BATCH}"])
        except Exception:  # the stage-by-stage engine kept detect's batch size in its config
            config = load_config(None, [*overrides, f"detect.batch_size={SlowDetect.BATCH}"])
        classes = {**default_stage_classes(), "detect": SlowDetect}
        plan = build_plan(config, input_uri=str(inp.root), output_uri=str(work / "run"), stage_classes=classes)

        ray.init(address="local", num_cpus=args.num_cpus, num_gpus=1, include_dashboard=False, log_to_driver=False)
        sampler = Sampler(os.getpid(), every=0.25)
        sampler.start()
        t0 = time.time()
        result = execute(plan, progress=False)
        wall = time.time() - t0
        sampler.stop.set()
        first_at = first_final_at(work / "run" / "grit")
        spilled = spilled_mib()
        ray.shutdown()
        assert result.ok, result.failures
        calls = detector_calls(work / "detect-calls.log")
        busy = busy_seconds(calls)
        first = (first_at - t0) if first_at else None

    figures = {
        "shards": args.shards, "images": args.shards * args.rows, "per_image_s": args.per_image,
        "cpus": args.num_cpus, "wall_s": round(wall, 2), "detect_busy_s": round(busy, 2),
        "wall_over_busy": round(wall / busy, 3),
        # where the rest of the wall goes: before the first detector call (actors loading, the first shard's
        # ingest and chunks), idle gaps between calls, after the last call (the last shard's select, compose)
        "before_first_call_s": round(calls[0][0] - t0, 2),
        "idle_between_calls_s": round(calls[-1][1] - calls[0][0] - busy, 2),
        "after_last_call_s": round(t0 + wall - calls[-1][1], 2),
        "first_final_s": round(first, 2) if first is not None else None,
        "first_final_fraction": round(first / wall, 3) if first is not None else None,
        "tree_peak_pss_mb": round(sampler.tree_pss_kib / 1024, 1),
        "driver_peak_rss_mb": round(sampler.driver_rss_kib / 1024, 1),
        "spilled_mib": spilled,
    }
    print(f"{figures['images']:,} images in {args.shards} shards, {args.per_image * 1000:.0f} ms each on a "
          f"simulated GPU, {args.num_cpus} CPUs")
    print(f"wall {wall:.1f} s vs detect busy {busy:.1f} s = {figures['wall_over_busy']}x (target <= 1.15): "
          f"{figures['before_first_call_s']} s before the first detector call, "
          f"{figures['idle_between_calls_s']} s idle between calls, {figures['after_last_call_s']} s after the last")
    if first is not None:
        print(f"first final shard at {first:.1f} s = {figures['first_final_fraction']:.1%} of the wall (target < 25%)")
    print(f"process tree peak {figures['tree_peak_pss_mb']:.0f} MB (target <= 3,000), driver peak RSS "
          f"{figures['driver_peak_rss_mb']:.0f} MB, spilled {spilled:g} MiB (target 0)")
    harness.write_figures(figures, args.out)


if __name__ == "__main__":
    main()
