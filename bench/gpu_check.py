"""The Python steps of bench/gpu_check.sh (standard library only, so they run before the build).

python bench/gpu_check.py env OUT_JSON
    the machine: python, torch, triton, CUDA, nvcc and the GPU -> OUT_JSON
python bench/gpu_check.py wheels DIR OUT_JSON TARGET (--check-only | --install)
    checks every wheel of DIR (a valid wheel archive with metadata, tags compatible with this
    Python); with --install unpacks the compatible ones into TARGET (pip --no-index --no-deps
    --target), never torch, triton or nvidia-* wheels; the report -> OUT_JSON
python bench/gpu_check.py summary OUT_DIR [--dry-run]
    OUT_DIR/summary.json and summary.md from the step records, the test report and the
    benchmark tables
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

# Package -> the distributions that provide it.
DISTRIBUTIONS = {
    "torch": ["torch"],
    "triton": ["triton", "pytorch-triton"],
    "numpy": ["numpy"],
    "cupy": ["cupy-cuda13x", "cupy-cuda12x", "cupy"],
    "faiss": ["faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss-cpu"],
    "inf_cl": ["inf-cl", "inf_cl"],
    "open_clip": ["open-clip-torch", "open_clip_torch"],
    "scikit-build-core": ["scikit-build-core"],
    "pybind11": ["pybind11"],
    "cmake": ["cmake"],
    "ninja": ["ninja"],
}
NEVER_INSTALLED = re.compile(r"^(torch|triton|nvidia[_-]|pytorch[_-]triton)", re.IGNORECASE)


def command_output(argv: list[str]) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    facts: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package, distributions in DISTRIBUTIONS.items():
        facts[package] = None
        for distribution in distributions:
            try:
                facts[package] = f"{distribution} {importlib.metadata.version(distribution)}"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    try:
        import torch

        facts["torch_cuda"] = torch.version.cuda
        facts["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            facts["gpu"] = properties.name
            facts["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
            major, minor = torch.cuda.get_device_capability(0)
            facts["capability"] = f"{major}.{minor}"
    except ImportError as error:
        facts["torch_error"] = str(error)
    nvcc = command_output(["nvcc", "--version"])
    facts["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    facts["nvidia_smi"] = command_output(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    )
    facts["cpus"] = command_output(["nproc"])
    return facts


def wheel_tags_compatible(name: str) -> bool | None:
    """Whether the wheel's tags suit this interpreter (None if ``packaging`` is not importable)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return None
    supported = set(sys_tags())
    return any(tag in supported for tag in parse_wheel_filename(name)[3])


def check_wheel(path: Path) -> dict:
    entry: dict = {"file": path.name, "skipped": None, "problem": None}
    if NEVER_INSTALLED.match(path.name):
        entry["skipped"] = "never installed (the machine's own torch/triton/CUDA libraries stay)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith(".dist-info/METADATA") for n in archive.namelist()):
                entry["problem"] = "no .dist-info/METADATA: not a wheel"
    except zipfile.BadZipFile:
        entry["problem"] = "not a zip archive"
    entry["compatible"] = wheel_tags_compatible(path.name)
    if entry["compatible"] is False and not entry["skipped"]:
        entry["skipped"] = "tags do not suit this Python"
    return entry


