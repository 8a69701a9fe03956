"""Benchmarks of wsss-dist: run from the repository root as ``python -m bench.<name>`` (docs/performance.md).

They print their figures and write them as JSON to ``bench/out/<name>.json`` (or ``--json PATH``); shared helpers
live in :mod:`bench.common`. The tests never import this package.
"""
