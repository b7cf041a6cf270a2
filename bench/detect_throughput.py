"""Throughput of the detect stage: CPU decode (prepare_batch) and the detector forward (process_batch).

    python bench/detect_throughput.py                       # CPU: decode + detect at 320 and 800 px
    python bench/detect_throughput.py --out bench/out/detect.json
    python bench/detect_throughput.py --device cuda --images 64 --batch-size 16   # on a GPU machine

Reports, on the same 1024 px JPEGs (scikit-image's bundled photos, scaled up and re-encoded):
- decode: images/s on one core of our decode (header checks, JPEG draft mode, EXIF, RGB, resize) against
  naive PIL `open -> convert("RGB") -> resize`, at the detector input sizes;
- detect: images/s of `DetectStage.process_batch` with a random transformers GroundingDINO of
  grounding-dino-tiny's architecture (Swin-T, BERT-base, 900 queries) at 320 and 800 px;
- with `--device cuda`: the same batched vs a one-image-at-a-time loop, peak GPU memory and mean GPU
  utilisation (sampled through NVML when available), under bf16 autocast.

Random weights: timings are real, boxes are meaningless. No timing is asserted anywhere.
"""

from __future__ import annotations

import io
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment
import numpy as np
import pyarrow as pa
from PIL import Image

from schemas.tables import CHUNK_TYPE
from stages.images import DecodeLimits, ResizeSpec, decode_image

CAPTION = "a big red dog on the green grass with a small cat and a ball"
SPANS = [(0, 13), (17, 32), (38, 49), (54, 60)]  # a big red dog / the green grass / a small cat / a ball


def realistic_jpegs(n: int, longer: int = 1024) -> list[bytes]:
    """`n` JPEGs (quality 90) of real photos scaled so the longer side is `longer` px."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.stereo_motorcycle()[0]]
    out = []
    for i in range(n):
        im = Image.fromarray(photos[i % len(photos)])
        scale = longer / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def per_second(fn, items, min_seconds: float = 1.0) -> float:
    """Items per second of `fn` over `items`, repeated until at least `min_seconds` have passed."""
    done, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def bench_decode(jpegs: list[bytes], sizes: list[int]) -> dict:
    results = {}
    for size in sizes:
        spec = ResizeSpec(size, 1333 if size >= 800 else round(size * 1333 / 800), "shorter")

        def ours(data, spec=spec):
            decode_image(data, spec, DecodeLimits())

        def naive(data, spec=spec):
            im = Image.open(io.BytesIO(data)).convert("RGB")
            np.asarray(im.resize(spec.target(*im.size), Image.Resampling.BILINEAR))

        results[str(size)] = {"ours_images_per_s": per_second(ours, jpegs),
                              "naive_pil_images_per_s": per_second(naive, jpegs)}
    return results


def detect_table(jpegs: list[bytes], folder: Path) -> pa.Table:
    refs = []
    for i, data in enumerate(jpegs):
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(data)
        refs.append(str(path))
    chunk = [{"start": s, "end": e, "root_start": s, "root_end": e, "expr_start": s, "expr_end": e,
              "has_conj": False} for s, e in SPANS]
    n = len(refs)
    return pa.table({"key": [f"{i:05d}" for i in range(n)], "caption": [CAPTION] * n, "image_ref": refs,
                     "chunks": pa.array([chunk] * n, pa.list_(CHUNK_TYPE))})


class GpuSampler:
    """Mean GPU utilisation over a block, sampled every 50 ms through NVML (None without pynvml)."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()

    def __enter__(self):
        import torch

        try:
            torch.cuda.utilization()
        except Exception:
            self._thread = None
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        import torch

        while not self._stop.is_set():
            self.samples.append(torch.cuda.utilization())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def bench_detect(jpegs: list[bytes], sizes: list[int], device: str, batch_size: int, compare_loop: bool) -> dict:
    import torch

    from stages.detect import DetectConfig, DetectStage
    from stages.detectors import tiny
    from stages.detectors.config import DetectExecution

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny.hf_grounding_dino(tmp / "gd-tiny-sized", full_size=True)
        table = detect_table(jpegs, tmp)
        for size in sizes:
            config = DetectConfig(backend="hf", hf_model=model, input_size=size,
                                  max_size=1333 if size >= 800 else round(size * 1333 / 800),
                                  )
            stage = DetectStage(config, DetectExecution(device=device, batch_size=batch_size,
                                                        gpus=0 if device == "cpu" else 1))
            stage.setup()
            prepared = stage.prepare_batch(table).output
            runs = {"batched": batch_size}
            if compare_loop:
                runs["one_at_a_time"] = 1
            entry = {}
            for name, bs in runs.items():
                stage.detector.batch_size = bs
                stage.process_batch(prepared.slice(0, min(bs, prepared.num_rows)))  # warm-up
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with GpuSampler() if device.startswith("cuda") else _null() as sampler:
                    start = time.perf_counter()
                    stage.process_batch(prepared)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                entry[name] = {"batch_size": bs, "images_per_s": prepared.num_rows / elapsed,
                               "seconds": elapsed}
                if device.startswith("cuda"):
                    entry[name]["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    entry[name]["mean_gpu_utilisation_pct"] = sampler.mean
            results[str(size)] = entry
    return results


class _null:
    mean = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--sizes", default="320,800", help="detector input sizes (shorter side), comma-separated")
    ap.add_argument("--images", type=int, default=None, help="images per detect run (default 2 cpu, 64 cuda)")
    ap.add_argument("--decode-images", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=None, help="default 2 on cpu, 16 on cuda")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-detect", action="store_true")
    args = ap.parse_args()

    import torch

    cuda = args.device.startswith("cuda")
    sizes = [int(s) for s in args.sizes.split(",")]
    report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if cuda else None}}
    if not args.skip_decode:
        report["decode_1024px_jpeg_one_core"] = bench_decode(realistic_jpegs(args.decode_images), sizes)
        for size, r in report["decode_1024px_jpeg_one_core"].items():
            print(f"decode -> {size:>4} px: ours {r['ours_images_per_s']:7.1f} img/s   "
                  f"naive PIL {r['naive_pil_images_per_s']:7.1f} img/s")
    if not args.skip_detect:
        n = args.images or (64 if cuda else 2)
        bs = args.batch_size or (16 if cuda else 2)
        report["detect_grounding_dino_tiny_sized_random"] = bench_detect(
            realistic_jpegs(n), sizes, args.device, bs, compare_loop=cuda)
        for size, entry in report["detect_grounding_dino_tiny_sized_random"].items():
            for name, r in entry.items():
                extra = ""
                if "peak_gpu_memory_gib" in r:
                    util = r["mean_gpu_utilisation_pct"]
                    extra = f"   peak {r['peak_gpu_memory_gib']:.1f} GiB   util {'n/a' if util is None else f'{util:.0f}%'}"
                print(f"detect @ {size:>4} px {args.device} {name:<13} (batch {r['batch_size']:>2}): "
                      f"{r['images_per_s']:7.2f} img/s{extra}")
    harness.write_figures(report, args.out)


if __name__ == "__main__":
    main()
