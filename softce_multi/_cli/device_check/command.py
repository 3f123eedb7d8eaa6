"""The command line of ``python -m softce_multi device-check``: its options, the stages run
each in a process with a time limit from one budget, the tests after them, and what it writes
and prints."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

from softce_multi._cli._common import TORCH_CPU_INSTALL, installed, output_folder, positive_int
from softce_multi._cli.device_check.plan import plan_for
from softce_multi._cli.device_check.report import draw, goals, summary, tables
from softce_multi._cli.device_check.speed import add_copy_fractions, add_ratios, headline_shape

REPOSITORY = Path(__file__).resolve().parents[3]
"""The folder that holds the imported package: the root of a checkout of the repository, whose
``tests/`` the check runs, or, for an installed package, its ``site-packages``."""
TRITON = "triton==3.9.0"
"""The Triton release the dry run asks for when Triton is missing: the one beside torch 2.13."""
STAGE_LIMIT_S = {
    "environment": 30,
    "resources": 60,
    "torch-parity": 150,
    "torch-speed": 150,
    "hidden": 60,
    "jax-parity": 75,
    "jax-speed": 75,
    "cupy-parity": 40,
}
"""Each stage of :mod:`.stage` (run as ``python -m softce_multi._cli.device_check.stage``, so
not imported here) and the most seconds it may take (less when the budget has less left)."""
BENCH_OPTIONS = ("--dtypes", "bfloat16", "--repeats", "3", "--no-memory")
"""``bench`` beside the stages: bf16, 3 rounds, no memory (the speed stage measures memory)."""
GPU_TESTS = "cuda or gpu or cupy or triton or pallas"
"""The ``-k`` expression of the suite's tests of the GPU backends: those parametrized over
``torch-cuda``, ``jax-gpu`` or ``cupy``, the CUDA tests, and the tests of the Triton and Pallas
kernels (compiled on a GPU, interpreted on the CPU). The rest runs in CI on the CPU."""
PYTEST = ("-m", "pytest", "-q", "-p", "no:cacheprovider")


class Command(NamedTuple):
    """A command run beside the stages: its arguments to Python on the GPU and in a dry run,
    and the most seconds it may take."""

    gpu: tuple[str, ...]
    dry_run: tuple[str, ...]
    limit: float


CUDA_TESTS = (*PYTEST, "tests/test_cuda.py")
SUITE = (*PYTEST, "-n", "8", "--dist", "loadfile", "-k", GPU_TESTS, "tests")
TESTS: dict[str, Command] = {
    "cuda tests": Command(CUDA_TESTS, CUDA_TESTS, 60),
    "check": Command(
        ("-m", "softce_multi", "check", "--backend", "torch-cuda", "jax-gpu", "cupy"),
        ("-m", "softce_multi", "check", "--shape", "2", "8", "64", "--backend", "torch-cpu"),
        40,
    ),
    "bench": Command(
        ("-m", "softce_multi", "bench", "--device", "cuda", "--lengths", "4096", *BENCH_OPTIONS),
        ("-m", "softce_multi", "bench", "--lengths", "16", "--vocab", "64", *BENCH_OPTIONS),
        60,
    ),
    "suite": Command(SUITE, SUITE, float("inf")),
}
"""The commands run beside the stages (what ``nox -s gpu`` runs, which the GPU machine cannot:
it has no nox and no network): each one's arguments to Python on the GPU and in a dry run, and
the most seconds it may take (the suite: what is left; it runs by default on the GPU only)."""

ORDER = (
    "environment",
    "resources",
    "torch-parity",
    "cuda tests",
    "torch-speed",
    "hidden",
    "jax-parity",
    "jax-speed",
    "cupy-parity",
    "check",
    "bench",
    "suite",
)
"""The stages and the test runs in the order they run: the issue's goals first."""
NO_TESTS_COLLECTED = 5
"""pytest's exit status when every test of a run skipped at collection."""
MIN_SUITE_S = 30
"""The fewest seconds worth starting the test suite with."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m softce_multi device-check",
        description=(
            "Run every GPU path against the float64 reference on the device, time it against "
            "the peers, and run the CUDA tests and the test suite, within one time budget."
        ),
    )
    parser.add_argument(
        "--out",
        type=output_folder,
        help="folder for the JSON, log and plot, made if missing (required)",
    )
    parser.add_argument(
        "--tables",
        type=Path,
        metavar="JSON",
        help="print the tables of a saved run (its device_check.json) for the docs; run nothing",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same stages on the CPU at tiny sizes, kernels interpreted, CuPy skipped",
    )
    parser.add_argument(
        "--budget",
        type=positive_int,
        default=450,
        help="seconds for everything; the test suite gets what the stages leave (%(default)s)",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=list(STAGE_LIMIT_S),
        default=list(STAGE_LIMIT_S),
        help="stages to run (default: all)",
    )
    parser.add_argument(
        "--suite",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the test suite after the stages (default: yes on the GPU, no in a dry run)",
    )
    return parser


def _commit() -> str:
    """The commit checked: ``$SOFTCE_COMMIT`` (for a copy of the tree without its git folder,
    as the GPU machine gets), else ``git rev-parse HEAD``, else ``unknown``."""
    given = os.environ.get("SOFTCE_COMMIT")
    if given:
        return given
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _no_checkout_reason() -> str | None:
    """Why the check cannot run the repository's tests from where the package is imported (an
    installed package carries no ``tests/``), or None at the root of a checkout."""
    if (REPOSITORY / "tests" / "test_cuda.py").is_file():
        return None
    return (
        "the device check runs the repository's tests (tests/test_cuda.py and the suite), and "
        f"softce_multi is imported from {REPOSITORY / 'softce_multi'}, not from a checkout of "
        "the repository: run it at the root of a checkout"
    )


def _no_dry_run_reason() -> str | None:
    """Why the dry run cannot run here (torch or Triton not installed, with the commands that
    install them), or None."""
    commands = {"torch": TORCH_CPU_INSTALL, "triton": f"pip install {TRITON}"}
    missing = [name for name in commands if not installed(name)]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return (
        "the dry run of the device check needs torch and triton (it runs the Triton kernels in "
        f"Triton's interpreter), and {' and '.join(missing)} {verb} not installed: "
        + "; ".join(commands[name] for name in missing)
    )


def _no_gpu_reason() -> str | None:
    """Why the full check cannot run here (no torch, or no CUDA device), or None."""
    from softce_multi.testing import is_installed

    if not is_installed("torch"):
        return "the device check needs torch with CUDA, and torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return f"the device check needs a CUDA device, and torch {torch.__version__} sees none"
    return None


def _environment(dry_run: bool) -> dict[str, str]:
    """The variables of the stages' and tests' processes."""
    env = dict(os.environ)
    package_root = str(REPOSITORY)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # torch and JAX share the GPU: JAX takes memory as it needs it, not 75% of it up front.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(
    command: list[str], limit: float, env: dict[str, str], log: Any
) -> tuple[str, float, int | None]:
    """Run ``command`` with its output into ``log``: its status (``ok``, ``failed`` or
    ``timeout``), seconds, and return code.

    It runs in a process group of its own, which is killed whole at the limit: the workers a
    command starts (pytest-xdist's, ``torch.compile``'s) stop with it and leave the machine to
    the next step.
    """
    log.write(f"\n===== {' '.join(command)} (limit {limit:.0f} s)\n")
    log.flush()
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPOSITORY,
        start_new_session=True,
    )
    try:
        returncode = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout", time.perf_counter() - start, None
    status = "ok" if returncode == 0 else "failed"
    return status, time.perf_counter() - start, returncode


def _last_line(text: str) -> str:
    """The last line of ``text`` that holds more than blanks."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _pytest_summary(text: str) -> str:
    """The line of pytest's output ``text`` that counts the tests."""
    lines = [
        line
        for line in text.splitlines()
        if " in " in line
        and ("passed" in line or "failed" in line or "skipped" in line or "error" in line)
    ]
    return lines[-1].strip("= ") if lines else "no summary (stopped before the end?)"


