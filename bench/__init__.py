"""Benchmarks for subspace-ops: ``python -m bench`` (CLI report, see bench/cli.py) and
pytest-benchmark files (``pytest bench --benchmark-only``). Results are committed under bench/results/.
"""
