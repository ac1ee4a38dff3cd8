"""LoRACallback under real 2-process FSDP on CPU (gloo), run through tests/fsdp_script.py in a subprocess:
FSDPStrategy (FULL_SHARD, use_orig_params, one unit per GPT-2 block, activation checkpointing) and FSDP2
(ModelParallelStrategy, `fully_shard` per block). Parameters really sharded, the exported adapter (gathered from
the shards) reproduces the sharded model's logits in our loader and in PEFT, checkpoints hold only the LoRA
tensors, and resuming from one equals an uninterrupted run bit for bit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from fsdp_script import TARGETS, CPUFSDPStrategy
from helpers import run_script, tiny_gpt2
from lightning.pytorch.strategies import ModelParallelStrategy
from lit_models import CausalLM, token_loader
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from lightning_lora import ConfigError, LoRACallback, LoRAConfig, inject, load_adapter, validate_adapter
from lightning_lora.callback import RECORD_KEY, _clean

peft = pytest.importorskip("peft")
SCRIPT = Path(__file__).with_name("fsdp_script.py")


@pytest.fixture(scope="module", params=["fsdp", "fsdp2"])
def fsdp_run(request, tmp_path_factory) -> tuple[Path, dict]:
    """One launch per strategy: a whole run and one resumed from its first checkpoint; per-rank reports."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    result = run_script(SCRIPT, root, kind)
    assert result.returncode == 0, result.stdout[-4000:]
    return root, {(name, rank): torch.load(root / "report" / f"{kind}-{name}-rank{rank}.pt", weights_only=True)
                  for name in ("whole", "resumed") for rank in (0, 1)}


def test_fsdp_shards_trains_and_exports_the_gathered_adapter(fsdp_run):
    root, reports = fsdp_run
    whole, other = reports["whole", 0], reports["whole", 1]
    weights = whole["weights"]
    assert len(weights) == 8 and whole["global_step"] == 4
    full = {n: w.numel() for n, w in weights.items()}
    assert all(w.any() for n, w in weights.items() if "lora_B" in n), "LoRA B must have trained"
    # Really sharded: each rank holds a part (FSDP: 1-D slices of flat parameters), and the parts add up.
    assert sorted(whole["shards"].values()) != sorted(full.values()) and any(other["shards"].values())
    assert sum(whole["shards"].values()) + sum(other["shards"].values()) == sum(full.values())
    # The ratio is counted before wrapping (afterwards each rank would count its shard).
    reference = tiny_gpt2(0)
    inject(reference, LoRAConfig(r=4, alpha=8, target_modules=TARGETS))
    trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert (whole["trainable"], whole["total"]) == (trainable, sum(p.numel() for p in reference.parameters()))

    batch = token_loader().dataset[:2]
    assert torch.equal(whole["logits"], other["logits"])
    folder = root / "whole" / "adapter" / "last"
    ours = tiny_gpt2(0)
    load_adapter(ours, folder)  # strict: 2-D shapes, not FSDP's flat 1-D shards
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=batch).logits, whole["logits"], atol=1e-5, rtol=1e-5)
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(0), str(folder)).eval()
        torch.testing.assert_close(theirs(input_ids=batch).logits, whole["logits"], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tiny_gpt2(0)(input_ids=batch).logits, whole["logits"], atol=1e-3)


