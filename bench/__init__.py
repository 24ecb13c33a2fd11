"""regtune's benchmarks. Run them from the repository root as modules, e.g. `python -m bench.base_to_novel --help`.

Shared pieces: [`bench.data`] (the text data sets under /work/shared/data), [`bench.results`] (one results writer:
JSON + markdown + optional plot) and `bench._common` (the offline MiniLM model, the machine description).
"""
