"""The smallest useful LoRA fine-tune: an unchanged LightningModule and one callback.

    python examples/quickstart.py                  # a small GPT-2 built from its config: offline, CPU, a minute
    python examples/quickstart.py --model gpt2     # or any causal LM that transformers can load

The adapter lands in ``<out>/adapter/last`` in PEFT's format: ``PeftModel.from_pretrained(base, that_path)``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from lightning_lora import LoRACallback

TEXT = "the quick brown fox jumps over the lazy dog. " * 64


class CausalLM(L.LightningModule):
    """Any transformers causal LM in ``self.model``; nothing here knows about LoRA."""

    def __init__(self, model: torch.nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def byte_loader(seq: int = 32, batch_size: int = 8) -> DataLoader:
    """`TEXT` as byte tokens (vocabulary 256), cut into sequences."""
    ids = torch.tensor(list(TEXT.encode()))
    return DataLoader(ids[: len(ids) // seq * seq].view(-1, seq), batch_size=batch_size, shuffle=True)


def small_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers causal LM id or path (default: a small GPT-2, offline)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model) if args.model else small_gpt2()
    trainer = L.Trainer(max_steps=args.max_steps, default_root_dir=args.out, logger=False, callbacks=[
        LoRACallback(r=8, alpha=16, model_attr="model", adapter_dir=f"{args.out}/adapter"),
    ])
    trainer.fit(CausalLM(model), byte_loader())
    if trainer.is_global_zero:
        print(f"adapter (PEFT format): {os.path.abspath(args.out)}/adapter/last")


if __name__ == "__main__":
    main()
