"""QLoRA: NF4 base weights (bitsandbytes and torchao backends) with LoRA on top: memory, training, merge
(dense or re-quantized, with the error reported), adapters that load on 4-bit and full-precision bases,
models loaded 4-bit by transformers' BitsAndBytesConfig, and the offline example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_state, model_output, state_snapshot, tiny_llama, token_batch
from torch import nn

from lightning_lora import (
    ConfigError,
    LoRAConfig,
    LoRALayer,
    inject,
    load_adapter,
    merge,
    quant,
    save_adapter,
    unload,
)

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in quant.available_backends(),
                                                     reason=f"{b} is not installed")) for b in quant.BACKENDS]


def _lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"]).loss


def _train(model: nn.Module, batch: dict, steps: int = 8, lr: float = 0.02) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _lm_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_linear_is_about_7x_smaller_and_computes_its_dequantized_weight(backend):
    dense = nn.Linear(512, 512)
    q = quant.quantize(dense, backend)
    ratio = dense.weight.nbytes / quant.weight_nbytes(q)
    assert 7.0 < ratio < 8.0, ratio  # 4 bits + double-quantized absmax per 64: ~7.7x
    w = quant.dequantize(q)
    assert w.shape == (512, 512) and w.dtype == torch.float32
    assert (w - dense.weight).norm() / dense.weight.norm() < 0.12  # NF4's error on uniform init weights
    x = torch.randn(4, 512)
    assert torch.allclose(quant.linear(q, x), F.linear(x, w, dense.bias), atol=1e-4, rtol=1e-4)
    assert q.bias is dense.bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_compute_dtype_trains_fp32_lora_on_top(backend):
    model, batch = tiny_llama(hidden=64), token_batch()
    want = model_output(model, batch)
    inject(model, LoRAConfig(r=4, target_modules="all-linear", quantize="nf4", quant_backend=backend,
                             compute_dtype="bfloat16"))
    layer = model.model.layers[0].self_attn.q_proj
    assert quant.dequantize(layer.base_layer).dtype == torch.bfloat16 and layer.lora_A["default"].dtype == torch.float32
    got = model_output(model, batch)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.5  # NF4 + bf16 rounding, not garbage
    losses = _train(model, batch, steps=4)
    assert losses[-1] < losses[0] and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def _qlora_trained(backend: str, batch: dict) -> tuple[nn.Module, list[float]]:
    torch.manual_seed(0)
    model = tiny_llama(hidden=64)
    summary = inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", quantize="nf4",
                                       quant_backend=backend))
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    dense_total = sum(p.numel() for p in tiny_llama(hidden=64).parameters())
    assert summary.total == dense_total + summary.trainable  # 4-bit weights counted at their logical size
    return model, _train(model, batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qlora_trains_then_merges_dense_or_requantized(backend):
    batch = token_batch()
    model, losses = _qlora_trained(backend, batch)
    assert losses[-1] < 0.9 * losses[0], losses
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LoRALayer) and quant.is_quantized(layer.base_layer)
    assert torch.allclose(quant.dequantize(layer.base_layer), quant.dequantize(quant.quantize(
        tiny_llama(hidden=64).model.layers[0].mlp.up_proj, backend)))  # the 4-bit base did not move
    want = model_output(model, batch)

    errors = quant.unload_quantized(model)  # dense fp32 export: exact
    assert len(errors) == 14 and max(errors.values()) < 1e-6
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert torch.allclose(model_output(model, batch), want, atol=1e-5, rtol=1e-5)

    requantized, _ = _qlora_trained(backend, batch)  # deepcopy would re-quantize torchao's NF4 tensors
    errors = quant.unload_quantized(requantized, requantize=True)  # 4-bit again: NF4's error, reported
    assert all(0.0 < e < 0.15 for e in errors.values()), errors
    assert quant.is_quantized(requantized.model.layers[0].mlp.up_proj)
    assert (model_output(requantized, batch) - want).abs().max() < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["unload", "unload_quantized"])
def test_dense_export_of_gpt2_gives_back_conv1d_and_reloads_in_transformers(backend, how, tmp_path):
    """GPT-2's Conv1D stores [in, out]; its 4-bit base is [out, in]. The dense export is a Conv1D again, so
    save_pretrained writes weights that GPT2LMHeadModel loads (an nn.Linear there was a shape mismatch)."""
    from helpers import tiny_gpt2
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    model, batch = tiny_gpt2(), token_batch()
    inject(model, LoRAConfig(r=4, target_modules=["c_attn", "c_fc"], quantize="nf4", quant_backend=backend,
                             use_dora=True))
    for layer in model.modules():
        if isinstance(layer, LoRALayer):
            nn.init.normal_(layer.lora_B["default"], std=0.1)  # a trained adapter
    want = model_output(model, batch)
    {"unload": unload, "unload_quantized": quant.unload_quantized}[how](model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    model.save_pretrained(tmp_path)
    assert torch.allclose(model_output(GPT2LMHeadModel.from_pretrained(tmp_path), batch), want, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["merge", "unload", "unload_quantized"])
def test_bf16_compute_merges_into_layers_of_the_models_dtype(backend, how):
    """An fp32 model computing its 4-bit layers in bf16 takes and returns fp32 there: the merged dense layers
    are fp32 too, so the model still runs (in bf16 they refused the fp32 activations)."""
    model, batch = tiny_llama(hidden=64), token_batch()
    inject(model, LoRAConfig(r=4, target_modules=["q_proj", "down_proj"], quantize="nf4", quant_backend=backend,
                             compute_dtype="bfloat16"))
    want = model_output(model, batch)
    {"merge": merge, "unload": unload, "unload_quantized": quant.unload_quantized}[how](model)
    proj = model.model.layers[0].self_attn.q_proj
    assert (proj.base_layer if how == "merge" else proj).weight.dtype == torch.float32
    assert (model_output(model, batch) - want).abs().max() < 0.02  # the bf16 rounding of the unmerged model


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_saved_from_qlora_loads_on_4bit_and_fp32_bases(backend, adapter_path):
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], quantize="nf4", quant_backend=backend)
    model, batch = tiny_llama(hidden=64), token_batch()
    inject(model, config)
    _train(model, batch, steps=3)
    save_adapter(model, adapter_path)
    text = (adapter_path / "adapter_config.json").read_text()
    assert "quant_backend" not in text and "compute_dtype" not in text  # PEFT's keys only

    fresh = tiny_llama(hidden=64)
    assert len(quant.quantize_model(fresh, config)) == 4
    load_adapter(fresh, adapter_path)
    assert torch.allclose(model_output(fresh, batch), model_output(model, batch), atol=1e-5, rtol=1e-5)
    full = tiny_llama(hidden=64)
    load_adapter(full, adapter_path)  # the same adapter on the full-precision base: close, not equal
    assert (model_output(full, batch) - model_output(model, batch)).abs().max() < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_amplification_factors_on_a_4bit_base_read_its_dequantized_weights(backend, tmp_path):
    from lightning_lora.analysis import amplification_factors

    model = tiny_llama(hidden=64)
    inject(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize="nf4", quant_backend=backend))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALayer):
                module.lora_b["default"].normal_()
    directory = save_adapter(model, tmp_path / "adapter")
    dense = tiny_llama(hidden=64)
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, LoRALayer):
                dense.get_submodule(path).weight.copy_(quant.dequantize(module.base_layer))
    factors = amplification_factors(model, directory)
    assert len(factors) == 4 and all(f > 0 for f in factors.values())
    assert factors == pytest.approx(amplification_factors(dense, directory), rel=1e-4)


def test_model_loaded_with_bitsandbytes_config_is_wrapped_with_dora(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden=64).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    batch = token_batch()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True))
    layer = model.model.layers[1].mlp.down_proj
    assert quant.is_quantized(layer.base_layer) and not layer.base_layer.support_avx512bf16_for_cpu
    assert torch.allclose(layer.lora_magnitude_vector["default"], quant.dequantize(layer.base_layer).norm(dim=1),
                          atol=1e-5)
    losses = _train(model, batch)
    assert losses[-1] < 0.95 * losses[0], losses
    want = model_output(model, batch)
    assert max(quant.unload_quantized(model).values()) < 1e-6
    # DoRA's unmerged form sums W0 x + (g - 1) W0 x + g s B A x: fp32 rounding of a few 1e-6 per layer
    assert torch.allclose(model_output(model, batch), want, atol=1e-4, rtol=1e-4)


def test_bnb_cpu_repacking_is_undone_before_dequantize():
    bnb = pytest.importorskip("bitsandbytes")
    q = quant.quantize(nn.Linear(128, 64), "bnb")
    want = quant.dequantize(q).clone()
    # What bitsandbytes does in place at an eval-mode CPU forward on AVX512-BF16 machines.
    q.weight.data, q.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(q.weight.data,
                                                                                         q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu
    assert torch.allclose(quant.dequantize(q), want, atol=2e-2 * want.abs().max().item())  # bf16 absmax


def test_unquantizable_target_changes_nothing():
    """Every target is checked before any is replaced: an error on a later one leaves the earlier ones dense."""
    if "torchao" not in quant.available_backends():
        pytest.skip("torchao is not installed")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(30, 2))  # 2 x 30 weights: not a multiple of 64
    before = state_snapshot(model)
    with pytest.raises(ConfigError, match=r"'2'.*divisible by 64, got \(2, 30\).*exclude_modules.*quant_backend='bnb'"):
        inject(model, LoRAConfig(r=2, target_modules=["0", "2"], quantize="nf4", quant_backend="torchao"))
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert_same_state(model, before)


def test_config_fields_validated_and_kept_out_of_peft_config():
    with pytest.raises(ConfigError, match="quant_backend must be None, 'bnb' or 'torchao'"):
        LoRAConfig(quantize="nf4", quant_backend="gptq")
    with pytest.raises(ConfigError, match="compute_dtype must be"):
        LoRAConfig(quantize="nf4", compute_dtype="int8")
    peft_dict = LoRAConfig(quantize="nf4", quant_backend="torchao", compute_dtype="bfloat16").to_peft_dict()
    assert not {"quantize", "quant_backend", "compute_dtype"} & set(peft_dict)


def test_example_runs_offline(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "qlora.py"), "--max-steps", "4",
                           "--out", str(tmp_path / "adapter")], check=False, capture_output=True, text=True,
                          timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loss" in proc.stdout and "merge error" in proc.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_callback_trains_qlora_on_gpt2_conv1d(tmp_path):
    import lightning as L
    from helpers import tiny_gpt2
    from lit_models import CausalLM, trainer_kwargs

    from lightning_lora import LoRACallback

    module = CausalLM(lr=0.02)
    config = LoRAConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"], quantize="nf4")
    L.seed_everything(0, verbose=False)
    L.Trainer(**trainer_kwargs(tmp_path, callbacks=[LoRACallback(config, model_attr="model",
                                                                 adapter_dir=tmp_path / "adapters")])).fit(module)
    layer = module.model.transformer.h[0].attn.c_attn  # GPT-2's Conv1D, stored [in, out], now 4-bit [out, in]
    assert quant.is_quantized(layer.base_layer) and (layer.in_features, layer.out_features) == (32, 96)
    assert layer.lora_B["default"].abs().max() > 0
    fresh = tiny_gpt2()
    quant.quantize_model(fresh, config)
    load_adapter(fresh, tmp_path / "adapters" / "last")
    batch = token_batch()
    assert torch.allclose(model_output(fresh, batch), model_output(module.model.eval(), batch), atol=1e-5, rtol=1e-5)
