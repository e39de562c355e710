"""Benchmark of streamconv against a plain file copy and onnx's own conversion paths.

``python -m bench.run`` writes inline models of several sizes (and graph-heavy
models with many small nodes), times every tool on each as a separate process,
and saves a table, a CSV and a figure under ``bench/results/``.

This package is imported by the tiny worker processes it times
(``python -m bench.copyrange``), so it imports nothing itself.
"""
