"""Interop with PEFT itself, both ways: our saved adapters load in `peft.PeftModel.from_pretrained`, PEFT's
saved adapters load with our `load_adapter`; logits agree within 1e-5."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    assert_same_state,
    model_output,
    state_snapshot,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_batch,
    train_steps,
)
from safetensors import safe_open

from lightning_lora import (
    AdapterError,
    LoRAConfig,
    inject,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    summarize,
    validate_adapter,
)
from lightning_lora.io import read_config

peft = pytest.importorskip("peft")

def tiny_distilbert_classifier(seed: int = 0) -> torch.nn.Module:
    """DistilBertForSequenceClassification: a `pre_classifier` and a `classifier` head."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32,
                              num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    return DistilBertForSequenceClassification(config).eval()


CASES = {
    "gpt2-conv1d": (tiny_gpt2, {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}),
    "llama-rslora-patterns": (tiny_llama, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                               "use_rslora": True, "rank_pattern": {"model.layers.1.self_attn.q_proj": 2},
                                               "alpha_pattern": {"down_proj": 3}}),
    "bert-modules-to-save": (tiny_bert_classifier, {"r": 2, "alpha": 4, "target_modules": ["query", "value"],
                                                        "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}),
    # PEFT's pattern rule: a regex key matching the end of the path at a dot, not the whole path
    "llama-regex-patterns": (tiny_llama, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"],
                                              "rank_pattern": {"layers.1.self_attn.(q|o)_proj": 2},
                                              "alpha_pattern": {"self_attn.(q|v)_proj": 32}}),
    # PEFT's modules_to_save rule: "classifier" also selects DistilBERT's pre_classifier
    "distilbert-modules-to-save": (tiny_distilbert_classifier, {"r": 2, "alpha": 4, "target_modules": ["q_lin"],
                                                                    "modules_to_save": ["classifier"],
                                                                    "task_type": "SEQ_CLS"}),
    # a classifier whose head is not saved: exported without PEFT's SEQ_CLS (which would demand the head)
    "bert-head-not-saved": (tiny_bert_classifier, {"r": 2, "alpha": 4, "target_modules": ["query", "value"]}),
    # likewise when the config names the task: PEFT's SEQ_CLS class would demand the head it does not hold
    "bert-task-named-head-not-saved": (tiny_bert_classifier, {"r": 2, "alpha": 4, "target_modules": ["query", "value"],
                                                              "task_type": "SEQ_CLS"}),
    # PEFT's layer rule: the first numbered segment, or the one after layers_pattern
    "gpt2-one-layer": (tiny_gpt2, {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"], "layers_to_transform": 1}),
    "llama-layers-pattern": (lambda: tiny_llama(layers=3), {"r": 4, "alpha": 8, "target_modules": ["q_proj", "down_proj"],
                                                            "layers_to_transform": [0, 2], "layers_pattern": "layers"}),
}


def test_distilbert_saves_both_heads_and_an_unsaved_head_drops_the_task(adapter_path):
    model = tiny_distilbert_classifier()
    inject(model, LoRAConfig(r=2, target_modules=["q_lin"], modules_to_save=["classifier"]))
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == \
        {"pre_classifier", "classifier"}
    assert read_config(save_adapter(model, adapter_path / "heads")).task_type == "SEQ_CLS"
    model = tiny_bert_classifier()
    inject(model, LoRAConfig(r=2, target_modules=["query"]))
    assert read_config(save_adapter(model, adapter_path / "no-head")).task_type is None


def _peft_config(fields: dict) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=fields["r"], lora_alpha=fields["alpha"], target_modules=fields["target_modules"],
        use_rslora=fields.get("use_rslora", False), rank_pattern=fields.get("rank_pattern", {}),
        alpha_pattern=fields.get("alpha_pattern", {}), modules_to_save=fields.get("modules_to_save"),
        task_type=fields.get("task_type"), layers_to_transform=fields.get("layers_to_transform"),
        layers_pattern=fields.get("layers_pattern"), init_lora_weights=False,  # B random too: a non-trivial adapter
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
            for module in peft_model.modules():
                if isinstance(module, peft.utils.ModulesToSaveWrapper):
                    module.modules_to_save["default"].weight.normal_()
    peft_model.eval()
    theirs = model_output(peft_model, batch)
    peft_model.save_pretrained(adapter_path)

    model = build()
    config = load_adapter(model, adapter_path)
    assert config.use_rslora == fields.get("use_rslora", False)
    ranks = {p: layer.lora_a["default"].shape[0] for p, layer in lora_layers(model)}
    if fields.get("rank_pattern"):
        assert ranks["model.layers.1.self_attn.q_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"] == 4
    assert set(ranks) == {p.removeprefix("base_model.model.") for p, m in peft_model.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer)}
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


@pytest.mark.parametrize("init", ["orthogonal", "eva"])
def test_peft_adapter_from_an_init_that_keeps_the_base_loads(init, adapter_path):
    """PEFT's "orthogonal" and "eva" only choose where A and B start, on the unchanged base: trained, the adapter is
    plain LoRA (PiSSA-like inits, which rewrite the base, are refused: test_bad_input)."""
    batch = token_batch()
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                  init_lora_weights="orthogonal")).eval()
    with torch.no_grad():  # training moves B A off zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    theirs = model_output(peft_model, batch)
    peft_model.save_pretrained(adapter_path)
    config_file = adapter_path / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"orthogonal"', f'"{init}"'))  # EVA needs data to start

    model = tiny_llama()
    load_adapter(model, adapter_path)
    assert not torch.allclose(theirs, model_output(tiny_llama(), batch), atol=1e-3), "the adapter must matter"
    assert torch.allclose(model_output(model, batch), theirs, atol=1e-5, rtol=0)


