"""Reference trainer: a tiny Kosmos-2-style grounded language model trained on GrIT shards.

Where it sits: after the pipeline. It reads the final `<run>/grit/shard-*.parquet` shards (or shards from
`grit synth`), streams them through fsspec, trains a small vision encoder + causal decoder on the
Kosmos-2 grounded text (`<grounding><phrase> a dog</phrase><object><patch_index_a><patch_index_b></object>`)
and evaluates phrase grounding. It proves the shards are consumable and is a starting point for users.

Modules: `vocab` (tags and location tokens), `tokenizer`, `images` (finding a row's pixels), `dataset`
(streaming, sharded, shuffled), `model`, `config`, `checkpoint`, `trainer`, `evaluate`, `synth`
(procedural GrIT shards), `export` (Hugging Face Kosmos-2 fine-tuning rows), `choices` (the fixed value
sets the settings and the CLI share), `commands` (CLI).
"""
