"""Data files shipped with grit-pipeline: the bundled demo sample (`demo/`) and the script that builds it."""
