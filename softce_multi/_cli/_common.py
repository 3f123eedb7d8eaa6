"""Helpers shared by the command-line tools: which libraries are installed, argument types, and a
progress bar that falls back to plain lines where tqdm (the ``cli`` extra) is not installed."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Protocol, TextIO

from softce_multi._compat import TORCH_CPU_INSTALL
from softce_multi.kernels import _installed as installed

__all__ = [
    "TORCH_CPU_INSTALL",
    "Progress",
    "ProgressLines",
    "finite_float",
    "installed",
    "output_file",
    "output_folder",
    "positive_float",
    "positive_int",
    "progress_bar",
    "random_seed",
]


SEED_LIMIT = 2**64
"""One more than the largest seed taken: NumPy's generators take no negative seed, and
PyTorch's none of ``2**64`` or more."""


def positive_int(text: str) -> int:
    """Argument type of a count or a size: an integer of at least 1."""
    value = int(text)
    if value <= 0:
        msg = f"must be a positive integer, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def random_seed(text: str) -> int:
    """Argument type of a random seed: an integer from 0 to ``SEED_LIMIT - 1``, which NumPy's
    and PyTorch's generators both take."""
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        msg = f"must be an integer from 0 to 2**64 - 1, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


#: The largest float32, the dtype a factor such as an upstream gradient is applied in.
FLOAT32_MAX = 3.4028234663852886e38


def finite_float(text: str) -> float:
    """Argument type of a factor of any sign: a finite number within float32's range."""
    value = _number(text)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        msg = f"must be a finite number within float32's range (at most 3.4e38), got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_float(text: str) -> float:
    """Argument type of a rate or a scale: a finite number above 0."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        msg = f"must be a finite number above 0, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _number(text: str) -> float:
    """``float(text)``, or the argument error of a value that is no number."""
    try:
        return float(text)
    except ValueError:
        msg = f"must be a number, got {text}"
        raise argparse.ArgumentTypeError(msg) from None


def _check_writable(folder: Path) -> None:
    """Raise :class:`argparse.ArgumentTypeError` unless a file can be made in ``folder``."""
    try:  # a file made and removed: os.access says yes to root where nothing can be written
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        msg = f"cannot write a file in folder {folder}: {error.strerror or error}"
        raise argparse.ArgumentTypeError(msg) from None


def output_file(text: str) -> Path:
    """Argument type of a file a command writes when it is done: a path in a folder that exists
    and can be written, so that a mistyped path is refused before the work, not after it."""
    path = Path(text)
    if path.is_dir():
        msg = f"{text} is a folder; give the path of a file in it"
        raise argparse.ArgumentTypeError(msg)
    folder = path.parent
    if not folder.is_dir():
        msg = f"no folder {folder} to write {path.name} in"
        raise argparse.ArgumentTypeError(msg)
    _check_writable(folder)
    return path


def output_folder(text: str) -> Path:
    """Argument type of a folder a command writes its files in: a folder that exists and can be
    written, or a path that can be made one (its nearest existing parent a folder that can be
    written), so that a mistyped path is refused before the work, not after it. The folder is
    not made here."""
    path = Path(text)
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        msg = (
            f"{text} is a file; give a folder"
            if existing == path
            else f"{existing} is a file: no folder {text} can be made in it"
        )
        raise argparse.ArgumentTypeError(msg)
    _check_writable(existing)
    return path


class Progress(Protocol):
    """What the command-line tools use of a :class:`tqdm.tqdm` bar."""

    def update(self) -> object: ...

    def set_postfix_str(self, s: str) -> None: ...

    def write(self, s: str, file: TextIO | None = None) -> None: ...

    def close(self) -> None: ...


class ProgressLines:
    """A progress bar for where tqdm is not installed: each status given to
    :meth:`set_postfix_str` is printed on a line of its own after the count of items done, at
    most one line every ``min_interval`` seconds (the first is always printed).

    With ``disable``, as tqdm's, it prints no status; :meth:`write` prints its line either way.
    """

    def __init__(
        self,
        total: int,
        unit: str,
        file: TextIO,
        *,
        disable: bool = False,
        min_interval: float = 5.0,
    ) -> None:
        self.total, self.unit, self.file = total, unit, file
        self.disable = disable
        self.min_interval = min_interval
        self.done = 0
        self._last_printed = -math.inf

    def update(self) -> None:
        """Count one more item done."""
        self.done += 1

    def set_postfix_str(self, s: str) -> None:
        """Print the status ``s``, unless disabled or a status was printed less than
        ``min_interval`` seconds ago."""
        now = time.monotonic()
        if self.disable or now - self._last_printed < self.min_interval:
            return
        self._last_printed = now
        print(f"[{self.done}/{self.total} {self.unit}s] {s}", file=self.file, flush=True)

    def write(self, s: str, file: TextIO | None = None) -> None:
        """Print the line ``s`` to ``file``, by default standard output (as tqdm's)."""
        print(s, file=file, flush=True)

    def close(self) -> None:
        """Nothing to clear: the lines stay."""


def progress_bar(
    total: int, unit: str, file: TextIO, *, disable: bool = False, leave: bool = True
) -> Progress:
    """A tqdm bar on ``file`` counting ``total`` items, each a ``unit``; where tqdm is not
    installed, the same progress as plain lines (:class:`ProgressLines`).

    ``disable`` and ``leave`` are tqdm's: draw nothing, and keep the finished bar on the screen.
    """
    try:
        import tqdm
    except ImportError:
        return ProgressLines(total, unit, file, disable=disable)
    bar: Progress = tqdm.tqdm(total=total, unit=unit, file=file, disable=disable, leave=leave)
    return bar
