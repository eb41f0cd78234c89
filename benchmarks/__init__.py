"""Benchmark suite for untangle_ext: estimation and attribution throughput, GEMM fraction, peak RSS.

Run ``python -m benchmarks`` (or ``untangle-ext bench`` / ``make bench``) from the repository root;
see ``benchmarks/README.md``.
"""
