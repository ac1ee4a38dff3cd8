"""How big LoRACallback's adapter-only checkpoint is, against its floor and against Lightning's default.

    python bench/ckpt_size.py [--n-embd 256] [--layers 4] [--r 8] [--steps 4]

Floor: the trainable tensors plus Adam's two moments, ``trainable x 4 bytes x 3`` (fp32); the rest is
Lightning's loop state and pickle framing. Default: the same checkpoint with the whole model's state_dict,
which is what Lightning writes without the callback.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_lora import LoRACallback


class LM(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=64, n_embd=args.n_embd, n_layer=args.layers,
                                       n_head=4))
    module = LM(model)
    data = DataLoader(torch.randint(0, 1024, (args.steps * 4, 32)), batch_size=4)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ModelCheckpoint(dirpath=tmp)
        trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp, callbacks=[
                                LoRACallback(r=args.r, alpha=2 * args.r, model_attr="model"), checkpoint])
        trainer.fit(module, data)
        path = Path(checkpoint.best_model_path)
        size = path.stat().st_size
        saved = torch.load(path, weights_only=True)
    buffer = io.BytesIO()
    torch.save({**saved, "state_dict": module.state_dict()}, buffer)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    floor = trainable * 4 * 3
    print(f"GPT-2 n_embd={args.n_embd} layers={args.layers}, LoRA r={args.r} on c_attn: "
          f"{trainable:,} trainable of {total:,} parameters")
    print(f"adapter-only .ckpt: {size:,} bytes = {size / floor:.3f} x (trainable x 4 bytes x 3 = {floor:,})")
    print(f"Lightning's default .ckpt of the same run: {buffer.tell():,} bytes ({buffer.tell() / size:.1f}x larger)")


if __name__ == "__main__":
    main()
