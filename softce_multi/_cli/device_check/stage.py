"""One stage of the device check, run in a process of its own:
``python -m softce_multi._cli.device_check.stage NAME OUTPUT [--dry-run]``.

A stage runs its parts in order and writes ``{"stage", "results", "errors", "seconds"}`` as
JSON to ``OUTPUT``: an exception in one part is recorded with its traceback and the next part
still runs. A process per stage keeps each stage's device memory its own (torch's and JAX's
allocators hold what they took) and lets the caller stop one that hangs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softce_multi._cli._common import installed
from softce_multi._cli.device_check.plan import Plan, plan_for, torch_device

Part = Callable[[Plan, str, bool], Any]


def _versions(plan: Plan, device: str, dry_run: bool) -> dict[str, Any]:
    """The software and the device this run sees."""
    import importlib.metadata

    import softce_multi

    libraries = (
        "torch",
        "triton",
        "jax",
        "jaxlib",
        "cupy-cuda13x",
        "numpy",
        "array-api-compat",
        "array-api-extra",
        "nemo_automodel",
        "liger_kernel",
        "optax",
    )
    versions: dict[str, Any] = {"python": platform.python_version(), "softce_multi": softce_multi.__version__}
    for name in libraries:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    result: dict[str, Any] = {"versions": versions, "dry_run": dry_run, "device": device}
    if device == "cuda":
        import torch

        properties = torch.cuda.get_device_properties(0)
        result["gpu"] = {
            "name": properties.name,
            "memory_gib": properties.total_memory / 2**30,
            "multiprocessors": properties.multi_processor_count,
            "capability": list(torch.cuda.get_device_capability(0)),
            "cuda": torch.version.cuda,
        }
        query = ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, check=False)
        result["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return result


def _torch_parity(plan: Plan, device: str, dry_run: bool) -> dict[str, Any]:
    from softce_multi._cli.device_check import parity

    rows = []
    for part in (parity.torch_parity, parity.operator_rows, parity.linear_rows, parity.distributed_rows):
        rows += part(plan, device, dry_run)
    return {"parity": rows}


def _jax_parity(plan: Plan, device: str, dry_run: bool) -> dict[str, Any]:
    from softce_multi._cli.device_check.parity_arrays import jax_parity

    return {"parity": jax_parity(plan, device, dry_run)}


def _cupy_parity(plan: Plan, device: str, dry_run: bool) -> dict[str, Any]:
    from softce_multi._cli.device_check.parity_arrays import cupy_parity

    if dry_run:
        return {"parity": [], "skipped": [{"implementation": "cupy", "reason": "dry run: no GPU"}]}
    return {"parity": cupy_parity(plan, device, dry_run)}


def _torch_speed(plan: Plan, device: str, dry_run: bool) -> dict[str, Any]:
    from softce_multi._cli.device_check.speed import torch_speed

    rows, skipped, copy = torch_speed(plan, device, dry_run, installed)
    return {"speed": rows, "skipped": skipped, "copy": copy}


def _hidden(plan: Plan, device: str, dry_run: bool) -> dict[str, Any]:
    from softce_multi._cli.device_check.hidden import linear_speed, targets_speed

    rows, skipped = linear_speed(plan, device, dry_run, installed)
    return {"linear": rows, "targets": targets_speed(plan, device, dry_run), "skipped": skipped}


def _jax_speed(plan: Plan, device: str, dry_run: bool) -> dict[str, Any]:
    from softce_multi._cli.device_check.speed import jax_speed

    rows, skipped = jax_speed(plan, device, dry_run, installed)
    return {"speed": rows, "skipped": skipped}


STAGES: dict[str, Part] = {
    "environment": _versions,
    "torch-parity": _torch_parity,
    "torch-speed": _torch_speed,
    "hidden": _hidden,
    "jax-parity": _jax_parity,
    "jax-speed": _jax_speed,
    "cupy-parity": _cupy_parity,
}
"""The stages in the order the check runs them: the issue's goals first."""


def run_stage(name: str, dry_run: bool) -> dict[str, Any]:
    """Run stage ``name`` and return what it writes."""
    plan = plan_for(dry_run)
    device = torch_device(dry_run)
    start = time.perf_counter()
    errors = []
    results: dict[str, Any] = {}
    try:
        results = STAGES[name](plan, device, dry_run)
    except Exception:  # recorded: the report shows it and the check fails
        errors.append(traceback.format_exc())
    return {
        "stage": name,
        "results": results,
        "errors": errors,
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softce_multi._cli.device_check.stage")
    parser.add_argument("name", choices=list(STAGES))
    parser.add_argument("output", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    report = run_stage(args.name, args.dry_run)
    args.output.write_text(json.dumps(report, indent=1, default=str))
    for error in report["errors"]:
        print(error, file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
