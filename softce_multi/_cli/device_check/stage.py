"""One stage of the device check, run in a process of its own:
``python -m softce_multi._cli.device_check.stage NAME OUTPUT [--dry-run]``.

A stage runs its parts in order and writes ``{"stage", "results", "errors", "seconds"}`` as
JSON to ``OUTPUT`` at every result: an exception in one part is recorded with its traceback and
the next part still runs, and a stage stopped at its time limit leaves what it had done. A
process per stage keeps each stage's device memory its own (torch's and JAX's allocators hold
what they took) and lets the caller stop one that hangs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from softce_multi._cli._common import installed
from softce_multi._cli.device_check.plan import Plan, Record, plan_for, torch_device

Part = Callable[[Plan, str, bool, Record], None]


def _versions(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
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
    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "softce_multi": softce_multi.__version__,
    }
    for name in libraries:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    record("versions", versions)
    if device == "cuda":
        import torch

        properties = torch.cuda.get_device_properties(0)
        record(
            "gpu",
            {
                "name": properties.name,
                "memory_gib": properties.total_memory / 2**30,
                "multiprocessors": properties.multi_processor_count,
                "capability": list(torch.cuda.get_device_capability(0)),
                "cuda": torch.version.cuda,
            },
        )
        query = [
            "nvidia-smi",
            "--query-gpu=driver_version,clocks.sm,clocks.mem",
            "--format=csv,noheader",
        ]
        done = subprocess.run(query, capture_output=True, text=True, check=False)
        record("nvidia_smi", done.stdout.strip() or done.stderr.strip())


def _resources(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
    from softce_multi._cli.device_check.resources import kernel_resources

    record("resources", kernel_resources())


def _rows_of(part: Callable[[Plan, str, bool], Iterator[dict[str, Any]]], key: str) -> Part:
    """The part that records each row ``part(plan, device, dry_run)`` yields under ``key``, as
    it comes."""

    def run(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
        for row in part(plan, device, dry_run):
            record(key, [row])

    return run


def _parity_parts() -> tuple[Part, ...]:
    from softce_multi._cli.device_check.parity import (
        compiled_rows,
        distributed_rows,
        linear_rows,
        operator_rows,
        torch_parity,
    )

    parts = (torch_parity, operator_rows, compiled_rows, linear_rows, distributed_rows)
    return tuple(_rows_of(part, "parity") for part in parts)


def _jax_parity_parts() -> tuple[Part, ...]:
    from softce_multi._cli.device_check.parity_arrays import jax_distributed_rows, jax_parity

    return (_rows_of(jax_parity, "parity"), _rows_of(jax_distributed_rows, "parity"))


def _cupy_parity(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
    from softce_multi._cli.device_check.parity_arrays import cupy_parity

    if dry_run:
        record("skipped", [{"implementation": "cupy", "reason": "dry run: no GPU"}])
        return
    _rows_of(cupy_parity, "parity")(plan, device, dry_run, record)


def _torch_speed(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
    from softce_multi._cli.device_check.speed import copy_bandwidth, kernel_modes, torch_speed

    record("copy", copy_bandwidth(plan, device))
    kernel_modes(plan, device, dry_run, record)  # quick: before the compilations of the peers
    torch_speed(plan, device, dry_run, installed, record)


def _linear(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
    from softce_multi._cli.device_check.hidden import linear_speed

    linear_speed(plan, device, dry_run, installed, record)


def _targets(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
    from softce_multi._cli.device_check.hidden import targets_speed

    record("targets", targets_speed(plan, device, dry_run))


def _jax_speed(plan: Plan, device: str, dry_run: bool, record: Record) -> None:
    from softce_multi._cli.device_check.speed import jax_speed

    jax_speed(plan, device, dry_run, installed, record)


STAGES: dict[str, Callable[[], tuple[Part, ...]]] = {
    "environment": lambda: (_versions,),
    "resources": lambda: (_resources,),
    "torch-parity": _parity_parts,
    "torch-speed": lambda: (_torch_speed,),
    "hidden": lambda: (_linear, _targets),
    "jax-parity": _jax_parity_parts,
    "jax-speed": lambda: (_jax_speed,),
    "cupy-parity": lambda: (_cupy_parity,),
}
"""Each stage's parts, in the order the check runs the stages: the issue's goals first."""


class Recorder:
    """A stage's results and errors, written to ``path`` as JSON at every change, so that what
    a stage stopped at its time limit had done is kept."""

    def __init__(self, name: str, path: Path) -> None:
        self.path = path
        self.report: dict[str, Any] = {"stage": name, "results": {}, "errors": []}
        self.start = time.perf_counter()

    def record(self, key: str, value: Any) -> None:
        results = self.report["results"]
        if isinstance(value, list):
            results.setdefault(key, []).extend(value)
        else:
            results[key] = value
        self.write()

    def error(self, text: str) -> None:
        self.report["errors"].append(text)
        self.write()

    def write(self) -> None:
        """Replace the file at once, so that a stage stopped while writing leaves it whole."""
        self.report["seconds"] = time.perf_counter() - self.start
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.report, indent=1, default=str))
        os.replace(partial, self.path)


def run_stage(name: str, output: Path, dry_run: bool) -> dict[str, Any]:
    """Run the parts of stage ``name`` in turn, recording to ``output``; return what it wrote.

    A part that raises is recorded with its traceback, and the next part runs.
    """
    plan = plan_for(dry_run)
    device = torch_device(dry_run)
    recorder = Recorder(name, output)
    recorder.write()
    for part in STAGES[name]():
        try:
            part(plan, device, dry_run, recorder.record)
        except Exception:  # recorded: the report shows it and the check fails
            recorder.error(traceback.format_exc())
    recorder.write()
    return recorder.report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softce_multi._cli.device_check.stage")
    parser.add_argument("name", choices=list(STAGES))
    parser.add_argument("output", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    report = run_stage(args.name, args.output, args.dry_run)
    for error in report["errors"]:
        print(error, file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
