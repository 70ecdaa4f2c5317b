"""Runs the training_step benchmark; results go to bench/results/training_step.{json,md,png}.

Usage: python bench/bench_training_step.py [--checkpoint runs/demo/full/checkpoint.pt] [--batches 16 32 64]
"""

import sys

from mgccl_ops.bench.cli import main

if __name__ == "__main__":
    main(["training_step", *sys.argv[1:]])
