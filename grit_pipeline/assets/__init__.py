"""Data shipped with grit-pipeline and made from it: the bundled demo sample (`demo/`), the script that builds
it, and `synthetic`, the generator of img2dataset-format inputs with replay detections for tests and benchmarks.
Imports nothing of the project above `schemas` and `stages`."""
