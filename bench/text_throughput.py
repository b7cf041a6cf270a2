"""Captions per second of the `chunks` stage against raw spaCy `nlp.pipe` with the same components.

Input: the 2,000 Flickr30k Entities dev sentences (`tests/data/flickr30k_entities_dev_sentences.jsonl`, or `--data PATH`)
repeated to 20,000 captions. Raw: iterate `nlp.pipe` over all captions (the stage's own loaded pipeline, so
the components are identical). Stage: `ChunksStage.process_batch` over an Arrow table in batches of
`run.resources.chunks.batch_size` rows -- Arrow in, noun chunks, filter, expansion, Arrow out. The two are timed in pairs,
batch by batch, alternating which goes first, so that both see the same load on a shared machine; both
wall-clock and process CPU time are reported (CPU time is the steadier one when other work shares the
cores). Target: stage >= 85% of raw.

    python bench/text_throughput.py [--out FILE] [--captions 20000] [--rounds 1] [--profile]
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import harness  # first: this checkout on sys.path, the offline environment
import pyarrow as pa

from stages.chunks import ChunksStage

FLICKR = harness.REPO / "tests" / "data" / "flickr30k_entities_dev_sentences.jsonl"  # --data overrides


def load_captions(n: int, data: Path = FLICKR) -> list[str]:
    sentences = [json.loads(line)["sentence"] for line in data.read_text().splitlines() if line.strip()]
    return [sentences[i % len(sentences)] for i in range(n)]


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def time_raw(stage: ChunksStage, captions: list[str]) -> tuple[float, float]:
    start = clock()
    for _doc in stage.nlp.pipe(captions, batch_size=stage.execution.pipe_batch_size):
        pass
    return since(start)


def time_stage(stage: ChunksStage, table: pa.Table) -> tuple[tuple[float, float], int, int]:
    start = clock()
    result = stage.process_batch(table)
    elapsed = since(start)
    return elapsed, result.output.num_rows, len(result.output.column("chunks").combine_chunks().flatten())


def paired_timings(stage: ChunksStage, captions: list[str], table: pa.Table, rounds: int) -> dict:
    """Raw and stage (wall, CPU) seconds over all captions, measured batch by batch in pairs (alternating
    which goes first) so that both see the same machine load -- the development machine is shared."""
    size = stage.execution.batch_size
    raw = [0.0, 0.0]
    staged = [0.0, 0.0]
    rows = chunks = 0
    for r in range(rounds):
        for b, offset in enumerate(range(0, len(captions), size)):
            texts, batch = captions[offset:offset + size], table.slice(offset, size)
            if (r + b) % 2 == 0:
                raw_t = time_raw(stage, texts)
                stage_t, n_rows, n_chunks = time_stage(stage, batch)
            else:
                stage_t, n_rows, n_chunks = time_stage(stage, batch)
                raw_t = time_raw(stage, texts)
            for acc, t in ((raw, raw_t), (staged, stage_t)):
                acc[0] += t[0] / rounds
                acc[1] += t[1] / rounds
            if r == 0:
                rows, chunks = rows + n_rows, chunks + n_chunks
    return {"raw_wall": raw[0], "raw_cpu": raw[1], "stage_wall": staged[0], "stage_cpu": staged[1],
            "rows": rows, "chunks": chunks}


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--captions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one stage pass")
    parser.add_argument("--data", type=Path, default=FLICKR,
                        help="captions as JSON Lines with a `sentence` field (default: the Flickr30k copy in tests/data)")
    args = parser.parse_args()

    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file (the repository ships tests/data/flickr30k_entities_dev_sentences.jsonl)")
    captions = load_captions(args.captions, args.data)
    table = pa.table({"key": [f"{i:08d}" for i in range(len(captions))], "caption": captions})
    stage = ChunksStage()
    stage.setup()
    stage.process_batch(table.slice(0, 500))  # warm up both paths (first batches allocate)

    t = paired_timings(stage, captions, table, args.rounds)
    n = len(captions)
    figures = {
        "captions": n,
        "raw_captions_per_cpu_s": round(n / t["raw_cpu"], 1),
        "stage_captions_per_cpu_s": round(n / t["stage_cpu"], 1),
        "stage_over_raw_cpu": round(t["raw_cpu"] / t["stage_cpu"], 4),
        "raw_captions_per_s": round(n / t["raw_wall"], 1),
        "stage_captions_per_s": round(n / t["stage_wall"], 1),
        "stage_over_raw_wall": round(t["raw_wall"] / t["stage_wall"], 4),
        "rows_kept": t["rows"],
        "chunks": t["chunks"],
    }
    print(f"{n} captions, spaCy {stage.config.model} with {stage.nlp.pipe_names}, "
          f"batch_size {stage.execution.batch_size}, nlp.pipe batch {stage.execution.pipe_batch_size}, "
          f"mean of {args.rounds} round(s), timed in pairs batch by batch; one process, one core")
    print(f"{'':14}{'captions/CPU-s':>16}{'captions/s (wall)':>19}")
    print(f"{'raw nlp.pipe':14}{figures['raw_captions_per_cpu_s']:>16.0f}{figures['raw_captions_per_s']:>19.0f}")
    print(f"{'ChunksStage':14}{figures['stage_captions_per_cpu_s']:>16.0f}{figures['stage_captions_per_s']:>19.0f}")
    print(f"{'stage / raw':14}{figures['stage_over_raw_cpu']:>16.1%}{figures['stage_over_raw_wall']:>19.1%}"
          "   (target >= 85%; CPU time is the steadier figure on a shared machine)")
    print(f"{t['rows']} rows kept, {t['chunks']} chunks")

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for offset in range(0, table.num_rows, stage.execution.batch_size):
            time_stage(stage, table.slice(offset, stage.execution.batch_size))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)

    harness.write_figures(figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
