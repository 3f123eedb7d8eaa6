"""Train a tiny linear model with JAX and optax, the loss line being softce_multi's.

``softce_multi.masked_soft_cross_entropy`` takes JAX arrays as they are and works under
``jax.jit`` and ``jax.value_and_grad``. A linear model learns the target distributions of a
fixed random "teacher" with optax's Adam, on data made here from a fixed seed.

Run it with ``python examples/jax_optax.py`` (``JAX_PLATFORMS=cpu`` keeps it on the CPU).
"""

import jax
import jax.numpy as jnp
import optax

import softce_multi as sc

batch, seq, hidden_size, vocab = 4, 32, 64, 500
key_teacher, key_params, key_data = jax.random.split(jax.random.key(0), 3)
teacher = jax.random.normal(key_teacher, (hidden_size, vocab)) / jnp.sqrt(hidden_size)
params = {
    "weight": 0.01 * jax.random.normal(key_params, (hidden_size, vocab)),
    "bias": jnp.zeros(vocab),
}
optimizer = optax.adam(3e-2)
opt_state = optimizer.init(params)


def loss_fn(params, hidden, target_probs, position_mask):
    logits = hidden @ params["weight"] + params["bias"]
    # The loss line.
    return sc.masked_soft_cross_entropy(
        logits=logits, target_probs=target_probs, position_mask=position_mask
    )


@jax.jit
def train_step(params, opt_state, hidden, target_probs, position_mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, hidden, target_probs, position_mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


losses = []
for step in range(20):
    key_data, key_hidden, key_mask = jax.random.split(key_data, 3)
    hidden = jax.random.normal(key_hidden, (batch, seq, hidden_size))
    target_probs = jax.nn.softmax(hidden @ teacher / 0.5, axis=-1)
    position_mask = jax.random.uniform(key_mask, (batch, seq)) < 0.8  # False at padding
    params, opt_state, loss = train_step(params, opt_state, hidden, target_probs, position_mask)
    losses.append(float(loss))
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {losses[-1]:.4f}")

assert losses[-1] < 0.9 * losses[0], f"the loss did not go down: {losses[0]} -> {losses[-1]}"
print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
