"""Runs the multi_grained benchmark; results go to bench/results/multi_grained.{json,md,png}.

Usage: python bench/bench_multi_grained.py [--batches 64 128 256] [--hard-negatives 0 16]
"""

import sys

from mgccl_ops.bench.cli import main

if __name__ == "__main__":
    main(["multi_grained", *sys.argv[1:]])
