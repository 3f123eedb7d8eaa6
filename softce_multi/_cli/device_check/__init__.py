"""``python -m softce_multi device-check``: every GPU path run, held to the float64 reference on
the device, and timed against the peers, in one command that fits a lent GPU machine's lease.

It runs the stages of :mod:`.stage` in order, each in a process of its own with a time limit
taken from one budget (``--budget``), then the CUDA tests and the test suite with what is left.
It writes ``device_check.json`` (everything measured, the goals met or not), ``device_check.log``
(every stage's and test run's output) and ``device_check.png`` (the speed comparison, drawn by
``bench``'s plot) to ``--out``, and prints a short table last.

``--dry-run`` runs the same stages on the CPU at tiny sizes: the Triton kernels in Triton's
interpreter, the Pallas kernels with ``interpret=True``, CuPy skipped; of the tests, only the
CUDA tests (which skip). The test suite runs it, so that no device minute goes on a typo.

Its modules: :mod:`.plan` (sizes, stand-ins for the GPU, timing and memory), :mod:`.inputs`
(the parity cases and their reference), :mod:`.parity` (torch), :mod:`.parity_arrays` (JAX and
CuPy), :mod:`.speed` (against the peers), :mod:`.hidden` (functions of hidden states),
:mod:`.stage` (one stage in its process) and :mod:`.report`.
"""

from softce_multi._cli.device_check.command import main

__all__ = ["main"]
