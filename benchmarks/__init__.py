"""Benchmarks of the MiCo package; `python -m benchmarks` runs them all (see benchmarks/run_all.py)."""
