"""Injecting LoRA into real (tiny) architectures, training, merging, unmerging, unloading, and several named
adapters on one model."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    assert_same_state,
    image_batch,
    model_output,
    small_conv_net,
    state_snapshot,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    token_batch,
    train_steps,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_lora import (
    ConfigError,
    LoRAConfig,
    LoRAConv,
    LoRALayer,
    delete_adapter,
    disable_adapters,
    inject,
    lora_layers,
    merge,
    set_adapter,
    unload,
    unmerge,
)

TOL = {"atol": 1e-5, "rtol": 1e-4}

CASES = {
    "gpt2": (tiny_gpt2, token_batch, LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]), Conv1D),
    "llama": (tiny_llama, token_batch, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), nn.Linear),
    "bert": (tiny_bert_classifier, token_batch,
             LoRAConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]), nn.Linear),
    "conv": (small_conv_net, image_batch,
             LoRAConfig(r=2, alpha=4, target_modules=["conv_in", "conv_mid", "conv_row"]), nn.Conv2d),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_merge_unmerge_unload(case):
    build, make_batch, config, base_type = CASES[case]
    model, batch = build(), make_batch()
    base_out = model_output(model, batch)
    base_types = {p: type(m) for p, m in model.named_modules()}
    inject(model, config)
    assert torch.allclose(model_output(model, batch), base_out, atol=1e-6, rtol=0), "LoRA must start at the base"
    layers = dict(lora_layers(model))
    assert layers and all(isinstance(m.base_layer, (base_type, nn.Conv1d)) for m in layers.values())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    train_steps(model, batch, steps=3)
    assert all(layer.lora_b["default"].abs().sum() > 0 or isinstance(layer, LoRAConv) for layer in layers.values())
    for name, param in model.named_parameters():  # everything but the adapter stayed put
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    tuned = model_output(model, batch)
    assert not torch.allclose(tuned, base_out, atol=1e-3)

    merge(model)
    assert torch.allclose(model_output(model, batch), tuned, **TOL)
    unmerge(model)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.allclose(param, frozen[name], atol=1e-6), name
    assert torch.allclose(model_output(model, batch), tuned, **TOL)

    plain = unload(model)
    assert plain is model and not list(lora_layers(model))
    assert {p: type(m) for p, m in model.named_modules()} == base_types
    assert not any("lora" in n for n in model.state_dict())
    assert torch.allclose(model_output(model, batch), tuned, **TOL)


def test_freezing_and_modules_to_save():
    model = tiny_bert_classifier()
    inject(model, CASES["bert"][2])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} | {"classifier.weight", "classifier.bias"}
    assert any(".query.lora_A.default" in n for n in trainable) and any(".value.lora_B" in n for n in trainable)


def test_inject_twice_is_a_no_op_and_another_config_raises():
    model = tiny_gpt2()
    config = CASES["gpt2"][2]
    first = inject(model, config)
    before = state_snapshot(model)
    second = inject(model, config)
    assert (first.trainable, first.total) == (second.trainable, second.total)
    assert list(state_snapshot(model)) == list(before)
    for _, layer in lora_layers(model):
        assert not isinstance(layer.base_layer, LoRALayer) and list(layer.lora_a) == ["default"]
    with pytest.raises(ConfigError, match="already injected with a different config"):
        inject(model, config.replace(r=2))


def test_default_targets_from_model_type():
    model = tiny_llama()
    inject(model, LoRAConfig(r=2))
    assert sorted({p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)}) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="no default target_modules for model type None; set target_modules"):
        inject(small_conv_net(), LoRAConfig())


def test_default_targets_are_peft_s():
    """target_modules=None picks what PEFT picks for the same model type (Phi: attention and MLP)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
    from transformers import PhiConfig, PhiForCausalLM

    from lightning_lora.config import DEFAULT_TARGETS

    for model_type in ("phi", "mt5", "mpt", "gpt_neo", "gpt_bigcode", "codegen", "electra", "deberta"):
        assert sorted(DEFAULT_TARGETS[model_type]) == sorted(peft_table[model_type]), model_type
    model = PhiForCausalLM(PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, max_position_embeddings=32))
    inject(model, LoRAConfig(r=2))
    assert sorted({p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)}) == ["fc1", "fc2", "q_proj", "v_proj"]


def test_default_targets_of_vit_under_either_naming():
    """transformers 5 renamed ViT's query/value to q_proj/v_proj: the default finds them either way."""
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                               image_size=8, patch_size=4))
    inject(model, LoRAConfig(r=2))
    assert sorted({p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)}) in (["q_proj", "v_proj"], ["query", "value"])


