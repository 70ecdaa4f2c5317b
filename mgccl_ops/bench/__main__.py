"""``python -m mgccl_ops.bench NAME [options]``."""

from mgccl_ops.bench.cli import main

main()
