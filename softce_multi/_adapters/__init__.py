"""The engine adapters: each hands the shared core the arrays of one library.

Every adapter module implements :class:`softce_multi._core.Adapter`, the same four functions of
one validated record (``loss``, ``loss_with_grad``, ``linear_loss``, ``linear_loss_with_grad``);
:mod:`softce_multi._api` dispatches the public functions to the adapter of the arrays'
namespace:

:mod:`softce_multi._adapters.torch`
    PyTorch: autograd functions around ``torch.library`` operators.
:mod:`softce_multi._adapters.jax`
    JAX: ``custom_vjp`` functions, XLA and the Pallas kernels.
:mod:`softce_multi._adapters.generic`
    NumPy, CuPy, array-api-strict and any other array-API library.

:mod:`softce_multi._adapters.torch_linear` holds the torch adapter's linear loss and
:mod:`softce_multi._adapters.torch_shared` what the torch losses share, those of
:mod:`softce_multi.distributed` included.
"""
