"""The engine: turning a plan into committed stage outputs and published final shards, on Ray.

- `plan`: sources, selected shards, fingerprints, what is cached (`build_plan`);
- `fingerprint`: the cache keys of stage outputs;
- `runner`: `execute(plan)`, the entry point the CLI and the API call (lease, log, Ray, scheduler, summary);
- `scheduler`: the streaming driver, every stage at once over the shards;
- `ray_runtime`: Ray start-up, fitting workers to the cluster, the remote tasks and actors;
- `shard_work`, `stage_io`: the worker side, one stage over one shard, and the stage contract checks;
- `publish`: final shards in shard order, one row per key, and the publish ledger; `key_index`: the
  publisher's index of published keys (sorted runs on disk, one filter in memory); `card`: the final
  shards' metadata and dataset card;
- `stats`, `summary`: per-shard statistics and the run's merged summary;
- `stopping`: Ctrl-C and SIGTERM.

May import `schemas`, `stages`, the base modules of `grit_pipeline` and `grit_pipeline.rundir`; never
the commands, the report, the trainer, the CLI or the API. Only `ray_runtime` and `scheduler` (and
`runner` through them) import Ray, inside functions; no module here imports a model library.
"""