def test_grouped_query_attention_shapes():
    model = tiny_llama()
    inject(model, LoRAConfig(r=4, target_modules=["q_proj", "k_proj"]))
    layers = dict(lora_layers(model))
    q, k = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.k_proj"]
    assert q.lora_b["default"].shape == (32, 4) and k.lora_b["default"].shape == (16, 4)


def test_no_match_lists_candidates():
    model = tiny_gpt2()
    before = state_snapshot(model)
    with pytest.raises(ConfigError, match=r"matches no module of GPT2LMHeadModel; candidate names: .*'c_attn'"):
        inject(model, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"target_modules='.\*nothing' matches no module"):
        inject(model, LoRAConfig(target_modules=r".*nothing"))
    with pytest.raises(ConfigError, match="GPT2Attention, which LoRA cannot wrap.*c_attn"):
        inject(model, LoRAConfig(target_modules=["attn"]))
    with pytest.raises(ConfigError, match=r"'transformer.h.0.ln_1' is a LayerNorm, .*\(exclude_modules\)$"):
        inject(model, LoRAConfig(target_modules=["ln_1"]))
    with pytest.raises(ConfigError, match=r"modules_to_save names \['classifer'\] match no module .*'lm_head'"):
        inject(model, LoRAConfig(target_modules=["c_attn"], modules_to_save=["classifer"]))
    assert not list(lora_layers(model)) and list(state_snapshot(model)) == list(before)


