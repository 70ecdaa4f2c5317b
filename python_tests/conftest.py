"""Shared pytest set-up: the GPU marker and hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where none is present")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")
    config.addinivalue_line(
        "markers", "peak_memory: measures peak memory; skipped under sanitizers (MGCCL_SANITIZER=1)"
    )


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    # AddressSanitizer's quarantine and shadow memory inflate every peak (scripts/sanitize.sh).
    skip_memory = pytest.mark.skip(reason="peak memory is not meaningful under a sanitizer")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "peak_memory" in item.keywords and os.environ.get("MGCCL_SANITIZER"):
            item.add_marker(skip_memory)
