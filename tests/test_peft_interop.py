"""Interop with PEFT itself, both ways: our saved adapters load in `peft.PeftModel.from_pretrained`, PEFT's
saved adapters load with our `load_adapter`; logits agree within 1e-5."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    model_output,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_batch,
    train_steps,
)

from lightning_lora import LoRAConfig, inject, load_adapter, lora_layers, save_adapter, summarize

peft = pytest.importorskip("peft")

CASES = {
    "gpt2-conv1d": (tiny_gpt2, {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}),
    "llama-rslora-patterns": (tiny_llama, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                               "use_rslora": True, "rank_pattern": {"model.layers.1.self_attn.q_proj": 2},
                                               "alpha_pattern": {"down_proj": 3}}),
    "bert-modules-to-save": (tiny_bert_classifier, {"r": 2, "alpha": 4, "target_modules": ["query", "value"],
                                                        "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}),
}


def _peft_config(fields: dict) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=fields["r"], lora_alpha=fields["alpha"], target_modules=fields["target_modules"],
        use_rslora=fields.get("use_rslora", False), rank_pattern=fields.get("rank_pattern", {}),
        alpha_pattern=fields.get("alpha_pattern", {}), modules_to_save=fields.get("modules_to_save"),
        task_type=fields.get("task_type"), init_lora_weights=False,  # B random too: a non-trivial adapter
    )


@pytest.mark.parametrize("case", list(CASES))
def test_ours_loads_in_peft(case, adapter_path):
    build, fields = CASES[case]
    model, batch = build(), token_batch()
    inject(model, LoRAConfig(**fields))
    train_steps(model, batch)
    ours = model_output(model, batch)
    save_adapter(model, adapter_path, base_model="tiny")

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "missing adapter keys" would be a warning: fail on it
        peft_model = peft.PeftModel.from_pretrained(build(), adapter_path).eval()
    theirs = model_output(peft_model, batch)
    assert not torch.allclose(theirs, model_output(build(), batch), atol=1e-3), "the adapter must matter"
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_ours(case, adapter_path):
    build, fields = CASES[case]
    batch = token_batch()
    peft_model = peft.get_peft_model(build(), _peft_config(fields))
    if fields.get("modules_to_save"):
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    peft_model.eval()
    theirs = model_output(peft_model, batch)
    peft_model.save_pretrained(adapter_path)

    model = build()
    config = load_adapter(model, adapter_path)
    assert config.use_rslora == fields.get("use_rslora", False)
    ranks = {p: layer.lora_a["default"].shape[0] for p, layer in lora_layers(model)}
    if fields.get("rank_pattern"):
        assert ranks["model.layers.1.self_attn.q_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"] == 4
    assert not torch.allclose(theirs, model_output(build(), batch), atol=1e-3)
    assert torch.allclose(model_output(model, batch), theirs, atol=1e-5, rtol=0)


def test_t5_all_linear_peft_adapter_runs_and_trains_in_ours(adapter_path):
    """T5's feed-forward reads ``self.wo.weight.dtype`` in forward: the wrapped ``wo`` exposes its base weight."""
    batch = token_batch() | {"decoder_input_ids": token_batch(seed=2)["input_ids"]}
    peft_model = peft.get_peft_model(tiny_t5(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False)).eval()
    theirs = model_output(peft_model, batch)
    peft_model.save_pretrained(adapter_path)

    model = tiny_t5()
    base_total = sum(p.numel() for p in model.parameters())
    load_adapter(model, adapter_path)
    wo = model.decoder.block[1].layer[2].DenseReluDense.wo
    assert wo.weight is wo.base_layer.weight and wo.bias is None
    assert not torch.allclose(theirs, model_output(tiny_t5(), batch), atol=1e-3), "the adapter must matter"
    assert torch.allclose(model_output(model, batch), theirs, atol=1e-5, rtol=0)
    summary = summarize(model)  # the base weights, reachable twice now, are still counted once
    assert summary.total == base_total + summary.trainable
    assert len(list(lora_layers(model))) == 2 * (4 + 2) + 2 * (4 + 4 + 2)  # (cross-)attention and FFN, no lm_head
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, batch, steps=1)  # forward and backward through every adapted layer, wo included
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

