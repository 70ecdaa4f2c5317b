"""Writes benchmark rows as JSON, a Markdown table and a PNG plot, side by side per provider."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

# The timing columns of a table (median, 20th and 80th percentiles) and the usual plot panels.
TIME_COLUMNS = (("time ms (median)", "time_ms.median"), ("p20", "time_ms.p20"), ("p80", "time_ms.p80"))
TIME_AND_MEMORY_PANELS = (("time (ms)", "time_ms.median"), ("peak memory (MiB)", "peak_mem_mib"))


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (header, key) pairs; a key may be dotted ("time_ms.median"). Floats get 4 significant digits."""

    def cell(row: dict, key: str) -> str:
        value: object = row
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, key) for _, key in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], x_key: str, panels: Sequence[tuple[str, str]], title: str, path: Path) -> None:
    """One log-log panel per (label, dotted key); one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    providers = sorted({row["provider"] for row in rows}, key=[row["provider"] for row in rows].index)
    for axis, (label, key) in zip(axes, panels):
        for provider in providers:
            points = []
            for row in rows:
                value: object = row
                for part in key.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                if row["provider"] == provider and value is not None:
                    points.append((row["params"][x_key], value))
            if points:
                xs, ys = zip(*sorted(points))
                axis.plot(xs, ys, marker="o", label=provider)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(x_key)
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    temp = path.with_suffix(".tmp.png")
    figure.savefig(temp, dpi=110)
    plt.close(figure)
    os.replace(temp, path)


def add_ratios(row: dict, time_baseline: dict | None, time_key: str, memory_baseline: dict | None) -> None:
    """Adds ``row[time_key]`` (the row's median time over ``time_baseline``'s) and
    ``memory_saving`` (``memory_baseline``'s peak memory over the row's), each where its baseline
    row is given (and, for memory, both peaks are known and non-zero)."""
    if time_baseline is not None:
        row[time_key] = row["time_ms"]["median"] / time_baseline["time_ms"]["median"]
    if memory_baseline is not None and row["peak_mem_mib"] and memory_baseline["peak_mem_mib"]:
        row["memory_saving"] = memory_baseline["peak_mem_mib"] / row["peak_mem_mib"]


def add_ratios_to_pytorch(rows: Sequence[dict], size_key: str) -> None:
    """Adds ``time_vs_pytorch`` and ``memory_saving`` to each row, relative to the row of provider
    ``"pytorch <settings>"`` with the same ``params[size_key]``, where a row's provider is
    ``"<name> <settings>"``."""
    by_key = {(row["provider"], row["params"][size_key]): row for row in rows}
    for row in rows:
        settings = row["provider"].split(" ", 1)[1]
        baseline = by_key.get((f"pytorch {settings}", row["params"][size_key]))
        add_ratios(row, baseline, "time_vs_pytorch", baseline)


def write_report(
    rows: Sequence[dict],
    out_dir: Path,
    name: str,
    title: str,
    columns: Sequence[tuple[str, str]],
    x_key: str,
    panels: Sequence[tuple[str, str]] = TIME_AND_MEMORY_PANELS,
    notes: str = "",
) -> None:
    """Writes ``out_dir/name.json``, ``name.md`` (title, notes, table) and ``name.png``."""
    out_dir = Path(out_dir)
    write_atomic(out_dir / f"{name}.json", json.dumps(list(rows), indent=2).encode())
    text = f"# {title}\n\n{notes}\n\n" + markdown_table(rows, columns)
    write_atomic(out_dir / f"{name}.md", text.encode())
    plot(rows, x_key, panels, title, out_dir / f"{name}.png")