def wheels(folder: Path, out_json: Path, target: Path, install: bool) -> int:
    if not folder.is_dir():
        print(f"wheel folder {folder} does not exist", file=sys.stderr)
        out_json.write_text(json.dumps({"folder": str(folder), "error": "missing"}, indent=2))
        return 1
    entries = [check_wheel(path) for path in sorted(folder.glob("*.whl"))]
    problems = [e for e in entries if e["problem"]]
    chosen = [folder / e["file"] for e in entries if not e["problem"] and not e["skipped"]]
    for entry in entries:
        state = entry["problem"] or entry["skipped"] or ("install" if install else "would install")
        print(f"{entry['file']}: {state}")
    report = {"folder": str(folder), "wheels": entries, "installed": False}
    status = 1 if problems else 0
    if install and chosen:
        target.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--no-index", "--no-deps"]
        result = subprocess.run([*pip, "--upgrade", "--target", str(target), *map(str, chosen)])
        report["installed"] = result.returncode == 0
        status = status or result.returncode
    out_json.write_text(json.dumps(report, indent=2))
    return status


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def test_report(xml_path: Path) -> dict | None:
    """Counts and the failed tests' names and first message lines from pytest's JUnit XML."""
    if not xml_path.is_file():
        return None
    root = ElementTree.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["seconds"] = float(suite.get("time", 0))
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            problem = case.find(kind)
            if problem is not None:
                message = (problem.get("message") or "").splitlines()[0][:300]
                failed.append(
                    {"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind, "message": message}
                )
    counts["failed"] = failed
    return counts


def summary(out_dir: Path, dry_run: bool) -> int:
    steps = [json.loads(line) for line in (out_dir / "steps.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "mode": "dry run" if dry_run else "GPU run",
        "environment": read_json(out_dir / "env.json", {}),
        "build_info": read_json(out_dir / "build_info.json", None),
        "wheels": read_json(out_dir / "wheels.json", None),
        "steps": steps,
        "tests": test_report(out_dir / "pytest.xml"),
        "benchmarks": sorted(p.stem for p in (out_dir / "bench").glob("*.json")),
        "passed": all(step["rc"] == 0 for step in steps),
    }
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2))

    env = result["environment"]
    lines = [
        f"# mgccl_ops GPU check ({result['mode']}): {'passed' if result['passed'] else 'FAILED'}",
        "",
        f"GPU {env.get('gpu')} (capability {env.get('capability')}, {env.get('gpu_memory_gib')} GiB); "
        f"Python {env.get('python')}, {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"{env.get('triton')}, nvcc: {env.get('nvcc')}; peers: {env.get('faiss')}, {env.get('inf_cl')}, "
        f"{env.get('open_clip')}, {env.get('cupy')}.",
        "",
        "| step | exit | seconds | timeout s |",
        "|---|---|---|---|",
        *(f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['timeout_s']} |" for s in steps),
        "",
    ]
    if result["build_info"]:
        info = result["build_info"]
        lines += [f"Built: torch {info.get('torch_version')}, CUDA {info.get('cuda_version')}, "
                  f"archs {info.get('cuda_archs')}.", ""]  # fmt: skip
        table = info.get("device_table") or {}
        if table:
            lines += ["| operator | CPU | CUDA |", "|---|---|---|"]
            lines += [f"| `{op}` | {o.get('cpu') or '—'} | {o.get('cuda') or '—'} |" for op, o in table.items()]
            lines.append("")
    wheels_report = result["wheels"] or {}
    if wheels_report.get("wheels"):
        lines += ["Wheels: " + ", ".join(f"{w['file']} ({w['problem'] or w['skipped'] or 'ok'})"
                                         for w in wheels_report["wheels"]), ""]  # fmt: skip
    tests = result["tests"]
    if tests:
        lines += [
            f"Tests (-m gpu): {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped, {tests['seconds']:.0f} s.",
            "",
            *(f"- {f['kind']}: `{f['test']}`: {f['message']}" for f in tests["failed"]),
            "",
        ]
    for name in result["benchmarks"]:
        table_path = out_dir / "bench" / f"{name}.md"
        if table_path.is_file():
            lines += ["", table_path.read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1)]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    env_parser = commands.add_parser("env")
    env_parser.add_argument("out_json", type=Path)
    wheels_parser = commands.add_parser("wheels")
    wheels_parser.add_argument("folder", type=Path)
    wheels_parser.add_argument("out_json", type=Path)
    wheels_parser.add_argument("target", type=Path)
    mode = wheels_parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check-only", action="store_true")
    mode.add_argument("--install", action="store_true")
    summary_parser = commands.add_parser("summary")
    summary_parser.add_argument("out_dir", type=Path)
    summary_parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.command == "env":
        facts = environment()
        args.out_json.write_text(json.dumps(facts, indent=2))
        print(json.dumps(facts, indent=2))
        return 0 if shutil.which("nvcc") else 1
    if args.command == "wheels":
        return wheels(args.folder, args.out_json, args.target, args.install)
    return summary(args.out_dir, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
