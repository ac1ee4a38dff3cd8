"""The fast paths: they must compile without graph breaks and compute exactly the plain formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lora import LoRAConfig, inject, lora_layers


class Mixed(nn.Module):
    """One of each layer LoRA wraps: Embedding -> Linear -> Conv1D -> Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.proj = nn.Linear(16, 24)
        self.c_fc = Conv1D(16, 24)
        self.conv = nn.Conv1d(16, 8, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(torch.relu(self.proj(self.embed(ids))))
        return self.conv(h.transpose(1, 2)).mean()


def _adapted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Mixed()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["embed", "proj", "c_fc", "conv"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (*layer.lora_a.values(), *layer.lora_b.values()):
                p.normal_(0, 0.2)
    return model.train()


def test_compile_fullgraph_no_graph_breaks_same_output_and_grads():
    ids = torch.randint(0, 20, (2, 6))
    eager, compiled_model = _adapted(), _adapted()
    explanation = torch._dynamo.explain(compiled_model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    want, got = eager(ids), compiled(ids)
    want.backward()
    got.backward()
    assert torch.allclose(got, want, atol=1e-6)
    grads = {n: p.grad for n, p in compiled_model.named_parameters() if p.requires_grad}
    assert len(grads) == 8
    for name, param in eager.named_parameters():
        if param.requires_grad:
            assert torch.allclose(grads[name], param.grad, atol=1e-5), name


def test_dropout_on_the_fused_path_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    inject(model, LoRAConfig(r=4, dropout=0.1, target_modules=["0", "2"]))
    x = torch.randn(8, 16)
    explanation = torch._dynamo.explain(model.train())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 4 and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0, so dA = 0


def test_dora_compiles_without_graph_breaks_same_output_and_grads():
    def dora() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), Conv1D(6, 20))
        inject(model, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], use_dora=True))
        for _, layer in lora_layers(model):
            nn.init.normal_(layer.lora_b["default"])
        return model

    x = torch.randn(3, 12)
    eager, compiled_model = dora(), dora()
    explanation = torch._dynamo.explain(compiled_model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    want, got = eager(x), torch.compile(compiled_model, fullgraph=True, backend="aot_eager")(x)
    want.sum().backward()
    got.sum().backward()
    assert torch.allclose(got, want, atol=1e-6)
    eager_grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert len(eager_grads) == 6  # A, B and the magnitude of both layers
    for name, param in compiled_model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, eager_grads[name], atol=1e-5), name


def test_fast_path_taken_only_when_it_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    inject(model, LoRAConfig(r=2, target_modules=["0"]))
    layer = model[0]
    x = torch.randn(3, 8)
    layer.train()
    assert layer._fused_dtype(x, "default") == torch.float32
    assert layer._fused_dtype(x.double(), "default") is None  # dtype mismatch: the general path casts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fused_dtype(x, "default") == torch.bfloat16  # autocast: fused, in autocast's dtype
        assert layer._fused_dtype(x.bfloat16(), "default") == torch.bfloat16
        assert layer._fused_dtype(x.double(), "default") is None  # autocast leaves fp64 alone: so do we
    layer.dropout_p["default"] = 0.1
    assert layer._fused_dtype(x, "default") == torch.float32  # the fused function takes the dropped LoRA input
    layer.lora_magnitude_vector["default"] = nn.Parameter(torch.ones(8))
    assert layer._fused_dtype(x, "default") is None  # DoRA with dropout: (g - 1) W0 x' needs the general path
    layer.eval()
    assert layer._fused_dtype(x, "default") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fused_dtype(x, "default") is None  # DoRA under autocast: general path


@pytest.mark.parametrize("base", [nn.Linear(12, 20), nn.Linear(12, 20, bias=False), Conv1D(20, 12)],
                         ids=["linear", "linear-no-bias", "conv1d"])
