"""Tiny LightningModules for the callback tests, the DDP / crash scripts and the LightningCLI test: a GPT-2
language model held in ``self.model`` and a plain ``nn.Module`` MLP. Kept apart from helpers.py so that only
the tests that need Lightning import it."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from helpers import tiny_gpt2
from torch import nn
from torch.utils.data import DataLoader


def token_loader(batches: int = 4, batch_size: int = 4, seq: int = 8, seed: int = 1, vocab: int = 64) -> DataLoader:
    """`batches` batches of random token ids, in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(torch.randint(0, vocab, (batches * batch_size, seq), generator=g), batch_size=batch_size)


def trainer_kwargs(root: Any, **overrides: Any) -> dict[str, Any]:
    """Quiet, CPU, deterministic Trainer settings for tests."""
    return {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": False, "default_root_dir": str(root), "max_epochs": 1, "num_sanity_val_steps": 0,
            "deterministic": True, **overrides}


class CausalLM(L.LightningModule):
    """A tiny GPT-2 in ``self.model``, next-token loss; the optimizer is built the recommended way."""

    def __init__(self, seed: int = 0, n_embd: int = 32, lr: float = 0.05, scheduler: bool = False,
                 checkpointing: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_gpt2(seed, n_embd=n_embd).train()
        if checkpointing:
            # Reentrant checkpointing, without the input-grad hook that transformers >= 5 adds on enabling it
            # (older versions do not): the frozen-input trap as most users meet it.
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            self.model.disable_input_require_grads()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
        if not self.hparams.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}

    def train_dataloader(self) -> DataLoader:
        return token_loader()

    def val_dataloader(self) -> DataLoader:
        return token_loader(batches=2, seed=2)


class MLP(nn.Module):
    """A plain PyTorch model: two hidden Linear layers and a classification head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Classifier(L.LightningModule):
    """A LightningModule around a plain `MLP` in ``self.net``."""

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(32, 16, generator=g)
        return DataLoader(list(zip(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())), batch_size=8)
