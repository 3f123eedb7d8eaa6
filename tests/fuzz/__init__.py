"""The differential fuzzer: every public function on every installed backend, on the same inputs.

Each test draws one input with hypothesis, builds it on every backend of
:func:`softce_multi.testing.backends` that has the dtypes it needs (NumPy, array-api-strict,
PyTorch, JAX, and CuPy and the GPUs where present), calls the function on each, and holds each
result to the float64 oracle: :func:`softce_multi.testing.reference` for the losses and their
gradients, a NumPy statement of the documented result for the EAGLE-3 helpers. A result must
agree in value (within :data:`~softce_multi.testing.LOSS_RTOL` and
:data:`~softce_multi.testing.GRAD_RTOL`), dtype, shape and library. A bad input must raise the
same exception type on every backend, with the argument named in the message.

The inputs cover empty axes, ``V = 1``, odd and large vocabularies, every dtype each function
accepts (integer ids and masks of every width, float16 to float64 values), masks of both
shapes with bool, integer and fractional weights, strided and transposed views, and NaN,
infinities and huge numbers in padding. The losses get their arrays by position, by keyword
(under their documented names) or both.

The gradients of torch autograd and ``jax.vjp`` are held to the oracle for random upstream
gradients, and 16-bit logits gradients, for upstream gradients other than 1, to the accuracy of
one rounding (:func:`softce_multi.testing.assert_gradient_rounded_once`). Derivatives of
gradients (a gradient penalty's, hessians; JAX's linear loss's) are finite, exactly 0 at
padding, and the float64 ones elsewhere; the torch linear loss, differentiable once, refuses
them.

An input is a *structure* (shapes, dtypes, reduction: what a JAX compilation depends on) and
*values* (seeds, scales, offsets, poison, memory layouts). Each test draws its structures from
a fixed list of ``max(4, max_examples // 20)`` of them, which covers every value of each
dimension evenly, and its values freely; JAX runs under ``jax.jit``, so that a structure seen
before reuses its compilation. The number of examples is the hypothesis profile's:
``pytest tests/fuzz --hypothesis-profile=thorough`` runs 2000 per test.

The modules are by capability: ``test_loss`` (the loss and its first gradients),
``test_gradients`` (derivatives beyond the first), ``test_linear`` (the loss of hidden states),
``test_eagle3`` (the EAGLE-3 helpers), ``test_errors`` (bad inputs) and ``test_coverage`` (the
signatures, and a fuzz test for every public function); ``strategies`` holds what they share.
"""
