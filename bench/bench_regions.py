"""Runs the region_merge benchmark; results go to bench/results/regions.{json,md,png}.

Usage: python bench/bench_regions.py [--sizes 64 128 256] [--batch 8] [--skimage-budget 150]
"""

import sys

from mgccl_ops.bench.cli import main

if __name__ == "__main__":
    main(["regions", *sys.argv[1:]])
