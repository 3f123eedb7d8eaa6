"""The command line: ``python -m softce_multi {check,bench,demo,device-check} [options]``.

Each command lives in its own module, imported only when that command runs, and parses the
rest of the command line itself (``python -m softce_multi check --help``).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

COMMANDS = {
    "check": (
        "softce_multi._cli.check",
        "run the loss and its gradient on every installed backend against the reference",
    ),
    "bench": ("softce_multi._cli.bench", "time the loss against other implementations"),
    "demo": ("softce_multi._cli.demo", "train a small EAGLE-3 draft head with the loss"),
    "device-check": (
        "softce_multi._cli.device_check",
        "run every GPU path against the reference and the peers on a GPU (--dry-run: the CPU)",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the command's ``main(argv) -> int`` and return its exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m softce_multi",
        description="Masked soft-target cross entropy for EAGLE-3 draft models.",
        epilog="Run 'python -m softce_multi COMMAND --help' for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    status: int = module.main(rest)
    return status
