"""regtune's benchmarks. Run them from the repository root as modules, e.g. `python -m bench.perf --help`.

Shared pieces: `bench._common` (the offline MiniLM model, the machine description). Accuracy comparisons run through
the experiment engine (`regtune run recipes/...`), not through scripts here.
"""
