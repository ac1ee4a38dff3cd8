"""Interop with PEFT itself, both ways: our saved adapters load in `peft.PeftModel.from_pretrained`, PEFT's
saved adapters load with our `load_adapter`; logits agree within 1e-5."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import model_output, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch, train_steps

from lightning_lora import LoRAConfig, inject, load_adapter, lora_layers, save_adapter

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


def test_peft_saved_batchnorm_statistics_load_in_ours(adapter_path):
    # PEFT saves a modules_to_save module's whole state_dict: BatchNorm's running statistics and its int64
    # num_batches_tracked come along.
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(64, 4))

    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules=["0", "4"], modules_to_save=["1"],
                                                              init_lora_weights=False))
    peft_model.train()(torch.randn(8, 3, 4, 4) * 3 + 1)  # moves the running statistics
    peft_model.save_pretrained(adapter_path)
    x = torch.randn(2, 3, 4, 4)
    model = build()
    load_adapter(model, adapter_path)
    assert model[1].num_batches_tracked == 1
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), peft_model.eval()(x), atol=1e-5, rtol=0)
