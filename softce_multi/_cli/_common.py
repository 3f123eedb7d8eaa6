"""Helpers shared by the command-line tools: which libraries are installed, argument types."""

from __future__ import annotations

import argparse

from softce_multi.kernels import _installed as installed

__all__ = ["installed", "positive_int"]


def positive_int(text: str) -> int:
    """Argument type of a count or a size: an integer of at least 1."""
    value = int(text)
    if value <= 0:
        msg = f"must be a positive integer, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value