def test_regex_targets():
    model = tiny_llama()
    inject(model, LoRAConfig(r=2, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"))
    assert [p for p, _ in lora_layers(model)] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("build, head", [(tiny_gpt2, "lm_head"), (tiny_llama, "lm_head")])
def test_all_linear_skips_output_head(build, head):
    model = build()
    inject(model, LoRAConfig(r=2, target_modules="all-linear", exclude_modules=["model.layers.0.mlp.up_proj"]))
    paths = [p for p, _ in lora_layers(model)]
    assert head not in paths and not isinstance(model.get_submodule(head), LoRALayer)
    assert "model.layers.0.mlp.up_proj" not in paths
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    expected = {"c_attn", "c_proj", "c_fc"} if build is tiny_gpt2 else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert leaves == expected


@pytest.mark.parametrize("bias, expected", [
    ("none", set()),
    ("lora_only", {"transformer.h.0.attn.c_attn.base_layer.bias", "transformer.h.1.attn.c_attn.base_layer.bias"}),
])
def test_bias_modes(bias, expected):
    model = tiny_gpt2()
    inject(model, CASES["gpt2"][2].replace(bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == expected


def test_bias_all_trains_every_bias():
    model = tiny_gpt2()
    inject(model, CASES["gpt2"][2].replace(bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert trainable == biases and "transformer.ln_f.bias" in biases


def test_rank_and_alpha_pattern():
    model = tiny_llama()
    config = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=False,
                        rank_pattern={"model.layers.1.self_attn.q_proj": 2, r".*v_proj": 6},
                        alpha_pattern={"q_proj": 3})
    inject(model, config)
    layers = dict(lora_layers(model))
    q0, q1 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.q_proj"]
    v0 = layers["model.layers.0.self_attn.v_proj"]
    assert q0.lora_a["default"].shape[0] == 4 and q0.scaling["default"] == pytest.approx(3 / 4)
    assert q1.lora_a["default"].shape[0] == 2 and q1.scaling["default"] == pytest.approx(3 / 2)
    assert v0.lora_a["default"].shape[0] == 6 and v0.scaling["default"] == pytest.approx(8 / 6)
    rs = LoRAConfig(r=16, alpha=8, use_rslora=True)
    assert rs.scaling("x") == pytest.approx(2.0)


def test_multiple_adapters():
    model, batch = tiny_gpt2(), token_batch()
    base_out = model_output(model, batch)
    config = CASES["gpt2"][2]
    inject(model, config)
    train_steps(model, batch)
    out_default = model_output(model, batch)
    inject(model, config.replace(r=2), adapter_name="other")
    # the new adapter is active and the only trainable thing; it starts at zero
    assert torch.allclose(model_output(model, batch), base_out, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".other") for n in trainable)
    train_steps(model, batch)
    out_other = model_output(model, batch)
    assert not torch.allclose(out_other, out_default, atol=1e-3)

    set_adapter(model, "default")
    assert torch.allclose(model_output(model, batch), out_default, **TOL)
    assert all(n.endswith(".default") for n, p in model.named_parameters() if p.requires_grad)
    with disable_adapters(model):
        assert torch.allclose(model_output(model, batch), base_out, **TOL)
    assert torch.allclose(model_output(model, batch), out_default, **TOL)
    with pytest.raises(KeyError, match="no adapter named 'nope'; the model has \\['default', 'other'\\]"):
        set_adapter(model, "nope")
    inject(model, config.replace(r=3), adapter_name="third")
    set_adapter(model, "default")
    delete_adapter(model, "third")  # not the active one: "default" stays active and the only one training
    assert torch.allclose(model_output(model, batch), out_default, **TOL)
    assert all(n.endswith(".default") for n, p in model.named_parameters() if p.requires_grad)

    delete_adapter(model, "default")
    assert torch.allclose(model_output(model, batch), out_other, **TOL)
    assert not any(".default" in n for n in model.state_dict())
    delete_adapter(model, "other")
    assert not list(lora_layers(model))
    assert torch.allclose(model_output(model, batch), base_out, **TOL)


def test_merge_twice_refused_and_merged_model_guards():
    model, batch = tiny_llama(), token_batch()
    inject(model, CASES["llama"][2])
    train_steps(model, batch)
    merge(model)
    with pytest.raises(RuntimeError, match="already merged; unmerge it first"):
        merge(model)
    with pytest.raises(RuntimeError, match="unmerge\\(model\\) before disabling"), disable_adapters(model):
        pass
    with pytest.raises(RuntimeError, match="unmerge\\(model\\) before injecting"):
        inject(model, CASES["llama"][2].replace(r=2), adapter_name="second")
    with pytest.raises(RuntimeError, match="unmerge\\(model\\) before switching adapters"):
        set_adapter(model, "default")


def test_disable_adapters_nests():
    """Leaving an inner block (normally or by an exception) keeps the outer block's adapters off."""
    model, batch = tiny_gpt2(), token_batch()
    base_out = model_output(model, batch)
    inject(model, CASES["gpt2"][2])
    train_steps(model, batch)
    tuned = model_output(model, batch)
    with disable_adapters(model):
        with disable_adapters(model):
            pass
        assert torch.allclose(model_output(model, batch), base_out, **TOL)
        with pytest.raises(ValueError), disable_adapters(model):
            raise ValueError
        assert torch.allclose(model_output(model, batch), base_out, **TOL)
    assert torch.allclose(model_output(model, batch), tuned, **TOL)


def test_merge_inside_disable_adapters_refused():
    """Merged weights would give the adapted output inside a block that promises the base model's."""
    model, batch = tiny_gpt2(), token_batch()
    base_out = model_output(model, batch)
    inject(model, CASES["gpt2"][2])
    train_steps(model, batch)
    before = state_snapshot(model)
    with disable_adapters(model):
        for fold in (merge, unload):
            with pytest.raises(RuntimeError, match="inside a disable_adapters block\\); merge or unload after"):
                fold(model)
        assert torch.allclose(model_output(model, batch), base_out, **TOL)
    assert_same_state(model, before)
    unload(model)


def test_invalid_adapter_name():
    with pytest.raises(ConfigError, match="adapter_name '../x' must be 1-64 letters"):
        inject(tiny_gpt2(), CASES["gpt2"][2], adapter_name="../x")


def test_embedding_target():
    model, batch = tiny_gpt2(), token_batch()
    inject(model, LoRAConfig(r=2, target_modules=["wpe"]))
    layer = dict(lora_layers(model))["transformer.wpe"]
    assert type(layer).__name__ == "LoRAEmbedding"
    train_steps(model, batch)
    tuned = model_output(model, batch)
    unload(model)
    assert type(model.transformer.wpe) is nn.Embedding
    assert torch.allclose(model_output(model, batch), tuned, **TOL)


def test_merging_a_tied_weight_refused():
    """GPT-2's wte shares its weight with lm_head: folding the update into it would change the head too."""
    model, batch = tiny_gpt2(), token_batch()
    inject(model, LoRAConfig(r=2, target_modules=["wte"]))
    train_steps(model, batch)
    before = state_snapshot(model)
    for fold in (merge, unload):
        with pytest.raises(RuntimeError, match="transformer.wte.base_layer.weight is shared with lm_head.weight"):
            fold(model)
        assert list(state_snapshot(model)) == list(before)
        assert all(torch.equal(v, before[k]) for k, v in state_snapshot(model).items())


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect")])
def test_unwrappable_conv_target_refused_model_unchanged(conv):
    """A grouped or non-zero-padding conv is refused before any layer is wrapped (it used to raise a bare
    ValueError halfway through, leaving conv_in wrapped and nothing recorded)."""
    model = small_conv_net()
    model.conv_mid = conv
    before = state_snapshot(model)
    with pytest.raises(ConfigError, match=r"'conv_mid' is a Conv2d, which LoRA cannot wrap.*groups=1.*exclude_"):
        inject(model, LoRAConfig(r=2, target_modules=["conv_in", "conv_mid"]))
    assert_same_state(model, before)
    assert not list(lora_layers(model)) and not getattr(model, "_lora_configs", None)
    inject(model, LoRAConfig(r=2, target_modules=["conv_in", "conv_mid"], exclude_modules=["conv_mid"]))
    assert [p for p, _ in lora_layers(model)] == ["conv_in"]


def test_named_adapters_refused_when_modules_to_save_or_biases_train():
    """modules_to_save and biases are the model's own modules: a second named adapter would overwrite them."""
    model = tiny_bert_classifier()
    inject(model, CASES["bert"][2])
    before = state_snapshot(model)
    with pytest.raises(ConfigError, match=r"cannot add adapter 'b' beside \['default'\]: adapter 'default' trains "
                                          r"modules_to_save or biases"):
        inject(model, LoRAConfig(r=2, target_modules=["query"]), adapter_name="b")
    assert_same_state(model, before)
    model = tiny_gpt2()
    inject(model, CASES["gpt2"][2])
    with pytest.raises(ConfigError, match="adapter 'b' trains modules_to_save or biases"):
        inject(model, CASES["gpt2"][2].replace(bias="all"), adapter_name="b")
    inject(model, CASES["gpt2"][2].replace(r=2), adapter_name="b")  # plain LoRA adapters sit side by side
    assert list(dict(lora_layers(model))["transformer.h.0.attn.c_attn"].lora_a) == ["default", "b"]


def test_nothing_inside_modules_to_save_is_wrapped(adapter_path):
    """RoBERTa's classifier head holds `dense` and `out_proj`: saved whole, so its `dense` is not a target."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from lightning_lora import load_adapter, save_adapter

    def build():
        torch.manual_seed(0)
        config = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=40, num_labels=2)
        return RobertaForSequenceClassification(config).eval()

    model, batch = build(), token_batch()
    inject(model, LoRAConfig(r=2, target_modules=["query", "dense"], modules_to_save=["classifier"]))
    paths = [p for p, _ in lora_layers(model)]
    assert "roberta.encoder.layer.0.attention.output.dense" in paths
    assert not any(p.startswith("classifier.") for p in paths)
    train_steps(model, batch)
    save_adapter(model, adapter_path)
    fresh = build()
    load_adapter(fresh, adapter_path)
    assert torch.allclose(model_output(fresh, batch), model_output(model, batch), **TOL)


def test_tied_module_to_save_refused():
    """GPT-2's lm_head is wte's tensor: trained in place it would change both, saved once, loaded wrong."""
    model = tiny_gpt2()
    before = state_snapshot(model)
    with pytest.raises(ConfigError, match=r"modules_to_save 'lm_head': lm_head.weight is the same tensor as "
                                          r"transformer.wte.weight \(tied weights\)"):
        inject(model, LoRAConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    assert_same_state(model, before)
    assert not list(lora_layers(model))


def test_meta_device_base_refused_before_any_change():
    """On the meta device A and B would stay uninitialised after materialisation (B not 0): refused."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"'0' \(and 1 more\) has its weights on the meta device"):
        inject(model, LoRAConfig(r=2, target_modules=["0", "2"]))
    assert not list(lora_layers(model)) and not getattr(model, "_lora_configs", None)


def _torch_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2).eval()


def test_multihead_attention_out_proj_is_not_adapted():
    """nn.MultiheadAttention passes out_proj.weight to its kernel without calling out_proj: an adapter there
    would never run. all-linear leaves it out; naming it is refused."""
    model = _torch_encoder()
    inject(model, LoRAConfig(r=2, target_modules="all-linear"))
    assert [p for p, _ in lora_layers(model)] == [f"layers.{i}.{n}" for i in (0, 1) for n in ("linear1", "linear2")]
    with pytest.raises(ConfigError, match=r"'layers.0.self_attn.out_proj' is the out_proj of an "
                                          r"nn.MultiheadAttention.*exclude it"):
        inject(_torch_encoder(), LoRAConfig(r=2, target_modules=["out_proj"]))
    with pytest.raises(ConfigError, match=r"MultiheadAttention, which LoRA cannot wrap.*exclude it \(exclude_modules\)$"):
        inject(_torch_encoder(), LoRAConfig(r=2, target_modules=["self_attn"]))  # not "name out_proj instead"


@pytest.mark.parametrize("padded", [False, True])
def test_torch_encoder_adapters_run_in_inference(padded):
    """In eval mode nn.TransformerEncoderLayer runs a fused kernel reading linear1/linear2's weights (and
    nn.TransformerEncoder feeds it nested tensors for padded batches): the adapters must still apply, as in
    training mode, and unload gives the plain encoder back with the adapted output."""
    model, x = _torch_encoder(), torch.randn(2, 3, 16)
    mask = torch.tensor([[False, False, True], [False, False, False]]) if padded else None
    base = model(x, src_key_padding_mask=mask)
    inject(model, LoRAConfig(r=2, target_modules="all-linear"))
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_b["default"])
    keep = ~mask if padded else slice(None)  # padded positions are not outputs
    want = model.train()(x, src_key_padding_mask=mask)[keep]
    got = model.eval()(x, src_key_padding_mask=mask)
    assert not got.is_nested
    torch.testing.assert_close(got[keep], want, **TOL)
    assert (got[keep] - base[keep]).abs().max() > 0.1
    unload(model)
    assert type(model.layers[0].linear1) is nn.Linear
    torch.testing.assert_close(model(x, src_key_padding_mask=mask)[keep], want, **TOL)


def test_all_linear_names_the_stacked_expert_weights_it_leaves_frozen():
    """transformers 5 keeps a mixture of experts' projections in stacked 3-D parameters, not layers: all-linear
    cannot adapt them and says so, instead of training a fraction of what PEFT's all-linear trains in silence."""
    from transformers import MixtralConfig, MixtralForCausalLM

    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))
    with pytest.warns(UserWarning, match=r"4 stacked 3-D weights stay frozen and untrained \(model\.layers\.0\.mlp\."
                                         r"experts\.gate_up_proj, model\.layers\.0\.mlp\.experts\.down_proj, .*\.\.\.: "
                                         r"a mixture of experts' projections"):
        inject(model, LoRAConfig(target_modules="all-linear"))
    assert not model.model.layers[0].mlp.experts.gate_up_proj.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stacked in a dense model, nor in LoRA's own conv factors
        inject(tiny_llama(), LoRAConfig(target_modules="all-linear"))
        inject(nn.Sequential(nn.Conv1d(3, 4, 3), nn.Linear(2, 2)), LoRAConfig(target_modules="all-linear"))