def test_without_gradients_the_fused_path_skips_autograd_and_computes_the_same(base):
    """Inference, evaluation with frozen adapters: no autograd.Function (its cost per call is most of a small
    layer's), the same arithmetic, so the same bits as the training-time forward."""
    torch.manual_seed(0)
    model = nn.Sequential(base)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["0"]))
    layer = model[0]
    for p in (*base.parameters(), layer.lora_b["default"]):  # Conv1D's bias starts at zero, B too
        nn.init.normal_(p)
    x = torch.randn(2, 5, 12)
    trained = layer(x)
    assert trained.grad_fn is not None and "LoRALinearFunction" in type(trained.grad_fn).__name__
    with torch.no_grad():
        no_grad = layer(x)
    with torch.inference_mode():
        inference = layer(x)
    layer.requires_grad_(False)
    frozen = layer(x)
    for out in (no_grad, inference, frozen):
        assert out.grad_fn is None and out.shape == (2, 5, 20)
        assert torch.equal(out, trained.detach())
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, b_lora = layer.lora_a["default"], layer.lora_b["default"]
    plain = x @ (w if isinstance(base, Conv1D) else w.t()) + 2 * x @ a.t() @ b_lora.t()
    assert torch.allclose(frozen, plain if b is None else plain + b, atol=1e-5)


def _graph(node) -> set[str]:
    """The names of the autograd nodes behind `node`."""
    return {type(node).__name__}.union(*(_graph(n) for n, _ in node.next_functions if n is not None))


@pytest.mark.parametrize(("case", "node"), [("bf16 base, fp32 adapter", "_LoRAProductBackward"),
                                            ("two active adapters", "_LoRAProductBackward"),
                                            ("DoRA", "_ScaleOutputsBackward")])
def test_without_gradients_the_other_functions_skip_autograd_and_compute_the_same(case, node):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20))
    if case == "bf16 base, fp32 adapter":  # the usual inference setup: a bf16 model, an adapter loaded in fp32
        model.bfloat16()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["0"], use_dora=case == "DoRA"))
    layer = model[0]
    if case == "two active adapters":
        inject(model, LoRAConfig(r=2, alpha=8, target_modules=["0"]), adapter_name="other")
        layer.active_adapters = ["default", "other"]
    for b in layer.lora_b.values():
        nn.init.normal_(b)
    x = torch.randn(2, 5, 12, dtype=layer.base_layer.weight.dtype)
    trained = layer(x)
    assert node in _graph(trained.grad_fn)
    with torch.inference_mode():
        inference = layer(x)
    assert inference.grad_fn is None and torch.equal(inference, trained.detach())


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_path_under_autocast_equals_the_autocast_formula(fan_in_fan_out, dropout):
    """Under bf16 autocast the fused path computes what F.linear and the LoRA product compute under autocast
    (PEFT's and our general path's formula), to bf16 precision, in output and in every gradient."""
    torch.manual_seed(0)
    base = Conv1D(24, 16) if fan_in_fan_out else nn.Linear(16, 24)
    model = nn.Sequential(base)
    inject(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=["0"]))
    layer = model[0].train()
    with torch.no_grad():
        layer.lora_b["default"].normal_()
    a, b = layer.lora_a["default"], layer.lora_b["default"]
    x = torch.randn(2, 6, 16, requires_grad=True)
    dy = torch.randn(2, 6, 24)

    def grads(fn):
        torch.manual_seed(1)  # the same dropout mask for both
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        out.backward(dy)
        result = [out.float()] + [t.grad.clone() for t in (x, a, b)]
        for t in (x, a, b):
            t.grad = None
        return out.dtype, result

    def formula():
        w = layer.base_layer.weight.t() if fan_in_fan_out else layer.base_layer.weight
        x_lora = F.dropout(x, dropout) if dropout else x
        return F.linear(x, w, layer.base_layer.bias) + 2.0 * F.linear(F.linear(x_lora, a), b)

    got_dtype, got = grads(lambda: model(x))
    want_dtype, want = grads(formula)
    assert got_dtype == want_dtype == torch.bfloat16
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


def test_fused_path_under_autocast_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    inject(model, LoRAConfig(r=4, target_modules=["0", "2"]))
    x = torch.randn(8, 16)

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)
    explanation = torch._dynamo.explain(run)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    out = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_fast_path_equals_formula_in_every_grad_mode(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    inject(model, LoRAConfig(r=4, alpha=4, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_b["default"].normal_()
    x = torch.randn(2, 5, 16)
    a, b, base = layer.lora_a["default"], layer.lora_b["default"], layer.base_layer
    want = base(x) + 1.0 * F.linear(F.linear(x, a), b)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    with context():
        got = model(x)
    assert torch.allclose(got, want.detach(), atol=1e-6)
    assert got.requires_grad == (mode == "grad")
