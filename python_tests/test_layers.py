"""The package's layers import only downward: ops <- reference <- models/data <- train/evaluate
<- bench <- cli (docs/architecture.md). A module that imports a higher layer fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mgccl_ops"
# Layer of each top-level part of the package; a new part must be placed here.
LAYERS = {
    "__init__": 0, "_extension": 0, "_build_config": 0, "ops": 0, "triton": 0, "distributed": 0,
    "reference": 1, "backends": 1, "nn": 1,
    "models": 2, "data": 2,
    "train": 3, "evaluate": 3,
    "bench": 4,
    "cli": 5,
}  # fmt: skip


def part_of(module: str) -> str:
    """'mgccl_ops.train.step' -> 'train'; 'mgccl_ops' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    """mgccl_ops/train/step.py -> 'mgccl_ops.train.step'; a package's __init__.py -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """Absolute names of the mgccl_ops modules that ``source`` (module ``module``) imports,
    relative imports resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            names += [target] + [f"{target}.{alias.name}" for alias in node.names]
    return [name for name in names if name == "mgccl_ops" or name.startswith("mgccl_ops.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import(path):
    module = module_name(path)
    own = part_of(module)
    assert own in LAYERS, f"mgccl_ops/{own} has no layer: place it in LAYERS and docs/architecture.md"
    imports = imported_modules(path.read_text(), module, path.name == "__init__.py")
    upward = sorted({name for name in imports if LAYERS.get(part_of(name), -1) > LAYERS[own]})
    assert not upward, f"{path.relative_to(PACKAGE)} (layer {own}) imports higher layers: {upward}"


def test_the_check_resolves_relative_and_absolute_imports():
    source = "from ..bench import harness\nfrom . import checkpoint\nimport mgccl_ops.cli\nimport torch\n"
    names = imported_modules(source, "mgccl_ops.train.x", is_package=False)
    assert names == ["mgccl_ops.bench", "mgccl_ops.bench.harness", "mgccl_ops.train", "mgccl_ops.train.checkpoint",
                     "mgccl_ops.cli"]  # fmt: skip
    assert [name for name in names if LAYERS[part_of(name)] > LAYERS["train"]][:1] == ["mgccl_ops.bench"]
