"""Train a draft ``lm_head`` with the loss taken straight from hidden states, in plain PyTorch.

A tiny draft head (an ``nn.Linear`` over hidden states) learns to match the next-token
distributions of a fixed random "teacher". The loss line is
``softce_multi.linear_masked_soft_cross_entropy``, which never forms all the logits at once;
``softce_multi.torch.LinearMaskedSoftCrossEntropy`` is the same loss as an ``nn.Module``.
Everything runs on the CPU on data made here from a fixed seed.

Run it with ``python examples/torch_linear_loss.py``.
"""

import torch
from torch import nn

import softce_multi as sc

torch.manual_seed(0)
batch, seq, hidden_size, vocab = 4, 32, 64, 500

teacher = nn.Linear(hidden_size, vocab)  # frozen: it makes the target distributions
draft_head = nn.Linear(hidden_size, vocab, bias=False)  # the draft model's lm_head
optimizer = torch.optim.Adam(draft_head.parameters(), lr=3e-2)
criterion = sc.torch.LinearMaskedSoftCrossEntropy(reduction="mean")

losses = []
for step in range(20):
    hidden = torch.randn(batch, seq, hidden_size)
    with torch.no_grad():
        target_probs = torch.softmax(teacher(hidden) / 0.5, dim=-1)
    position_mask = torch.rand(batch, seq) < 0.8  # False at padding

    # The loss line: the logits hidden @ weight.T are formed a chunk of rows at a time.
    loss = sc.linear_masked_soft_cross_entropy(
        hidden=hidden,
        weight=draft_head.weight,
        target_probs=target_probs,
        position_mask=position_mask,
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {loss.item():.4f}")

# The nn.Module gives the same value as the function.
with torch.no_grad():
    by_module = criterion(hidden, draft_head.weight, target_probs, position_mask)
    by_function = sc.linear_masked_soft_cross_entropy(
        hidden=hidden,
        weight=draft_head.weight,
        target_probs=target_probs,
        position_mask=position_mask,
    )
assert torch.allclose(by_module, by_function)
assert losses[-1] < 0.9 * losses[0], f"the loss did not go down: {losses[0]} -> {losses[-1]}"
print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
