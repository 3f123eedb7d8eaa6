"""The engine adapters: each hands the shared core the arrays of one library.

Every adapter module has the same four functions of one validated record (``loss``,
``loss_with_grad``, ``linear_loss``, ``linear_loss_with_grad``); :mod:`softce_multi._api`
dispatches the public functions to the adapter of the arrays' namespace.
"""
