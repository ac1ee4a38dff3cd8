"""A training run that stalls in the middle of a chosen write so that tests/test_crash.py can kill -9 it there.

    python tests/crash_script.py ROOT WHERE N

WHERE is ``ckpt`` or ``adapter`` (the folder under ROOT); the N-th fsync of a file being written there (the last
step of `io.atomic_write` before the rename) writes ROOT/stalled and sleeps, waiting for the kill.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import CausalLM, trainer_kwargs

from lightning_lora import LoRACallback


def stall_at(folder: Path, n: int, marker: Path) -> None:
    """Make the `n`-th fsync of a file in `folder` write `marker` and sleep (os.fsync is patched)."""
    fsync, seen = os.fsync, []

    def stalling_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith(str(folder) + os.sep):
            seen.append(path)
            if len(seen) == n:
                marker.write_text(path)
                time.sleep(600)
        fsync(fd)

    os.fsync = stalling_fsync


def callbacks(root: Path) -> list:
    return [LoRACallback(r=4, alpha=8, model_attr="model", adapter_dir=root / "adapter"),
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)]


if __name__ == "__main__":
    root, where, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    stall_at(root / where, n, root / "stalled")
    L.seed_everything(0, verbose=False)
    L.Trainer(**trainer_kwargs(root, callbacks=callbacks(root), max_steps=6)).fit(CausalLM())
