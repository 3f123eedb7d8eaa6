"""Train a tiny draft head with Lightning, the loss taken straight from hidden states.

A ``lightning.LightningModule`` whose ``training_step`` calls
``softce_multi.torch.LinearMaskedSoftCrossEntropy`` on the hidden states of a small MLP and the
weight of its ``lm_head``, so the logits are formed a chunk of rows at a time. The module
learns the next-token distributions of a fixed random "teacher", on data made here from a
fixed seed; ``lightning.Trainer`` runs the loop on the CPU.

Run it with ``python examples/lightning_module.py`` (it needs ``lightning``).
"""

import lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from softce_multi.torch import LinearMaskedSoftCrossEntropy

torch.manual_seed(0)
num_sequences, seq, hidden_size, vocab = 256, 32, 64, 500

teacher = torch.randn(vocab, hidden_size) / hidden_size**0.5  # makes the target distributions
features = torch.randn(num_sequences, seq, hidden_size)
target_probs = torch.softmax(features @ teacher.T / 0.5, dim=-1)
position_mask = torch.rand(num_sequences, seq) < 0.8  # False at padding
loader = DataLoader(TensorDataset(features, target_probs, position_mask), batch_size=8)


class DraftHead(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU())
        self.lm_head = nn.Linear(hidden_size, vocab, bias=False)
        self.criterion = LinearMaskedSoftCrossEntropy(reduction="mean")
        self.losses = []

    def training_step(self, batch, batch_index):
        features, target_probs, position_mask = batch
        hidden = self.body(features)
        # The loss line: from the hidden states and the lm_head's weight.
        loss = self.criterion(hidden, self.lm_head.weight, target_probs, position_mask)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-2)


module = DraftHead()
trainer = lightning.Trainer(
    max_steps=30,
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(module, train_dataloaders=loader)

losses = module.losses
for step, loss in enumerate(losses):
    if step % 5 == 0 or step == len(losses) - 1:
        print(f"step {step:2d}  loss {loss:.4f}")

assert losses[-1] < 0.9 * losses[0], f"the loss did not go down: {losses[0]} -> {losses[-1]}"
print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
