"""The LoRA layers against the paper's formula h = W0 x + (alpha / r) B A x: outputs and gradients of the
fused paths equal the plain formula, the adapted layer equals the base at init, dropout touches only the
LoRA branch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lora import LoRAConfig, LoRAConv, LoRAEmbedding, LoRALinear, inject, lora_linear, unload

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _randomize_b(layer, name: str = "default") -> None:
    """Make the LoRA branch non-zero (B is zero at init; for embeddings A is)."""
    with torch.no_grad():
        for p in (layer.lora_a[name], layer.lora_b[name]):
            p.normal_(0, 0.3)


def _grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def test_worked_example_768_r8():
    """The seed's example: 768x768 Linear, r=8 -> 2 * 8 * 768 = 12,288 trainable of 602,880 (2.04 %)."""
    model = nn.Sequential(nn.Linear(768, 768))
    x = torch.randn(4, 768)
    before = model(x)
    summary = inject(model, LoRAConfig(r=8, alpha=16, target_modules=["0"]))
    assert (summary.trainable, summary.total) == (12_288, 602_880)
    assert f"{100 * summary.ratio:.2f}" == "2.04"
    assert str(summary) == "trainable params: 12,288 / 602,880 (2.04 %)"
    assert isinstance(model[0], LoRALinear)
    assert torch.allclose(model(x), before, atol=0, rtol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.lora_A.default", "0.lora_B.default"]


def _linear_case(kind: str, bias: bool):
    torch.manual_seed(0)
    base = nn.Linear(12, 20, bias=bias) if kind == "linear" else Conv1D(20, 12)
    if kind == "conv1d_hf" and not bias:
        base.bias = None
    layer = LoRALinear(base)
    layer.add_adapter("default", r=4, scaling=1.5)
    _randomize_b(layer)
    w = base.weight if kind == "linear" else base.weight.t()  # [out, in]
    return layer, w


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_output_and_gradients_equal_plain_formula(kind, bias):
    layer, w = _linear_case(kind, bias)
    a, b, s = layer.lora_a["default"], layer.lora_b["default"], layer.scaling["default"]
    base = layer.base_layer
    params = [a, b, base.weight] + ([base.bias] if bias else [])
    x = torch.randn(3, 5, 12, requires_grad=True)
    grad_out = torch.randn(3, 5, 20)

    fused = layer(x)
    fused.backward(grad_out)
    # the rank-major backward hands back gradients laid out like their parameters (no copies in the optimizer)
    assert all(p.grad.stride() == p.stride() for p in params)
    fused_grads = _grads(x, *params)

    plain = F.linear(x, w, base.bias) + s * F.linear(F.linear(x, a), b)
    plain.backward(grad_out)
    plain_grads = _grads(x, *params)

    assert fused.shape == (3, 5, 20)
    assert torch.allclose(fused, plain, **TOL)
    for got, want in zip(fused_grads, plain_grads):
        assert torch.allclose(got, want, **TOL)


@pytest.mark.parametrize("kind", ["linear", "conv1d_hf"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_hooks_on_the_wrapped_layer_still_run(kind, use_dora):
    """Hooks registered on a layer before it is wrapped (activation capture, steering) run on every forward, in
    training and inference, as in PEFT, which calls the base layer; the adapted output is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20) if kind == "linear" else Conv1D(20, 12))
    x = torch.randn(3, 5, 12)
    base_out = model(x).detach()
    seen = []
    model[0].register_forward_pre_hook(lambda module, args: seen.append("pre"))
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    inject(model, LoRAConfig(r=4, alpha=6, target_modules=["0"], use_dora=use_dora))
    _randomize_b(model[0])
    out = model(x)
    with torch.no_grad():
        out_inference = model(x)
    assert seen[0::2] == ["pre", "pre"]
    assert all(torch.allclose(seen_out, base_out, **TOL) for seen_out in seen[1::2])
    model[0].base_layer._forward_hooks.clear()
    model[0].base_layer._forward_pre_hooks.clear()
    for got in (out, out_inference):
        assert torch.allclose(got, model(x), **TOL)


def test_fused_function_skips_gradients_nobody_needs():
    """The frozen base gets no weight gradient; an input that needs none gets none."""
    layer, _ = _linear_case("linear", True)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(6, 12)
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is None and x.grad is None
    assert layer.lora_a["default"].grad is not None and layer.lora_b["default"].grad.abs().sum() > 0


def test_lora_linear_function_is_the_formula():
    x, w, bias = torch.randn(7, 10), torch.randn(6, 10), torch.randn(6)
    a, b = torch.randn(3, 10), torch.randn(6, 3)
    want = F.linear(x, w, bias) + 0.5 * F.linear(F.linear(x, a), b)
    assert torch.allclose(lora_linear(x, w, bias, a, b, 0.5), want, **TOL)
    assert torch.allclose(lora_linear(x, w.t().contiguous(), bias, a, b, 0.5, fan_in_fan_out=True), want, **TOL)


def test_embedding_equals_formula_and_base_at_init():
    torch.manual_seed(0)
    base = nn.Embedding(30, 8, padding_idx=0)
    layer = LoRAEmbedding(base)
    layer.add_adapter("default", r=4, scaling=2.0)
    ids = torch.tensor([[0, 3, 29, 3], [5, 6, 7, 0]])
    assert torch.equal(layer(ids), base(ids))
    _randomize_b(layer)
    a, b = layer.lora_a["default"], layer.lora_b["default"]
    out = layer(ids)
    out.sum().backward()
    got = _grads(a, b)
    plain = base(ids) + 2.0 * (a.t()[ids] @ b.t())
    plain.sum().backward()
    want_a, want_b = _grads(a, b)
    want_a[:, 0] = 0  # padding_idx rows get no gradient, as in the base embedding (and PEFT)
    assert torch.allclose(out, plain, **TOL)
    for g, w in zip(got, (want_a, want_b)):
        assert torch.allclose(g, w, **TOL)
    merged = base.weight + layer.delta_weight("default")
    assert torch.allclose(F.embedding(ids, merged), plain, **TOL)


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_equals_formula_and_merges(dims):
    torch.manual_seed(0)
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    base = conv(4, 6, 3, stride=2, padding=1, dilation=1)
    layer = LoRAConv(base)
    layer.add_adapter("default", r=2, scaling=0.75)
    x = torch.randn(2, 4, *([9] * dims), requires_grad=True)
    assert torch.equal(layer(x), base(x))
    _randomize_b(layer)
    a, b = layer.lora_a["default"], layer.lora_b["default"]
    assert a.shape == (2, 4, *([3] * dims)) and b.shape == (6, 2, *([1] * dims))
    out = layer(x)
    out.square().sum().backward()
    got = _grads(x, a, b)
    fn = F.conv1d if dims == 1 else F.conv2d
    plain = base(x) + 0.75 * fn(fn(x, a, None, 2, 1), b)
    plain.square().sum().backward()
    want = _grads(x, a, b)
    assert torch.allclose(out, plain, **TOL)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4)
    merged = fn(x.detach(), base.weight + layer.delta_weight("default"), base.bias, 2, 1)
    assert torch.allclose(merged, plain.detach(), atol=1e-5, rtol=1e-4)


def test_grouped_conv_refused_with_advice():
    with pytest.raises(ValueError, match="groups=1.*exclude this module"):
        LoRAConv(nn.Conv2d(4, 4, 3, groups=2))


def test_dropout_only_on_lora_branch():
    layer, w = _linear_case("linear", True)
    layer.dropout_p["default"] = 0.5
    a, b, s = layer.lora_a["default"], layer.lora_b["default"], layer.scaling["default"]
    x = torch.randn(64, 12, requires_grad=True)
    grad_out = torch.randn(64, 20)
    layer.train()
    torch.manual_seed(7)
    out = layer(x)
    out.backward(grad_out)
    got = _grads(x, a, b)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    assert not torch.equal(dropped, x)
    want = F.linear(x, w, layer.base_layer.bias) + s * F.linear(F.linear(dropped, a), b)
    assert torch.allclose(out, want, **TOL)
    want.backward(grad_out)  # the gradient of x flows through the base and, masked, through the LoRA branch
    for g, expected in zip(got, _grads(x, a, b)):
        assert torch.allclose(g, expected, **TOL)
    x = x.detach()
    layer.eval()  # no dropout at inference: the plain formula on x
    assert torch.allclose(layer(x), F.linear(x, w, layer.base_layer.bias) + s * F.linear(F.linear(x, a), b), **TOL)
    # with the LoRA branch at zero the output is the base output bit for bit, dropout or not
    layer.train()
    with torch.no_grad():
        b.zero_()
    assert torch.allclose(layer(x), layer.base_layer(x), atol=1e-6, rtol=0)


def test_no_dropout_means_no_copy():
    layer, _ = _linear_case("linear", True)
    x = torch.randn(2, 12)
    assert layer._dropped(x, "default") is x


def test_half_precision_base_keeps_fp32_adapter():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base)
    layer.add_adapter("default", r=2, scaling=2.0)
    _randomize_b(layer)
    a, b = layer.lora_a["default"], layer.lora_b["default"]
    assert a.dtype == torch.float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    want = base(x).float() + 2.0 * F.linear(F.linear(x.float(), a), b)
    assert torch.allclose(out.float(), want, atol=5e-2, rtol=2e-2)


def test_merge_unmerge_round_trip_and_double_merge_refused():
    layer, _ = _linear_case("conv1d_hf", True)
    x = torch.randn(5, 12)
    want = layer(x)
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer(x), want, **TOL)
    assert torch.allclose(layer.base_layer(x), want, **TOL)
    with pytest.raises(RuntimeError, match="already merged; unmerge it first"):
        layer.merge()
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)
    assert torch.allclose(layer(x), want, **TOL)


def test_wrapped_layers_expose_the_base_weight_and_bias():
    """transformers reads ``.weight`` of modules we wrap (``get_input_embeddings().weight``, T5's
    ``wo.weight.dtype``, ViT's ``projection.weight``): as in PEFT it is the base layer's, read-only, and the
    parameters are still counted once."""
    from helpers import tiny_gpt2

    model = tiny_gpt2()
    total = sum(p.numel() for p in model.parameters())
    summary = inject(model, LoRAConfig(r=4, target_modules=["wte", "c_attn"]))
    wte, c_attn = model.transformer.wte, model.transformer.h[0].attn.c_attn
    assert isinstance(wte, LoRAEmbedding) and model.get_input_embeddings() is wte
    assert model.get_input_embeddings().weight is wte.base_layer.weight is model.lm_head.weight  # still tied
    assert c_attn.weight is c_attn.base_layer.weight and c_attn.bias is c_attn.base_layer.bias
    assert summary.total == total + summary.trainable
    assert sum(p.numel() for p in model.parameters()) == summary.total
    conv = LoRAConv(nn.Conv2d(3, 4, 2))
    assert conv.weight is conv.base_layer.weight and conv.bias is conv.base_layer.bias
    with pytest.raises(AttributeError, match="has no setter"):
        wte.weight = torch.zeros(64, 32)


def test_whisper_reads_the_stride_of_its_wrapped_convolutions():
    """Whisper's encoder reads ``conv1.stride`` and ``conv2.stride`` in forward: the wrapper exposes the base
    convolution's hyperparameters, and the adapted model runs, trains and unloads to the same output."""
    from helpers import model_output, train_steps
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=0, pad_token_id=0)).eval()
    batch = {"input_features": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3)),
             "decoder_input_ids": torch.tensor([[0, 5, 6], [0, 7, 8]])}
    before = model_output(model, batch)
    inject(model, LoRAConfig(r=4, target_modules=["conv1", "conv2", "q_proj"]))
    conv2 = model.model.encoder.conv2
    assert isinstance(conv2, LoRAConv) and conv2.stride == (2,) and conv2.kernel_size == (3,)
    train_steps(model, batch)
    adapted = model_output(model, batch)
    assert not torch.allclose(adapted, before, atol=1e-4)
    assert torch.allclose(model_output(unload(model), batch), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
def test_fused_functions_have_exact_second_derivatives(fan_in_fan_out, dropout, frozen):
    """Hessian-vector products and gradient penalties differentiate the backward itself (``create_graph=True``):
    the fused functions' second derivatives equal the formula's (`gradgradcheck`, float64, every input; with
    the base weight and bias frozen too, when the forward keeps less)."""
    from lightning_lora.layers import _LoRAProduct

    g = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(*s, dtype=torch.float64, generator=g) for s in ((2, 3, 5), (4, 5), (4,)))
    a, b = torch.randn(2, 5, dtype=torch.float64, generator=g), torch.randn(4, 2, dtype=torch.float64, generator=g)
    w = w.t().contiguous() if fan_in_fan_out else w
    x_lora = x * 0.5 if dropout else None  # a stand-in for x after dropout: another tensor for the LoRA branch
    inputs = [t.requires_grad_(not (frozen and (t is w or t is bias))) for t in (x, w, bias, a, b)]

    def fused(x, w, bias, a, b):
        return lora_linear(x, w, bias, a, b, 1.5, fan_in_fan_out, None if x_lora is None else x * 0.5)

    assert torch.autograd.gradgradcheck(fused, inputs)
    frozen_lora = (x.detach(), bias.detach(), a.detach(), b.detach())  # only the base weight trains
    assert torch.autograd.gradgradcheck(lambda w: fused(frozen_lora[0], w, *frozen_lora[1:]),
                                        [w.detach().requires_grad_()])
    assert torch.autograd.gradgradcheck(lambda x, a, b: _LoRAProduct.apply(x, a, b, 1.5), [x, a, b])


