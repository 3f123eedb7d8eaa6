"""Triton's interpreter made to round as a GPU does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["triton_interpreter_rounds_to_nearest"]


@contextlib.contextmanager
def triton_interpreter_rounds_to_nearest() -> Iterator[None]:
    """Make Triton's interpreter convert to and from bfloat16 as a GPU does.

    ``x.to(tl.bfloat16)`` rounds to nearest even (Triton's default for a downcast, which the
    compiler lowers to ``cvt.rn.bf16.f32``), but the interpreter of Triton 3.9 truncates it
    (``interpreter._convert_float`` without a rounding mode): every bfloat16 gradient it
    writes is then up to 1 ulp off, whatever the kernel computed. Between bfloat16 and float64
    it converts the bits as integers (``cast_impl``), so a kernel that computes in float64 reads
    and writes bfloat16 values that are wrong altogether. Within the context both are converted
    as the GPU converts them: rounded once to nearest even, and exactly. float16 is rounded by
    NumPy, to nearest, already. Needs torch and triton.

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
    builder = interpreter.InterpreterBuilder
    integer_cast = builder.cast_impl

    def convert(values: np.ndarray, source: Any, target: Any, rounding_mode: Any) -> Any:
        if source == tl.float32 and target == tl.bfloat16 and rounding_mode is None:
            return _bfloat16_bits(np.asarray(values, np.float32))
        return truncating(values, source, target, rounding_mode)

    def cast(self: Any, src: Any, dst_type: Any) -> Any:
        source, target = src.dtype.scalar, dst_type.scalar
        if source == tl.float64 and target == tl.bfloat16:
            return interpreter.TensorHandle(_bfloat16_bits(_round_to_odd_float32(src.data)), target)
        if source == tl.bfloat16 and target == tl.float64:
            widened = (src.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(widened.astype(np.float64), target)
        return integer_cast(self, src, dst_type)

    def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
        rounded = torch.from_numpy(np.ascontiguousarray(values, np.float32)).bfloat16()
        return rounded.view(torch.int16).numpy().view(np.uint16)

    interpreter._convert_float = convert
    builder.cast_impl = cast
    try:
        yield
    finally:
        interpreter._convert_float = truncating
        builder.cast_impl = integer_cast


def _round_to_odd_float32(values: np.ndarray) -> np.ndarray:
    """float64 ``values`` rounded to float32 toward zero, the last bit set where inexact.

    Rounding that to bfloat16 (8 bits of significand, far fewer than float32's 24) to nearest
    even gives the float64 value rounded to bfloat16 once, as the GPU's ``cvt.rn.bf16.f64``.
    """
    values = np.asarray(values, np.float64)
    with np.errstate(over="ignore"):  # beyond float32's range: inf, then its largest number
        nearest = values.astype(np.float32)
    overshoot = np.abs(nearest.astype(np.float64)) > np.abs(values)
    toward_zero = np.where(overshoot, np.nextafter(nearest, np.float32(0)), nearest)
    inexact = np.isfinite(values) & (toward_zero.astype(np.float64) != values)
    bits = toward_zero.view(np.uint32) | inexact.astype(np.uint32)
    return bits.view(np.float32)
