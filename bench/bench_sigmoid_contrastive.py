"""Runs the sigmoid_contrastive_loss benchmark; results go to bench/results/sigmoid_contrastive.{json,md,png}.

Usage: python bench/bench_sigmoid_contrastive.py [--sizes 1024 2048 ...] [--device cuda]
"""

import sys

from mgccl_ops.bench.cli import main

if __name__ == "__main__":
    main(["sigmoid_contrastive", *sys.argv[1:]])
