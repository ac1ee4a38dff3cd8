"""LoRACallback under real 2-process DDP (CPU, gloo), run through tests/ddp_script.py in a subprocess:
identical LoRA weights on both ranks, only rank 0 writes, exact resume, and a rank dying mid-run leaves every
checkpoint and the adapter export loadable."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_script, tiny_gpt2
from lit_models import token_loader

from lightning_lora import load_adapter, validate_adapter

SCRIPT = Path(__file__).with_name("ddp_script.py")


def renames(root: Path, rank: int) -> list[str]:
    path = root / "report" / f"renames-rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else []


def no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One launch: whole / part / resumed runs, then a run in which rank 1 dies at step 3."""
    root = tmp_path_factory.mktemp("ddp")
    return root, run_script(SCRIPT, root, "both", "3")


def test_ddp_ranks_agree_only_rank0_writes_and_resume_is_exact(ddp_run):
    root, result = ddp_run
    assert (root / "report" / "resumed-rank1.pt").exists(), result.stdout[-4000:]
    reports = {(name, rank): torch.load(root / "report" / f"{name}-rank{rank}.pt", weights_only=True)
               for name in ("whole", "part", "resumed") for rank in (0, 1)}
    for name in ("whole", "part", "resumed"):
        w0, w1 = reports[name, 0]["weights"], reports[name, 1]["weights"]
        assert len(w0) == 4 and w0.keys() == w1.keys()
        assert all(torch.equal(w0[k], w1[k]) for k in w0), f"{name}: ranks disagree"
    whole, resumed = reports["whole", 0], reports["resumed", 0]
    assert whole["global_step"] == resumed["global_step"] == 4
    assert all(torch.equal(whole["weights"][k], resumed["weights"][k]) for k in whole["weights"])

    written = renames(root, 0)
    assert any(p.endswith("adapter_model.safetensors") for p in written) and any(p.endswith(".ckpt") for p in written)
    assert renames(root, 1) == []  # rank 1 committed no file at all, in any of the four runs
    checkpoint = torch.load(root / "whole" / "ckpt" / "epoch=1-step=4.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(whole["weights"])
    model = tiny_gpt2(0)
    load_adapter(model, root / "whole" / "adapter" / "last")
    assert all(torch.equal(model.get_parameter(k.removeprefix("model.")), v) for k, v in whole["weights"].items())
    no_temp_files(root)


def test_ddp_rank_dying_mid_run_leaves_loadable_files(ddp_run):
    tmp_path, result = ddp_run
    assert result.returncode != 0  # rank 0 notices its peer is gone (gloo) and fails, rather than hanging
    assert "Connection" in result.stdout or "gloo" in result.stdout.lower(), result.stdout[-3000:]
    ckpts = sorted((tmp_path / "killed" / "ckpt").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt"]
    for path in ckpts:
        assert len(torch.load(path, weights_only=True)["state_dict"]) == 4
    info = validate_adapter(tmp_path / "killed" / "adapter" / "last")
    assert info.metadata["lightning_lora.global_step"] == "2"
    model = tiny_gpt2(0)
    load_adapter(model, info.path)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=token_loader().dataset[:2]).logits).all()
    assert renames(tmp_path, 1) == []
    no_temp_files(tmp_path)
