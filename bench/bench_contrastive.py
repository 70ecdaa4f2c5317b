"""Runs the contrastive_loss benchmark; results go to bench/results/contrastive.{json,md,png}.

Usage: python bench/bench_contrastive.py [--sizes 1024 2048 ...] [--device cuda]
"""

import sys

from mgccl_ops.bench.cli import main

if __name__ == "__main__":
    main(["contrastive", *sys.argv[1:]])
