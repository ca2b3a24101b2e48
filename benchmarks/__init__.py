"""The ctflow benchmark suite (run from the repository root: ``python -m benchmarks``)."""
