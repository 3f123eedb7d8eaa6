"""The Triton kernels compiled for Hopper (``sm_90a``) with no GPU: registers, spills, stack and
shared memory, as the compiler reports them.

Triton compiles a kernel for a target it is given (``GPUTarget("cuda", 90, 32)``) without a
device; ``ptxas -v`` (the one Triton uses for that target) then reports the resources of its
PTX. A spill or a stack frame is local-memory traffic that a memory-bound kernel cannot afford:
the check records them, on any machine, before a device minute is spent. It must run in a
process where ``TRITON_INTERPRET`` is not set (kernels defined under the interpreter cannot be
compiled).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any

from softce_multi.kernels import launch_config

CAPABILITY = 90
"""The compute capability of the H100 and H200."""
VOCABULARIES = (1000, 32000)
"""Vocabulary sizes whose launch configurations are compiled (a chunk of 1024 entries with 4
warps, and of 4096 with 8)."""
LOGITS_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def _compile(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any], warps: int) -> Any:
    """``fn`` compiled for :data:`CAPABILITY`: pointer arguments (named ``*_ptr``) of the types
    in ``pointers`` (``"*"`` for the rest), integer arguments as ``i32`` divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attributes = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = (
            "*" + pointers.get(name, pointers["*"]) if name.endswith("_ptr") else "i32"
        )
        attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attributes)
    target = GPUTarget("cuda", CAPABILITY, 32)
    return triton.compile(source, target=target, options={"num_warps": warps})


def ptxas_path() -> str:
    """The ``ptxas`` Triton uses for ``sm_90a``: Triton 3.6 chooses it by architecture, 3.4
    takes no argument."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(CAPABILITY).path
    except TypeError:
        return get_ptxas().path


def ptxas_report(ptx: str) -> dict[str, int]:
    """Registers, spill stores and loads (bytes) and stack frame (bytes) of ``ptx`` for
    ``sm_90a``, from the ``ptxas -v`` that Triton uses for that target."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.ptx")
        with open(path, "w") as file:
            file.write(ptx)
        command = [ptxas_path(), "-v", "--gpu-name", f"sm_{CAPABILITY}a", path]
        done = subprocess.run(
            [*command, "-o", os.devnull], capture_output=True, text=True, check=True
        )
    text = done.stdout + done.stderr
    numbers = {
        "registers": r"Used (\d+) registers",
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
        "stack_frame": r"(\d+) bytes stack frame",
    }
    report = {}
    for key, pattern in numbers.items():
        found = re.search(pattern, text)
        if found is None:
            msg = f"ptxas -v printed no {key}: {text!r}"
            raise RuntimeError(msg)
        report[key] = int(found.group(1))
    return report


def _variants() -> list[tuple[str, dict[str, Any], str, int]]:
    """``(kernel, flags, logits dtype, V)`` of every variant compiled."""
    forward: list[tuple[str, dict[str, Any]]] = [
        ("forward", {"WITH_GRAD": grad, "STATS_EVICTION": "evict_last"}) for grad in (True, False)
    ]
    backward: list[tuple[str, dict[str, Any]]] = [
        ("backward", {"LOGITS_GRAD": logits, "TARGETS_GRAD": targets})
        for logits, targets in ((True, True), (True, False), (False, True))
    ]
    # The backward pass's rewrite of a forward gradient for the upstream: 16-bit logits only.
    upstream: list[tuple[str, dict[str, Any]]] = [("upstream", {})]
    return [
        (kernel, flags, dtype, vocab)
        for dtype in LOGITS_DTYPES
        for vocab in (VOCABULARIES if dtype == "bfloat16" else VOCABULARIES[-1:])
        for kernel, flags in [*forward, *backward, *(upstream if dtype.endswith("16") else [])]
    ]


def kernel_resources() -> list[dict[str, Any]]:
    """One row per variant of the forward and backward kernels (and the backward pass's rewrite
    of a 16-bit forward gradient for the upstream): its launch configuration and
    the resources ``ptxas`` reports, with float32 targets (float64 with float64 logits)."""
    from softce_multi.kernels import triton as triton_kernels

    functions = {
        "forward": triton_kernels._forward_kernel,
        "backward": triton_kernels._backward_kernel,
        "upstream": triton_kernels._upstream_gradient_kernel,
    }
    rows = []
    for kernel, flags, dtype, vocab in _variants():
        block, warps = launch_config(vocab, None)
        logits = LOGITS_DTYPES[dtype]
        compute = "fp64" if dtype == "float64" else "fp32"
        pointers = {
            "z_ptr": logits,
            "grad_ptr": logits,
            "logits_grad_ptr": logits,
            "p_ptr": compute,
            "targets_grad_ptr": compute,
            "*": compute,
        }
        constexprs = {"z_col_stride": 1, "p_col_stride": 1, "BLOCK_SIZE": block, **flags}
        compiled = _compile(functions[kernel], pointers, constexprs, warps)
        rows.append(
            {
                "kernel": kernel,
                "flags": {key: value for key, value in flags.items() if key != "STATS_EVICTION"},
                "dtype": dtype,
                "block_size": block,
                "num_warps": warps,
                "shared_bytes": int(compiled.metadata.shared),
                **ptxas_report(compiled.asm["ptx"]),
            }
        )
    return rows
