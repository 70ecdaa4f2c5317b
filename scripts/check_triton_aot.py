#!/usr/bin/env python
"""Compiles every Triton kernel configuration ahead of time for sm_80 and sm_90 and checks it.

For each module named in ``mgccl_ops.triton.KERNELS``, every entry of its ``AOT_CONFIGS``
(kernel, signature, constexprs, num_warps, num_stages and optionally maxnreg) is compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` on this machine (no GPU needed). ``cuobjdump -res-usage`` (shipped
in triton's backends/nvidia/bin) reports the cubin's registers, stack and local memory; Triton's
metadata gives the shared memory it asks for at launch. The script prints one line per
(config, arch, specialisation) and exits 1 if any compile fails, any kernel uses local memory or
stack (register spills) or asks for more shared memory than the architecture allows per block.

Each configuration is compiled under the two argument specialisations the JIT can apply at
launch, given that the host code pads D to a multiple of 16 and hands over 16-byte aligned
tensors: "aligned-D" (aligned pointers, D % 16 == 0) and "aligned" (also N % 16 == 0 and
M % 16 == 0). Sizes equal to 1, which the JIT turns into constants, only simplify the code and
are not compiled separately.

Usage: python scripts/check_triton_aot.py [--arch 80 90] [--jobs 2] [-k substring]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Largest shared memory one block may use (opt-in), bytes: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SPECIALISATIONS = ("aligned-D", "aligned")


def cuobjdump_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def load_configs() -> list[tuple[str, int, dict]]:
    """(module, index, config) for every AOT config of every kernel module."""
    from mgccl_ops import triton as kernels

    configs = []
    for module_name in kernels.modules():
        module = importlib.import_module(module_name)
        for index, config in enumerate(module.AOT_CONFIGS):
            configs.append((module_name, index, config))
    return configs


def hint_attrs(config: dict, specialisation: str) -> dict:
    """``tt.divisibility`` attributes the JIT would attach for this specialisation."""
    names = list(config["signature"])
    divisible_ints = {"D"} if specialisation == "aligned-D" else {"N", "M", "D"}
    attrs = {}
    for index, name in enumerate(names):
        kind = config["signature"][name]
        if kind.startswith("*") or (kind == "i32" and name in divisible_ints):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def describe(config: dict) -> str:
    constexprs = config["constexprs"]
    flags = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())
    dtype = config["signature"]["Q"][1:]
    return f"{config['kernel'].__name__}[{dtype}; {flags}; warps={config['num_warps']}, stages={config['num_stages']}]"


def parse_resource_usage(text: str) -> dict:
    """REG, STACK, SHARED, LOCAL of the (single) function in ``cuobjdump -res-usage`` output."""
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        if match is None:
            raise RuntimeError(f"cuobjdump output lacks {key}:\n{text}")
        usage[key] = int(match.group(1))
    return usage


def check_one(module_name: str, index: int, arch: int, specialisation: str) -> dict:
    """Compiles one configuration; returns its description, resource usage and any problems."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = importlib.import_module(module_name).AOT_CONFIGS[index]
    result = {"name": describe(config), "arch": arch, "specialisation": specialisation, "problems": []}
    source = ASTSource(
        config["kernel"], config["signature"], constexprs=config["constexprs"], attrs=hint_attrs(config, specialisation)
    )
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    if config.get("maxnreg") is not None:
        options["maxnreg"] = config["maxnreg"]
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as error:  # report every failing config, not only the first
        result["problems"].append(f"compile failed: {type(error).__name__}: {str(error).splitlines()[0]}")
        return result
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run(
            [str(cuobjdump_path()), "-res-usage", cubin.name], capture_output=True, text=True, check=True
        )
    usage = parse_resource_usage(dump.stdout)
    usage["DYNAMIC_SHARED"] = compiled.metadata.shared
    result["usage"] = usage
    if usage["LOCAL"] > 0 or usage["STACK"] > 0:
        result["problems"].append(f"register spills: local {usage['LOCAL']} B, stack {usage['STACK']} B per thread")
    shared = usage["SHARED"] + usage["DYNAMIC_SHARED"]
    if shared > SHARED_LIMIT[arch]:
        result["problems"].append(f"shared memory {shared} B > sm_{arch} limit {SHARED_LIMIT[arch]} B")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    parser.add_argument("-k", default="", help="only configs whose description contains this")
    args = parser.parse_args(argv)

    tasks = [
        (module_name, index, arch, specialisation)
        for module_name, index, config in load_configs()
        if args.k in describe(config)
        for arch in args.arch
        for specialisation in SPECIALISATIONS
    ]
    if not tasks:
        print("no Triton kernel configurations selected", file=sys.stderr)
        return 1
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(check_one, *zip(*tasks)):
            usage = result.get("usage")
            figures = (
                f"regs {usage['REG']:3d}  local {usage['LOCAL']}  stack {usage['STACK']}  "
                f"shared {usage['SHARED'] + usage['DYNAMIC_SHARED']:6d} B"
                if usage
                else "-"
            )
            status = "FAIL " + "; ".join(result["problems"]) if result["problems"] else "ok"
            print(f"sm_{result['arch']} {result['specialisation']:9s} {figures}  {result['name']}  {status}")
            failures += bool(result["problems"])
    print(f"{len(tasks)} compiles, {failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