EMBEDDING_TARGETS = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}


@pytest.mark.parametrize("target", list(EMBEDDING_TARGETS))
def test_peft_saved_embedding_base_weight_loads(target, adapter_path):
    """With an embedding layer targeted, PEFT's default ``save_embedding_layers="auto"`` also stores that layer's
    full base weight; as PEFT does, loading puts it into the base layer."""
    path, batch = EMBEDDING_TARGETS[target], token_batch()
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target, "q_proj"],
                                                                  init_lora_weights=False)).eval()
    with torch.no_grad():  # a base weight that differs from the fresh model's: it must travel with the adapter
        peft_model.base_model.model.get_submodule(path).base_layer.weight.mul_(1.5)
    theirs = model_output(peft_model, batch)
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        peft_model.save_pretrained(adapter_path)
    with safe_open(adapter_path / "adapter_model.safetensors", "pt") as f:
        assert f"base_model.model.{path}.base_layer.weight" in f.keys()  # noqa: SIM118 (safe_open is not iterable)

    model = tiny_llama()
    load_adapter(model, adapter_path)
    assert torch.allclose(model_output(model, batch), theirs, atol=1e-5, rtol=0)
    assert torch.equal(model.get_submodule(path).weight, peft_model.base_model.model.get_submodule(path).weight)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert validate_adapter(adapter_path).num_params == trainable  # the saved base weight is not counted


def test_peft_saved_embedding_of_a_resized_vocabulary_needs_a_resized_base(adapter_path):
    base = tiny_llama()
    base.resize_token_embeddings(72)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        peft_model.save_pretrained(adapter_path)

    model = tiny_llama()
    before = state_snapshot(model)
    with pytest.raises(AdapterError, match=r"embed_tokens.base_layer.weight .*\[72, 32\].*\[64, 32\].*"
                                           r"model.resize_token_embeddings\(72\)"):
        load_adapter(model, adapter_path)
    assert_same_state(model, before)
    model.resize_token_embeddings(72)  # what the message says: then it loads
    load_adapter(model, adapter_path)
    assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def tiny_vit_classifier(seed: int = 0) -> torch.nn.Module:
    """ViTForImageClassification: its input embeddings are a patch-embedding block, which has no weight."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=8,
                       patch_size=4, num_labels=3)
    return ViTForImageClassification(config).eval()


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    """CLIPModel: text and vision towers; its ``get_input_embeddings`` raises NotImplementedError."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(text_config={**tower, "vocab_size": 64, "max_position_embeddings": 16},
                        vision_config={**tower, "image_size": 8, "patch_size": 4}, projection_dim=16)
    return CLIPModel(config).eval()


@pytest.mark.parametrize("build", [tiny_vit_classifier, tiny_clip])
def test_peft_saved_loads_into_vision_models(build, adapter_path):
    """No full base weight of the input embeddings can travel with these adapters: ViT's is a patch-embedding
    block without a weight, CLIPModel names none."""
    batch = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))}
    if build is tiny_clip:
        batch |= token_batch()

    def output(model):
        with torch.no_grad():
            out = model(**batch)
        return out.logits_per_image if build is tiny_clip else out.logits

    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False)).eval()
    theirs = output(peft_model)
    peft_model.save_pretrained(adapter_path)

    model = build()
    load_adapter(model, adapter_path)
    assert not torch.allclose(theirs, output(build()), atol=1e-3), "the adapter must matter"
    assert torch.allclose(output(model), theirs, atol=1e-5, rtol=0)


def test_scaled_word_embedding_matches_peft_and_merges(adapter_path):
    """Gemma's embedding multiplies its rows by sqrt(hidden) (``embed_scale``): the update's rows are scaled
    alike, as in PEFT, so outputs agree and merging into the weight changes nothing."""
    from transformers import GemmaConfig, GemmaForCausalLM

    def build():
        torch.manual_seed(0)
        return GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            tie_word_embeddings=False)).eval()

    batch = token_batch()
    model = build()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"]))
    train_steps(model, batch)
    ours = model_output(model, batch)
    save_adapter(model, adapter_path)
    peft_model = peft.PeftModel.from_pretrained(build(), adapter_path).eval()
    assert not torch.allclose(ours, model_output(build(), batch), atol=1e-3), "the adapter must matter"
    assert torch.allclose(model_output(peft_model, batch), ours, atol=1e-5, rtol=0)
    merge(model)
    assert torch.allclose(model_output(model, batch), ours, atol=1e-5, rtol=0)


