"""Benchmarks of nngeo_ops against its peers (not part of the library; never imported by it).

``python -m benchmarks [--quick] [--out DIR]`` runs every benchmark of this folder (see
``benchmarks/__main__.py``); ``benchmarks/harness.py`` is the paired-ratio harness the curvature
benchmark uses; ``benchmarks/README.md`` has the tables and their reading.
"""
