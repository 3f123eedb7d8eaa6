"""Train a tiny EAGLE-3 draft model with NeMo AutoModel's trainer module and our loss.

NeMo AutoModel's ``Eagle3TrainerModule`` calls ``masked_soft_cross_entropy(logits=...,
target_probs=..., position_mask=...)`` at each test-time-training step, a name imported into
``nemo_automodel.components.speculative.eagle.core``. Binding
``softce_multi.torch.masked_soft_cross_entropy`` to that name is the whole drop-in: the same
keywords, the same mean over the valid positions. The script checks that the trainer module
gives the same loss with either function, then trains a one-layer ``LlamaEagle3DraftModel``
(built from a config, random weights, nothing downloaded) a few steps through it on the CPU,
against a fixed random target model, on data made here from a fixed seed.

Run it with ``python examples/nemo_automodel_eagle3.py`` (it needs ``nemo_automodel``).
"""

import torch
from nemo_automodel.components.speculative.eagle import core as eagle3_core
from nemo_automodel.components.speculative.eagle.draft_llama import LlamaEagle3DraftModel
from transformers import LlamaConfig

from softce_multi.torch import masked_soft_cross_entropy

torch.manual_seed(0)
batch, seq, hidden_size, vocab, draft_vocab = 4, 32, 32, 128, 64
config = LlamaConfig(
    vocab_size=vocab,
    hidden_size=hidden_size,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    draft_vocab_size=draft_vocab,
    target_hidden_size=hidden_size,
    attn_implementation="eager",
    tie_word_embeddings=False,
)
draft_model = LlamaEagle3DraftModel(config).float()  # its norms are made in bfloat16
selected_token_ids = torch.arange(draft_vocab)  # the draft vocabulary: the first target ids
selected_token_mask = torch.zeros(vocab, dtype=torch.bool)
selected_token_mask[selected_token_ids] = True
trainer_module = eagle3_core.Eagle3TrainerModule(
    draft_model,
    selected_token_ids=selected_token_ids,
    selected_token_mask=selected_token_mask,
    ttt_steps=3,
)
optimizer = torch.optim.Adam(trainer_module.parameters(), lr=3e-2)
# The target model: its auxiliary hidden states (three layers, concatenated) and its logits
# are functions of the current token, so each TTT step's shifted targets can be learnt.
target_hidden = torch.randn(vocab, 3 * hidden_size)
target_head = torch.randn(3 * hidden_size, vocab) / (3 * hidden_size) ** 0.5


def make_batch():
    input_ids = torch.randint(vocab, (batch, seq))
    aux_hidden_states = target_hidden[input_ids]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "loss_mask": torch.rand(batch, seq) < 0.8,  # False at padding
        "aux_hidden_states": aux_hidden_states,
        "target_logits": aux_hidden_states @ target_head / 0.5,
    }


# The same loss through the trainer module with NeMo's function and with softce_multi's.
check_batch = make_batch()
with torch.no_grad():
    theirs = trainer_module(**check_batch).loss
    eagle3_core.masked_soft_cross_entropy = masked_soft_cross_entropy  # the drop-in
    ours = trainer_module(**check_batch).loss
torch.testing.assert_close(ours, theirs)
print(f"softce_multi: {ours.item():.6f}   NeMo's masked_soft_cross_entropy: {theirs.item():.6f}")

losses = []
for step in range(20):
    loss = trainer_module(**make_batch()).loss  # every TTT step's loss is softce_multi's
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if step % 5 == 0 or step == 19:
        print(f"step {step:2d}  loss {losses[-1]:.4f}")

assert losses[-1] < 0.9 * losses[0], f"the loss did not go down: {losses[0]} -> {losses[-1]}"
print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
