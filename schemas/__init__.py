"""Data contracts of grit-pipeline.

This package imports nothing else of the project. It holds the pyarrow schema of every stage's output
(`tables`), pydantic row models (`rows`), the Kosmos-2 location tokens (`location`) and the grounded-text
formats: Kosmos-2 tags and the Markdown-link view (`grounded_text`), the one box check every stage uses
(`boxes`), and the escaping of untrusted text before anything shows it (`display`).
"""