def test_hessian_vector_product_through_a_layer_equals_the_formula():
    """The adapter's Hessian-vector product (the second derivatives through ``x A^T``, which the fused forward
    keeps for its backward), on the fused path and on the general path (two active adapters)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5)).double()
    layer.add_adapter("default", 3, 2.0)
    layer.add_adapter("other", 2, 1.0)
    for name in ("default", "other"):
        _randomize_b(layer, name)
    layer.double().requires_grad_(False)
    x = torch.randn(4, 6, dtype=torch.float64)

    def hvp(active):
        layer.active_adapters = active
        params = [p.requires_grad_() for n in active for p in (layer.lora_a[n], layer.lora_b[n])]
        grads = torch.autograd.grad(layer(x).pow(2).sum(), params, create_graph=True)
        vec = [torch.ones_like(p) for p in params]
        out = torch.autograd.grad(grads, params, vec)
        for p in params:
            p.requires_grad_(False)
        return out

    def formula_hvp(active):
        params = [p.detach().clone().requires_grad_() for n in active for p in (layer.lora_a[n], layer.lora_b[n])]
        y = layer.base_layer(x) + sum(layer.scaling[n] * (x @ params[2 * i].t()) @ params[2 * i + 1].t()
                                      for i, n in enumerate(active))
        grads = torch.autograd.grad(y.pow(2).sum(), params, create_graph=True)
        return torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params])

    for active in (["default"], ["default", "other"]):
        for got, want in zip(hvp(active), formula_hvp(active), strict=True):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "dora", "embedding", "conv2d"])
def test_float64_adapters_merge_in_float64(kind):
    torch.manual_seed(0)
    base = {"linear": nn.Linear(8, 6), "dora": nn.Linear(8, 6), "embedding": nn.Embedding(10, 6),
            "conv2d": nn.Conv2d(3, 4, 3, padding=1)}[kind].double()
    layer = {"embedding": LoRAEmbedding, "conv2d": LoRAConv}.get(kind, LoRALinear)(base)
    layer.add_adapter("default", 2, 2.0, use_dora=kind == "dora")
    _randomize_b(layer)
    x = {"embedding": torch.randint(0, 10, (3, 4)), "conv2d": torch.randn(2, 3, 5, 5, dtype=torch.float64)}.get(
        kind, torch.randn(3, 8, dtype=torch.float64))
    with torch.no_grad():
        want = layer(x)
        layer.merge()
        got = layer(x)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)  # rounding the update to float32: ~1e-7


@pytest.mark.parametrize("use_dora", [False, True])
def test_torch_func_per_sample_gradients(use_dora):
    """``vmap(grad(...))`` over an injected model (per-sample gradients, as for DP-SGD) equals one ordinary
    backward per sample; the fused autograd functions cannot run under torch.func, the plain arithmetic does."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["0", "2"], use_dora=use_dora))
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            _randomize_b(layer)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    x = torch.randn(4, 6)

    def loss(p, xi):
        return functional_call(model, p, (xi,)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x[:, None])
    for i in range(len(x)):
        model.zero_grad()
        model(x[i:i + 1]).pow(2).sum().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(per_sample[name][i], p.grad, **TOL), name
