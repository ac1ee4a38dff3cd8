"""DoRA (Liu et al. 2024) against the paper's formula h = m * (W0 + s B A) x / ||W0 + s B A|| + bias, with
the norm a constant in backward; exact merge / unmerge; PEFT-format files that PEFT reads and writes alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import model_output, tiny_gpt2, tiny_llama, token_batch, train_steps
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lora import (
    ConfigError,
    LoRAConfig,
    LoRALayer,
    inject,
    load_adapter,
    merge,
    save_adapter,
    unload,
    unmerge,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _dora_layer(kind: str, bias: bool = True):
    base = nn.Linear(12, 20, bias=bias) if kind == "linear" else Conv1D(20, 12)
    model = nn.Sequential(base)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["0"], use_dora=True))
    return model, model[0]


def _perturb(layer, name: str = "default") -> None:
    """Move B off zero and m off ||W0||, as training would."""
    with torch.no_grad():
        layer.lora_B[name].normal_(0, 0.3)
        layer.lora_magnitude_vector[name].mul_(torch.linspace(0.7, 1.4, layer.out_features))


def _plain_dora(layer, x: torch.Tensor) -> torch.Tensor:
    """The paper's eq. (5) written out: W' = m * V / ||V||_row, V = W0 + s B A, the norm detached."""
    w0 = layer.base_layer.weight.t() if layer.fan_in_fan_out else layer.base_layer.weight
    a, b, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    v = w0.detach() + layer.scaling["default"] * b @ a
    return F.linear(x, (m / v.norm(dim=1).detach())[:, None] * v, layer.base_layer.bias)


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
def test_outputs_and_gradients_equal_the_formula(kind, bias):
    model, layer = _dora_layer(kind, bias)
    x = torch.randn(3, 5, 12)
    w0 = layer.base_layer.weight.t() if kind == "conv1d" else layer.base_layer.weight
    assert torch.allclose(layer.lora_magnitude_vector["default"], w0.norm(dim=1), **TOL)  # m = ||W0|| per row
    assert torch.allclose(model(x), layer.base_layer(x), **TOL)  # starts at the base
    _perturb(layer)
    params = [layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]]
    if bias:  # bias="all" trains it too
        params.append(layer.base_layer.bias.requires_grad_(True))
    for forward in (model, lambda t: LoRALayer.forward(layer, t)):  # fused path, then the general one
        xg = x.clone().requires_grad_(True)
        ours, ref = forward(xg), _plain_dora(layer, xg)
        assert torch.allclose(ours, ref, **TOL)
        g = torch.randn_like(ref)
        for got, want in zip(torch.autograd.grad(ours, [xg, *params], g), torch.autograd.grad(ref, [xg, *params], g)):
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    model.load_state_dict({k: v * 1.5 if k == "0.base_layer.weight" else v for k, v in model.state_dict().items()})
    assert torch.allclose(model(x), _plain_dora(layer, x), **TOL)  # the cached ||W0|| follows the new weight


def test_dropout_applies_to_the_dora_branch_only():
    """With dropout, h = W0 x + bias + (g - 1) W0 x' + g s B A x' (x' = dropout(x), as PEFT); eval drops nothing."""
    base = nn.Linear(12, 20)
    model = nn.Sequential(base)
    inject(model, LoRAConfig(r=4, alpha=8, dropout=0.5, target_modules=["0"], use_dora=True))
    layer = model[0]
    _perturb(layer)
    x = torch.randn(3, 12)
    torch.manual_seed(7)
    ours = model(x)
    torch.manual_seed(7)
    xd = F.dropout(x, 0.5, True)
    g = layer.dora_scale("default")
    a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    want = base(x) + (g - 1) * F.linear(xd, base.weight) + g * s * F.linear(F.linear(xd, a), b)
    assert torch.allclose(ours, want, **TOL) and not torch.allclose(ours, _plain_dora(layer, x), **TOL)
    model.eval()
    assert torch.allclose(model(x), _plain_dora(layer, x), **TOL)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama])
def test_merge_unmerge_unload_exact(factory):
    model, batch = factory(), token_batch()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    train_steps(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = model_output(model, batch)
    merge(model)
    assert torch.allclose(model_output(model, batch), want, **TOL)
    unmerge(model)
    for key, value in model.state_dict().items():
        assert torch.allclose(value, before[key], atol=1e-6, rtol=1e-5), key
    assert torch.allclose(model_output(unload(model), batch), want, **TOL)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


def test_save_load_roundtrip_and_keys(adapter_path):
    model, batch = tiny_llama(), token_batch()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    train_steps(model, batch)
    save_adapter(model, adapter_path)
    tensors = load_file(str(adapter_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"
    assert tensors[key].shape == (16,)  # 2 KV heads x 8: one magnitude per output feature, no ".weight"
    assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 4
    fresh = tiny_llama()
    config = load_adapter(fresh, adapter_path)
    assert config.use_dora
    assert torch.allclose(model_output(fresh, batch), model_output(model, batch), **TOL)


@pytest.mark.parametrize("factory,targets", [(tiny_gpt2, ["c_attn", "c_fc"]), (tiny_llama, ["q_proj", "down_proj"])])
def test_peft_reads_ours_and_we_read_peft(tmp_path, factory, targets):
    peft = pytest.importorskip("peft")
    batch = token_batch()
    ours = factory()
    inject(ours, LoRAConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    train_steps(ours, batch)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "ours")).eval()
    assert torch.allclose(model_output(theirs, batch), model_output(ours, batch), **TOL)

    peft_model = peft.get_peft_model(factory(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                use_dora=True))
    train_steps(peft_model, batch)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    fresh = factory()
    load_adapter(fresh, tmp_path / "peft")
    assert torch.allclose(model_output(fresh, batch), model_output(peft_model, batch), **TOL)


def test_dora_rejects_non_linear_targets():
    model = tiny_gpt2()
    with pytest.raises(ConfigError, match=r"use_dora=True supports Linear and Conv1D targets only.*'transformer.wte'"):
        inject(model, LoRAConfig(target_modules=["wte"], use_dora=True))
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


def test_callback_trains_dora_and_exports_it(tmp_path):
    import lightning as L
    from lit_models import CausalLM, trainer_kwargs

    from lightning_lora import LoRACallback

    module = CausalLM(lr=0.02)
    callback = LoRACallback(r=4, alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True, model_attr="model",
                            adapter_dir=tmp_path / "adapters")
    L.seed_everything(0, verbose=False)
    L.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback])).fit(module)
    layer = module.model.transformer.h[0].attn.c_attn
    norm = layer.base_layer.weight.t().norm(dim=1)  # where the magnitude started
    assert (layer.lora_magnitude_vector["default"] - norm).abs().max() > 1e-4  # m trained
    fresh = tiny_gpt2()
    load_adapter(fresh, tmp_path / "adapters" / "last")
    batch = token_batch()
    assert torch.allclose(model_output(fresh, batch), model_output(module.model.eval(), batch), **TOL)


def test_dora_traces_without_graph_breaks():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    inject(model, LoRAConfig(r=4, target_modules=["0", "2"], use_dora=True))
    explanation = torch._dynamo.explain(model)(torch.randn(5, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
