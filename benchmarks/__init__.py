"""Benchmarks for stacchip: an Earth-Search-shaped Sentinel-2 scene builder
(:mod:`benchmarks.scene`) and the throughput report (:mod:`benchmarks.run`).

Run with ``python -m benchmarks.run --cache DIR [--quick]`` from the repository root.
"""
