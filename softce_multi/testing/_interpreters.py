"""Triton's interpreter made to round as a GPU does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["triton_interpreter_rounds_to_nearest"]


@contextlib.contextmanager
def triton_interpreter_rounds_to_nearest() -> Iterator[None]:
    """Make Triton's interpreter round float32 to bfloat16 to nearest even, as a GPU does.

    ``x.to(tl.bfloat16)`` rounds to nearest even (Triton's default for a downcast, which the
    compiler lowers to ``cvt.rn.bf16.f32``), but the interpreter of Triton 3.9 truncates it
    (``interpreter._convert_float`` without a rounding mode): every bfloat16 gradient it
    writes is then up to 1 ulp off, whatever the kernel computed. float16 is rounded by NumPy,
    to nearest, already. Needs torch and triton.

    Raises
    ------
    RuntimeError
        If this Triton's interpreter has no ``_convert_float`` to replace.
    """
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = getattr(interpreter, "_convert_float", None)
    if truncating is None:
        msg = "this Triton's interpreter has no _convert_float to make round to nearest"
        raise RuntimeError(msg)

    def convert(values: np.ndarray, source: Any, target: Any, rounding_mode: Any) -> Any:
        if source == tl.float32 and target == tl.bfloat16 and rounding_mode is None:
            rounded = torch.from_numpy(np.ascontiguousarray(values, np.float32)).bfloat16()
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return truncating(values, source, target, rounding_mode)

    interpreter._convert_float = convert
    try:
        yield
    finally:
        interpreter._convert_float = truncating