@pytest.mark.parametrize("config", ["other", {"r": 4, "target_modules": ["c_attn"]}], ids=["name", "dict"])
def test_config_of_another_type_refused_with_the_fix(config):
    """An adapter name or a dict where the config goes used to end in an AttributeError deep inside."""
    from lightning_lora import LoRACallback

    model = tiny_gpt2()
    before = state_snapshot(model)
    with pytest.raises(ConfigError, match=rf"config must be a LoRAConfig or None, got {type(config).__name__} .*adapter_name="):
        inject(model, config)
    with pytest.raises(ConfigError, match="config must be a LoRAConfig or None"):
        LoRACallback(config)
    assert_same_state(model, before)


def test_string_target_explains_that_it_is_a_regex():
    """target_modules="c_attn" (a YAML scalar, or a missing list) is a regex over whole paths and matches nothing,
    while the message listed c_attn among the candidates without saying why."""
    model = tiny_gpt2()
    with pytest.raises(ConfigError, match=r"candidate names: \[.*'c_attn'.*\] \(a string is a regular expression "
                                          r"matched against whole module paths.*target_modules=\['c_attn'\]"):
        inject(model, LoRAConfig(target_modules="c_attn"))
    with pytest.raises(ConfigError, match=r"'q_proj' matches no module of GPT2LMHeadModel; candidate names: \[[^]]*\]$"):
        inject(model, LoRAConfig(target_modules="q_proj"))
    assert not list(lora_layers(model))


@pytest.mark.parametrize("fields", [{"exclude_modules": ["c_attn"]}, {"exclude_modules": r".*\.h\..*"},
                                    {"modules_to_save": ["attn"]}], ids=["exclude", "exclude-regex", "saved"])
def test_targets_all_excluded_says_so(fields):
    """It said "matches no module" and listed c_attn among the candidates: the matches were all excluded."""
    model = tiny_gpt2()
    with pytest.raises(ConfigError, match=r"target_modules=\['c_attn'\] matches 2 modules \(e.g. "
                                          r"'transformer.h.0.attn.c_attn'\), but exclude_modules=.* leave none"):
        inject(model, LoRAConfig(target_modules=["c_attn"], **fields))
    assert not list(lora_layers(model))