def test_fsdp_checkpoint_is_adapter_only_and_resume_is_exact(fsdp_run):
    root, reports = fsdp_run
    whole, resumed = reports["whole", 0], reports["resumed", 0]
    checkpoint = torch.load(root / "whole" / "ckpt" / "epoch=1-step=4.ckpt", weights_only=True)
    assert checkpoint["state_dict"].keys() == whole["weights"].keys()  # full names, no base tensor
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in whole["weights"].items())
    assert len(checkpoint["optimizer_states"][0]["state"]) == 8  # Adam's moments: LoRA parameters only
    assert checkpoint[RECORD_KEY]["config"]["target_modules"] == TARGETS

    assert resumed["global_step"] == whole["global_step"] == 4
    assert all(torch.equal(resumed["weights"][k], v) for k, v in whole["weights"].items())
    assert torch.equal(resumed["logits"], whole["logits"])

    # "best" follows ModelCheckpoint(monitor="val_loss"): rank 0 decides, every rank joins the gather.
    best = torch.load(root / "whole" / "ckpt" / whole["best"], weights_only=True)
    info = validate_adapter(root / "whole" / "adapter" / "best")
    assert info.metadata["lightning_lora.global_step"] == str(best["global_step"])
    model = tiny_gpt2(0)
    load_adapter(model, info.path)
    for key, value in best["state_dict"].items():
        assert torch.equal(model.get_parameter(key.removeprefix("model.")), value), key


@pytest.mark.parametrize("fsdp_run", ["fsdp2"], indirect=True)
def test_fsdp2_refuses_late_injection_and_missing_lora_keys(fsdp_run):
    root, _ = fsdp_run
    for rank in (0, 1):
        late = (root / "report" / f"late-rank{rank}.txt").read_text()  # configure_model sharded, then injected
        assert "injected after fully_shard" in late and "LoRACallback.apply(self)" in late, late
        edited = (root / "report" / f"edited-rank{rank}.txt").read_text()  # resumed from a ckpt lacking a key
        assert "lacks 1 of the LoRA tensors" in edited and "mlp.c_fc.lora_B" in edited, edited


@pytest.mark.parametrize(("strategy", "message"), [
    (lambda: CPUFSDPStrategy(state_dict_type="sharded"), "state_dict_type='full'"),
    (lambda: CPUFSDPStrategy(use_orig_params=False), "use_orig_params=True"),
    (lambda: ModelParallelStrategy(), "save_distributed_checkpoint=False"),
], ids=["sharded", "flat-params", "fsdp2-distributed-checkpoint"])
def test_fsdp_settings_that_cannot_work_are_refused(tmp_path, strategy, message):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy(), default_root_dir=tmp_path, logger=False)
    module = CausalLM()
    with pytest.raises(ConfigError, match=message):
        LoRACallback(r=4, model_attr="model").setup(trainer, module, "fit")
    assert not any("lora" in n for n, _ in module.named_parameters())  # refused before touching the model


def test_fsdp_wrapped_module_loads_an_adapter_only_state_dict_strictly():
    """FSDP loads the LightningModule under ``_fsdp_wrapped_module.`` but reports missing keys without it: the
    frozen keys must still be ignored (Lightning's FSDP resume is this load) and a missing LoRA key still fail."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    trained, fresh = CausalLM(), CausalLM()
    for module in (trained, fresh):
        LoRACallback(r=4, model_attr="model").apply(module)
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(param.requires_grad)
    saved = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = FSDP(fresh, device_id=torch.device("cpu"), use_orig_params=True,
                     auto_wrap_policy=ModuleWrapPolicy({GPT2Block}))
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False)):
            model.load_state_dict(saved)
            with pytest.raises(RuntimeError, match=r"Missing key\(s\).*h\.1\.attn\.c_attn\.lora_B"):
                model.load_state_dict({k: v for k, v in saved.items() if "h.1.attn.c_attn.lora_B" not in k})
        with FSDP.summon_full_params(model):
            assert all(torch.equal(fresh.get_parameter(_clean(k)), v) for k, v in saved.items())
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp_refuses_a_quantized_base_before_wrapping(tmp_path):
    """torch's FSDP cannot flatten NF4 weights with float tensors; it failed inside the wrap with "Must flatten
    tensors with uniform dtype" (bitsandbytes) or "aten.view(NF4Tensor)" (torchao)."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(), default_root_dir=tmp_path, logger=False)
    module = CausalLM()
    with pytest.raises(ConfigError, match=r"quantize='nf4' base.*Use strategy='ddp', or ModelParallelStrategy"):
        LoRACallback(r=4, model_attr="model", quantize="nf4").setup(trainer, module, "fit")
    assert not any("lora" in n for n, _ in module.named_parameters())
