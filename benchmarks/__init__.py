"""fgray's benchmarks: `python benchmarks/run.py --preset cpu|gpu` (see benchmarks/RESULTS.md)."""
