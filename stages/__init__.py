"""Pipeline stages: one module per stage, each a `Stage` with a pydantic config and a batch function.

Stages import `schemas` and nothing of the engine: no Ray, no run directory. Each is a pure function over
Arrow batches plus a `setup()` that loads models, so it can be tested and reused without a cluster.
"""
