"""The commands that read a run, finished or running, and the ones around the pipeline.

- `status`, `status_cli`: `grit status`, how far a run is, from any machine;
- `validate`: `grit validate`, every final shard against the GRIT schema and its invariants;
- `stats`: the merged funnel as a terminal table (`grit stats`, the end of `grit run`);
- `download`: `grit download`, img2dataset for LAION / COYO / GRIT-20M url lists (before the pipeline);
- `options`: the typer options several commands share (`--json`, the run directory argument).

May import `schemas`, `stages`, the base modules of `grit_pipeline`, `grit_pipeline.rundir` and
`grit_pipeline.engine`. The report (`grit_pipeline.report`) and the trainer (`grit_pipeline.train`) sit
on the same level; the CLI, the API and the demo sit above them all.
"""
