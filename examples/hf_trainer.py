"""Train a tiny causal LM with Hugging Face's ``Trainer``, the loss line being softce_multi's.

A ``Trainer`` subclass overrides ``compute_loss`` to call
``softce_multi.torch.masked_soft_cross_entropy`` on the model's logits. The model is a
one-layer ``LlamaForCausalLM`` built from a config with random weights (nothing is
downloaded); it learns the next-token distributions of a fixed random "teacher" (a table of
one distribution per current token), on data made here from a fixed seed, on the CPU.

Run it with ``python examples/hf_trainer.py`` (it needs ``transformers`` and ``accelerate``).
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments

from softce_multi.torch import masked_soft_cross_entropy

torch.manual_seed(0)
num_sequences, seq, vocab = 64, 16, 64
config = LlamaConfig(
    vocab_size=vocab,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
)
model = LlamaForCausalLM(config)

teacher = torch.softmax(torch.randn(vocab, vocab) / 0.5, dim=-1)  # row t: the next token's law
input_ids = torch.randint(vocab, (num_sequences, seq))
dataset = [
    {
        "input_ids": ids,
        "target_probs": teacher[ids],
        "position_mask": torch.rand(seq) < 0.8,  # False at padding
    }
    for ids in input_ids
]


class SoftTargetTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"])
        # The loss line.
        loss = masked_soft_cross_entropy(
            logits=outputs.logits,
            target_probs=inputs["target_probs"],
            position_mask=inputs["position_mask"],
        )
        return (loss, outputs) if return_outputs else loss


with tempfile.TemporaryDirectory() as output_dir:
    arguments = TrainingArguments(
        output_dir=output_dir,
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,  # keep target_probs and position_mask in each batch
        disable_tqdm=True,
        seed=0,
    )
    trainer = SoftTargetTrainer(model=model, args=arguments, train_dataset=dataset)
    trainer.remove_callback(PrinterCallback)  # the loop below prints the losses instead
    trainer.train()

losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
for step, loss in enumerate(losses):
    if step % 5 == 0 or step == len(losses) - 1:
        print(f"step {step:2d}  loss {loss:.4f}")

assert losses[-1] < 0.9 * losses[0], f"the loss did not go down: {losses[0]} -> {losses[-1]}"
print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
