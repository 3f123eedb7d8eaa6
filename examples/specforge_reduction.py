"""Reproduce SpecForge's (and the original EAGLE code's) loss reduction with ``num_valid``.

SpecForge averages the masked per-position loss over all ``batch * seq`` positions, padding
included, where ``softce_multi``'s default ``"mean"`` divides by the number of valid positions.
Passing ``num_valid=batch * seq`` gives SpecForge's value. The script checks the loss and its
gradient against SpecForge's formula written out in torch, then trains a tiny draft head a few
steps with it, on data made here from a fixed seed.

Run it with ``python examples/specforge_reduction.py``.
"""

import torch

import softce_multi as sc


def specforge_loss(logits, target_probs, position_mask):
    """SpecForge's formula: ``-sum(mask * p * log_softmax(z))`` over the vocabulary, then the
    mean over every position."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return -torch.sum(position_mask * (target_probs * log_probs), dim=-1).mean()


torch.manual_seed(0)
batch, seq, hidden_size, vocab = 4, 32, 64, 500
teacher = torch.randn(vocab, hidden_size) / hidden_size**0.5
draft_head = torch.nn.Linear(hidden_size, vocab)
optimizer = torch.optim.Adam(draft_head.parameters(), lr=3e-2)


def make_batch():
    hidden = torch.randn(batch, seq, hidden_size)
    target_probs = torch.softmax(hidden @ teacher.T / 0.5, dim=-1)
    position_mask = (torch.rand(batch, seq, 1) < 0.8).float()  # SpecForge's [B, T, 1], 0 at padding
    return hidden, target_probs, position_mask


# The same value and the same gradient as SpecForge's formula.
hidden, target_probs, position_mask = make_batch()
logits = draft_head(hidden).detach().requires_grad_()
ours = sc.masked_soft_cross_entropy(
    logits=logits, target_probs=target_probs, position_mask=position_mask, num_valid=batch * seq
)
theirs = specforge_loss(logits, target_probs, position_mask)
(grad_ours,) = torch.autograd.grad(ours, logits)
(grad_theirs,) = torch.autograd.grad(theirs, logits)
torch.testing.assert_close(ours, theirs)
torch.testing.assert_close(grad_ours, grad_theirs)
print(f"num_valid=batch*seq: {ours.item():.6f}   SpecForge's formula: {theirs.item():.6f}")

losses = []
for step in range(20):
    hidden, target_probs, position_mask = make_batch()
    # The loss line, in place of specforge_loss(logits, target_probs, position_mask).
    loss = sc.masked_soft_cross_entropy(
        logits=draft_head(hidden),
        target_probs=target_probs,
        position_mask=position_mask,
        num_valid=batch * seq,
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {losses[-1]:.4f}")

assert losses[-1] < 0.9 * losses[0], f"the loss did not go down: {losses[0]} -> {losses[-1]}"
print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