#: What ``--tables`` reads of a saved run: what every run writes, however early it stopped.
SAVED_KEYS = ("date", "command", "speed", "kernel_modes", "linear", "targets", "goals")


def _saved_report(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The report saved at ``path`` (a device check's ``device_check.json``), or exit with what
    is wrong with it."""
    if not path.is_file():
        parser.error(f"--tables: no file {path}")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"--tables: {path} is not a JSON file ({error})")
    missing = (
        [key for key in SAVED_KEYS if key not in report] if isinstance(report, dict) else ["all"]
    )
    if missing:
        parser.error(
            f"--tables: {path} is not a device check's report (missing: {', '.join(missing)})"
        )
    return cast(dict[str, Any], report)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when every stage ran, every parity row passed and the tests passed."""
    parser = _parser()
    options = parser.parse_args(argv)
    if options.tables is not None:
        print(tables(_saved_report(parser, options.tables)))
        return 0
    if options.out is None:
        parser.error("--out FOLDER is required (or --tables JSON)")
    checkout_reason = _no_checkout_reason()
    if checkout_reason:
        parser.error(checkout_reason)
    if options.dry_run:
        dry_run_reason = _no_dry_run_reason()
        if dry_run_reason:
            parser.error(dry_run_reason)
    else:
        gpu_reason = _no_gpu_reason()
        if gpu_reason:
            parser.error(f"{gpu_reason}; --dry-run runs the check on the CPU")
    options.out.mkdir(parents=True, exist_ok=True)
    arguments = list(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {
        "command": " ".join(["python -m softce_multi device-check", *arguments]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "dry_run": options.dry_run,
        "budget_s": options.budget,
        "environment": {},
        "stages": [],
        "parity": [],
        "speed": [],
        "kernel_modes": [],
        "linear": [],
        "targets": [],
        "resources": [],
        "skipped": [],
        "failed": [],
        "tests": [],
    }
    run_suite = (not options.dry_run) if options.suite is None else options.suite
    steps = [
        step
        for step in ORDER
        if step in options.stages or (step in TESTS and (step != "suite" or run_suite))
    ]
    _run_steps(report, steps, options)
    copy = report.get("copy")
    add_ratios(report["speed"], copy["gb_per_s"] if copy else None)
    add_copy_fractions(report["kernel_modes"], copy["gb_per_s"] if copy else None)
    report["goals"] = goals(report, headline_shape(plan_for(options.dry_run)))
    (options.out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    if report["speed"]:
        try:
            draw(report, options.out / "device_check.png")
        except ImportError as error:
            print(f"no plot: {error}")
    print(summary(report))
    ran = [*report["stages"], *report["tests"]]
    passed = all(entry["status"] == "ok" for entry in ran) and not report["failed"]
    return 0 if passed and all(row["ok"] for row in report["parity"]) else 1


def _run_steps(report: dict[str, Any], steps: Sequence[str], options: argparse.Namespace) -> None:
    """Run ``steps`` in order, each within its limit and the time the budget has left, into
    ``report`` and the log."""
    deadline = time.monotonic() + options.budget
    env = _environment(options.dry_run)
    log_path = options.out / "device_check.log"
    with log_path.open("w") as log, tempfile.TemporaryDirectory() as scratch:
        for step in steps:
            most = STAGE_LIMIT_S[step] if step in STAGE_LIMIT_S else TESTS[step].limit
            limit = min(most, deadline - time.monotonic())
            entry: dict[str, Any]
            if limit < (MIN_SUITE_S if step == "suite" else 5):
                entry = {"stage": step, "status": "no time", "seconds": 0.0}
            elif step in TESTS:
                entry = _run_command(step, limit, options.dry_run, env, log, log_path)
            else:
                entry = _run_stage(step, limit, options.dry_run, env, log, Path(scratch))
                _merge(report, step, entry.pop("results"))
            report["tests" if step in TESTS else "stages"].append(entry)
            detail = f" ({entry['summary']})" if "summary" in entry else ""
            print(f"{step}: {entry['status']} in {entry['seconds']:.1f} s{detail}", flush=True)


def _run_stage(
    name: str, limit: float, dry_run: bool, env: dict[str, str], log: Any, scratch: Path
) -> dict[str, Any]:
    """Run stage ``name`` in its process; its entry of the report, with its ``results``: what
    it recorded, also when it was stopped at its limit."""
    output = scratch / f"{name}.json"
    command = [sys.executable, "-m", "softce_multi._cli.device_check.stage", name, str(output)]
    if dry_run:
        command.append("--dry-run")
    if name == "resources":  # it compiles the kernels, which the interpreter's cannot be
        env = {key: value for key, value in env.items() if key != "TRITON_INTERPRET"}
    status, seconds, _ = _run(command, limit, env, log)
    entry: dict[str, Any] = {"stage": name, "status": status, "seconds": seconds, "results": {}}
    if output.exists():
        written = json.loads(output.read_text())
        entry.update(errors=written["errors"], results=written["results"])
    return entry


def _merge(report: dict[str, Any], stage: str, results: dict[str, Any]) -> None:
    """Add a stage's results to the report: lists are appended to, the rest set."""
    if stage == "environment":
        report["environment"] = results
        return
    for key, value in results.items():
        if isinstance(value, list):
            report.setdefault(key, []).extend(value)
        else:
            report[key] = value


def _run_command(
    name: str, limit: float, dry_run: bool, env: dict[str, str], log: Any, log_path: Path
) -> dict[str, Any]:
    """Run the command ``name`` of :data:`TESTS` and return its entry of the report: its status,
    seconds, exit status and the line that sums it up (pytest's, or the last one printed)."""
    arguments = TESTS[name].dry_run if dry_run else TESTS[name].gpu
    log.flush()
    offset = log_path.stat().st_size
    status, seconds, returncode = _run([sys.executable, *arguments], limit, env, log)
    if dry_run and returncode == NO_TESTS_COLLECTED:
        status = "ok"  # without a GPU, tests/test_cuda.py skips as a whole
    log.flush()
    text = log_path.read_text(errors="replace")[offset:]
    return {
        "stage": name,
        "name": name,
        "status": status,
        "seconds": seconds,
        "returncode": returncode,
        "summary": _pytest_summary(text) if arguments[:2] == PYTEST[:2] else _last_line(text),
    }
