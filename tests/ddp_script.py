"""A 2-process DDP run (CPU, gloo) of LoRACallback, launched by tests/test_ddp.py in a subprocess: Lightning's
`strategy="ddp"` re-executes this script for rank 1, which a pytest process cannot do.

    python tests/ddp_script.py ROOT resume     # whole run, part run, resumed run: reports weights per rank
    python tests/ddp_script.py ROOT kill K     # rank 1 dies (os._exit) at step K; rank 0 must not corrupt files
    python tests/ddp_script.py ROOT both K     # both, in one launch (the imports are most of the time)

Every rename (how atomic writes commit, Lightning's included) is recorded per rank in ROOT/report/, so the test
can tell which rank wrote what.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lit_models import CausalLM, trainer_kwargs

from lightning_lora import LoRACallback

ROOT, MODE = Path(sys.argv[1]), sys.argv[2]
RANK = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning's launcher for rank 1 only; rank 0 is this process
REPORT = ROOT / "report"
REPORT.mkdir(parents=True, exist_ok=True)
_renames: list[str] = []


def _recording(original):
    def rename(src, dst, *args, **kwargs):
        _renames.append(str(dst))
        (REPORT / f"renames-rank{RANK}.json").write_text(json.dumps(_renames))
        return original(src, dst, *args, **kwargs)

    return rename


os.replace, os.rename = _recording(os.replace), _recording(os.rename)


class DieAt(Callback):
    """Rank 1 vanishes at step `step`, as a node failure would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            os._exit(3)


def run(name: str, max_epochs: int, ckpt_path: str | None = None, extra: list | None = None,
        **checkpoint_kwargs) -> ModelCheckpoint:
    L.seed_everything(0, verbose=False)
    module = CausalLM(scheduler=True)
    checkpoint = ModelCheckpoint(dirpath=ROOT / name / "ckpt", save_top_k=-1, **checkpoint_kwargs)
    callbacks = [LoRACallback(r=4, alpha=8, model_attr="model", adapter_dir=ROOT / name / "adapter"), checkpoint]
    trainer = L.Trainer(**trainer_kwargs(ROOT, devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=30)),
                                         callbacks=callbacks + (extra or []), max_epochs=max_epochs))
    trainer.fit(module, ckpt_path=ckpt_path)
    weights = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "global_step": trainer.global_step}, REPORT / f"{name}-rank{RANK}.pt")
    return checkpoint


if MODE not in ("resume", "kill", "both"):
    raise SystemExit(f"unknown mode {MODE!r}: use 'resume', 'kill' or 'both'")
if MODE in ("resume", "both"):
    run("whole", 2)
    part = run("part", 1)
    run("resumed", 2, ckpt_path=part.best_model_path)
if MODE in ("kill", "both"):  # last: rank 0 ends with an error here
    run("killed", 3, extra=[DieAt(int(sys.argv[3]))], every_n_train_steps=1)
