"""Saltpeter's benchmarks: speed, scale and soak figures, run with ``benchmarks/run.py``.

They are not part of the test suite. docs/benchmarks.md describes each one and
records the figures.
"""
