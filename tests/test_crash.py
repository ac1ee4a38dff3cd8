"""kill -9 in the middle of a checkpoint save and of a PEFT export (tests/crash_script.py stalls there): the
previous checkpoint and adapter stay loadable, the half-written file never replaces them, and the one temporary
file a SIGKILL necessarily leaves is removed by the next run before it writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from crash_script import callbacks
from helpers import script_env, tiny_gpt2
from lit_models import CausalLM, trainer_kwargs

from lightning_lora import load_adapter, validate_adapter

SCRIPT = Path(__file__).with_name("crash_script.py")
CASES = {"ckpt": 3, "adapter": 4}  # 3rd checkpoint write = step 2's; 4th adapter file = step 2's weights


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, Path]:
    """Both crash runs, started together (imports dominate), each killed -9 once it stalls mid-write."""
    env = script_env()
    runs = {}
    for where, n in CASES.items():
        root = tmp_path_factory.mktemp(f"crash-{where}")
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(root), where, str(n)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        runs[where] = (root, proc)
    deadline = time.monotonic() + 240
    try:
        for where, (root, proc) in runs.items():
            while not (root / "stalled").exists():
                assert proc.poll() is None, f"{where} run ended before stalling: {proc.stderr.read()[-3000:]}"
                assert time.monotonic() < deadline, f"{where} run never reached its write"
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        for _, proc in runs.values():
            proc.kill()
            proc.wait()
            proc.stderr.close()
    return {where: root for where, (root, _) in runs.items()}


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_kill_during_checkpoint_save(killed):
    root = killed["ckpt"]
    assert "epoch=0-step=2.ckpt" in (root / "stalled").read_text()
    ckpt = root / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    for path in ckpt.glob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["global_step"] == 1 and len(checkpoint["state_dict"]) == 4
    assert len(temps(ckpt)) == 1  # what SIGKILL leaves: the unfinished temporary beside the target
    resume_and_check_cleanup(root, ckpt / "last.ckpt")


def test_kill_during_adapter_export(killed):
    root = killed["adapter"]
    assert "adapter_model.safetensors" in (root / "stalled").read_text()
    last = root / "adapter" / "last"
    info = validate_adapter(last)
    assert info.metadata["lightning_lora.global_step"] == "1"  # the previous export, whole
    model = tiny_gpt2(0)
    load_adapter(model, last)
    checkpoint = torch.load(root / "ckpt" / "epoch=0-step=1.ckpt", weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(model.get_parameter(key.removeprefix("model.")), value)
    assert len(temps(last)) == 1
    resume_and_check_cleanup(root, root / "ckpt" / "last.ckpt")


def resume_and_check_cleanup(root: Path, ckpt_path: Path) -> None:
    """The next run resumes from the surviving checkpoint and removes the stale temporary before writing."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(**trainer_kwargs(root, callbacks=callbacks(root), max_steps=3))
    trainer.fit(CausalLM(), ckpt_path=ckpt_path)
    assert trainer.global_step == 3
    assert temps(root) == []
    assert validate_adapter(root / "adapter" / "last").metadata["lightning_lora.global_step"] == "3"
