"""Train a tiny linear model with NumPy alone: the loss and its gradient in one call.

``softce_multi.masked_soft_cross_entropy_with_grad`` returns the loss and its gradient with
respect to the logits. The chain rule through ``logits = hidden @ weight + bias`` gives the
gradients of the parameters, and a hand-written SGD step follows. The model learns the target
distributions of a fixed random "teacher", on data made here from a fixed seed.

Run it with ``python examples/numpy_with_grad.py``.
"""

import numpy as np

import softce_multi as sc

batch, seq, hidden_size, vocab = 4, 32, 64, 500
rng = np.random.default_rng(0)
teacher = rng.standard_normal((hidden_size, vocab)) / np.sqrt(hidden_size)
weight = 0.01 * rng.standard_normal((hidden_size, vocab))
bias = np.zeros(vocab)
learning_rate = 20.0


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


losses = []
for step in range(20):
    hidden = rng.standard_normal((batch, seq, hidden_size))
    target_probs = softmax(hidden @ teacher / 0.5)
    position_mask = rng.random((batch, seq)) < 0.8  # False at padding

    logits = hidden @ weight + bias
    # The loss line: the loss and d(loss)/d(logits), shape [batch, seq, vocab].
    loss, grad_logits = sc.masked_soft_cross_entropy_with_grad(
        logits=logits, target_probs=target_probs, position_mask=position_mask
    )
    # The chain rule through the linear model, then one SGD step.
    grad_weight = hidden.reshape(-1, hidden_size).T @ grad_logits.reshape(-1, vocab)
    grad_bias = grad_logits.sum(axis=(0, 1))
    weight -= learning_rate * grad_weight
    bias -= learning_rate * grad_bias

    losses.append(float(loss))
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {losses[-1]:.4f}")

assert losses[-1] < 0.9 * losses[0], f"the loss did not go down: {losses[0]} -> {losses[-1]}"
print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
