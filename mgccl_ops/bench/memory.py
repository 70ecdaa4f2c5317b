"""Subprocess entry of the peak-memory measurement: ``python -m mgccl_ops.bench.memory FACTORY PARAMS DEVICE``.

Prints the peak extra memory of one step in MiB on its last line.
"""

import json
import sys

from mgccl_ops.bench.harness import measure_peak_here

if __name__ == "__main__":
    factory_path, params, device = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    print(measure_peak_here(factory_path, params, device))
