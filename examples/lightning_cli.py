"""LoRACallback configured in YAML through LightningCLI: the model code stays LoRA-free.

    python examples/lightning_cli.py fit --config examples/config.yaml
    python examples/lightning_cli.py fit --config examples/config.yaml --trainer.max_steps 20

`config.yaml` lists the callback by ``class_path: lightning_lora.LoRACallback``; its ``init_args`` are
LoRAConfig's fields (r, alpha, target_modules, ...) plus ``model_attr`` and ``adapter_dir``.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from quickstart import CausalLM, byte_loader
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel


class GPT2(CausalLM):
    """A GPT-2 of the given size, built from its config."""

    def __init__(self, n_embd: int = 64, n_layer: int = 2, lr: float = 3e-3) -> None:
        torch.manual_seed(0)
        super().__init__(GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=n_embd, n_layer=n_layer,
                                                    n_head=4)), lr)
        self.save_hyperparameters()


class Bytes(L.LightningDataModule):
    def __init__(self, seq: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        self.seq, self.batch_size = seq, batch_size

    def train_dataloader(self) -> DataLoader:
        return byte_loader(self.seq, self.batch_size)


if __name__ == "__main__":
    LightningCLI(GPT2, Bytes, save_config_kwargs={"overwrite": True})
