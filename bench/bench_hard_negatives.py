"""Runs the hard_negatives benchmark; results go to bench/results/hard_negatives.{json,md,png}.

Usage: python bench/bench_hard_negatives.py [--sizes 4096 8192 ...] [--nums 16 128] [--providers mgccl faiss ...]
"""

import sys

from mgccl_ops.bench.cli import main

if __name__ == "__main__":
    main(["hard_negatives", *sys.argv[1:]])
