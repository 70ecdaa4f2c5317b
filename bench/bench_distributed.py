"""Runs the distributed benchmark (ring vs gather); results go to bench/results/distributed.{json,md,png}.

Usage: python bench/bench_distributed.py [--worlds 2 4] [--batches 512 1024 2048 4096 8192] [--device cpu]
"""

import sys

from mgccl_ops.bench.cli import main

if __name__ == "__main__":
    main(["distributed", *sys.argv[1:]])
