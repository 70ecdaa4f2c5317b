"""Benchmark harness: timing, peak memory and reports shared by every op's benchmark.

``mgccl bench <name>`` and the scripts in ``bench/`` run the cases defined in this package's
modules (``contrastive`` ...); each case module exposes ``run(args) -> list[dict]``.
"""