def test_peft_saved_embedding_base_weight_refused_on_a_4bit_base(adapter_path):
    from lightning_lora import quant

    if not quant.available_backends():
        pytest.skip("no NF4 backend installed")
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        peft_model.save_pretrained(adapter_path)
    model = tiny_llama()
    quant.quantize_model(model, LoRAConfig(target_modules=["lm_head"], quantize="nf4"))
    before = state_snapshot(model)
    with pytest.raises(AdapterError, match=r"lm_head.base_layer.weight.*4-bit.*full-precision base"):
        load_adapter(model, adapter_path)
    assert_same_state(model, before)


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


def test_peft_seq_cls_adapter_whose_head_has_another_name_loads(adapter_path):
    """PEFT's SEQ_CLS class writes modules_to_save ["classifier", "score"] whatever the head is called (BART's
    is `classification_head`), and loads it so: names that PEFT adds itself are not taken for typos."""
    from transformers import BartConfig, BartForSequenceClassification

    def build():
        torch.manual_seed(0)
        return BartForSequenceClassification(BartConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
            num_labels=3, dropout=0.0, attention_dropout=0.0, pad_token_id=1, eos_token_id=2)).eval()

    batch = {"input_ids": torch.tensor([[0, 5, 9, 11, 7, 2], [0, 8, 4, 6, 13, 2]])}
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                              task_type="SEQ_CLS", init_lora_weights=False)).eval()
    theirs = model_output(peft_model, batch)
    peft_model.save_pretrained(adapter_path)
    model = build()
    assert load_adapter(model, adapter_path).modules_to_save == ["classifier", "score"]
    assert torch.allclose(model_output(model, batch), theirs, atol=1e-5, rtol=0)


def test_peft_adapter_of_a_resized_vocabulary_loads_its_embeddings(adapter_path):
    """After `resize_token_embeddings` PEFT saves the (untargeted) input and output embeddings too (``"auto"``
    when it can tell the vocabulary grew, or asked to), as ``...embed_tokens.weight`` / ``lm_head.weight``: they
    load into the resized base, and an unresized one is told to resize first."""
    base = tiny_llama()
    base.resize_token_embeddings(72)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    batch = token_batch(vocab=72)
    theirs = model_output(peft_model.eval(), batch)
    peft_model.save_pretrained(adapter_path, save_embedding_layers=True)
    with safe_open(adapter_path / "adapter_model.safetensors", "pt") as f:
        assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(f.keys())
    model = tiny_llama()
    with pytest.raises(AdapterError, match=r"(lm_head|embed_tokens).weight has shape \[72, 32\].*resize_token_embeddings\(72\)"):
        load_adapter(model, adapter_path)
    model.resize_token_embeddings(72)
    torch.nn.init.zeros_(model.model.embed_tokens.weight)  # whatever the resize drew: the file's rows replace it
    load_adapter(model, adapter_path)
    assert torch.allclose(model_output(model, batch), theirs, atol=1e-5, rtol=0)


def test_adapter_saving_a_head_refused_on_a_model_that_ties_it(adapter_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(tied: bool):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4,
                                          tie_word_embeddings=tied)).eval()

    untied = gpt2(False)
    inject(untied, LoRAConfig(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"]))
    save_adapter(untied, adapter_path)
    tied = gpt2(True)
    before = state_snapshot(tied)
    with pytest.raises(AdapterError, match=r"cannot be loaded into this model: modules_to_save 'lm_head'.*tied"):
        load_adapter(tied, adapter_path)
    assert_same_state(tied, before)


def test_adapter_with_dropout_loads_in_eval_mode(tmp_path):
    """PEFT adapters usually carry lora_dropout (0.05, 0.1): loaded into an eval-mode model (as from_pretrained
    returns it), the new LoRA layers were in training mode and applied that dropout to every inference, so the
    outputs were random; PEFT and transformers load them in eval mode. `hub.merge` then reported the dropout's
    noise as the merge's error."""
    import hub

    peft_model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                  lora_dropout=0.3, fan_in_fan_out=True))
    train_steps(peft_model, token_batch(), steps=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = tiny_gpt2()
    load_adapter(model, tmp_path / "adapter")
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model_output(model, token_batch()), model_output(peft_model, token_batch()),
                               rtol=1e-5, atol=1e-5)
    tiny_gpt2().save_pretrained(tmp_path / "base")
    assert hub.merge(tmp_path / "adapter", tmp_path / "base", tmp_path / "merged").max_diff < 1e-5
