"""The run directory (DESIGN.md "Run directory"): what a run keeps on fsspec storage, and how it gets there.

- `store`: `RunDir`, the paths of a run, atomic writes (one PUT, or `_tmp/` + rename), commit markers,
  listings and reads of stage outputs;
- `conditional_write`: compare-and-swap on one small file (S3 `If-Match`/`If-None-Match`, a lock on disk);
- `lease`: one `grit run` writes into a run directory at a time;
- `runlog`: the run's log (`logs/`) and its shard failures (`failures.jsonl`).

May import `schemas`, `stages` and the base modules of `grit_pipeline` (`config`, `logs`, `version`);
never the engine, the commands, the CLI or Ray. Everything above it reads and writes runs through it.
"""
