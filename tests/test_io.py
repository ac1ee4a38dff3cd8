"""Saving and loading adapters in exactly PEFT's on-disk format, with our metadata in the safetensors header."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_state,
    model_output,
    state_snapshot,
    tiny_bert_classifier,
    tiny_gpt2,
    tiny_llama,
    token_batch,
    train_steps,
)
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_lora import (
    AdapterError,
    LoRAConfig,
    inject,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    validate_adapter,
)
from lightning_lora.inject import adapter_configs
from lightning_lora.io import fingerprint, read_header

PEFT_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
    "lora_dropout", "target_modules", "exclude_modules", "bias", "modules_to_save", "fan_in_fan_out",
    "use_rslora", "use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform",
    "layers_pattern",
}


def _trained_gpt2(config=None):
    model, batch = tiny_gpt2(), token_batch()
    inject(model, config or LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
    return train_steps(model, batch), batch


def test_round_trip_gpt2_exact_format(adapter_path):
    model, batch = _trained_gpt2()
    out = save_adapter(model, adapter_path, base_model="tiny/gpt2", metadata={"epochs": 3})
    assert out == adapter_path
    assert sorted(p.name for p in adapter_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    text = (adapter_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert set(config) == PEFT_KEYS
    assert config | {} == {**config, "peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["c_attn"],
                           "fan_in_fan_out": True, "inference_mode": True, "bias": "none",
                           "base_model_name_or_path": "tiny/gpt2", "init_lora_weights": True, "use_rslora": False}

    with safe_open(adapter_path / "adapter_model.safetensors", "pt") as f:
        keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        meta = f.metadata()
    assert keys == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight": shape
        for i in (0, 1) for ab, shape in (("A", (4, 32)), ("B", (96, 4)))
    }
    assert meta["format"] == "pt" and meta["lightning_lora.base_model"] == "tiny/gpt2"
    assert meta["lightning_lora.epochs"] == "3" and meta["lightning_lora.version"] == "0.1.0"
    assert meta["lightning_lora.fingerprint"] == fingerprint(model)

    fresh = tiny_gpt2()
    loaded = load_adapter(fresh, adapter_path)
    assert loaded.r == 4 and loaded.base_model == "tiny/gpt2"
    assert torch.equal(model_output(fresh, batch), model_output(model, batch))
    assert not list(adapter_path.glob(".*.tmp"))


def test_round_trip_llama_all_linear_writes_matched_names(adapter_path):
    model, batch = tiny_llama(), token_batch()
    inject(model, LoRAConfig(r=2, target_modules="all-linear", use_rslora=True))
    train_steps(model, batch)
    save_adapter(model, adapter_path)
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    # the matched paths, as PEFT writes them: a leaf name could also select another module of that name
    assert config["target_modules"] == sorted(path for path, _ in lora_layers(model))
    assert len(config["target_modules"]) == 2 * 7 and "lm_head" not in config["target_modules"]
    assert config["use_rslora"] is True
    fresh = tiny_llama()
    load_adapter(fresh, adapter_path)
    assert torch.equal(model_output(fresh, batch), model_output(model, batch))


def test_modules_to_save_and_bias_round_trip(adapter_path):
    model, batch = tiny_bert_classifier(), token_batch()
    inject(model, LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                             bias="lora_only", task_type="SEQ_CLS"))
    train_steps(model, batch)
    save_adapter(model, adapter_path)
    with safe_open(adapter_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias",
            "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias"} <= keys
    fresh = tiny_bert_classifier()
    fresh.classifier.reset_parameters()  # another head init: the saved head must replace it
    assert not torch.allclose(model_output(fresh, batch), model_output(model, batch))
    load_adapter(fresh, adapter_path)
    assert torch.equal(model_output(fresh, batch), model_output(model, batch))


def test_non_default_adapter_in_subfolder(adapter_path):
    model, batch = _trained_gpt2()
    inject(model, LoRAConfig(r=2, target_modules=["c_attn"]), adapter_name="second")
    train_steps(model, batch)
    save_adapter(model, adapter_path)
    out = save_adapter(model, adapter_path, adapter_name="second")
    assert out == adapter_path / "second"
    assert (adapter_path / "second" / "adapter_model.safetensors").is_file()
    assert (adapter_path / "adapter_model.safetensors").is_file()
    fresh = tiny_gpt2()
    load_adapter(fresh, adapter_path)
    load_adapter(fresh, adapter_path, adapter_name="second")
    assert torch.equal(model_output(fresh, batch), model_output(model, batch))
    assert {n for _, layer in lora_layers(fresh) for n in layer.lora_a} == {"default", "second"}


def test_named_adapter_from_a_hub_cache_snapshot(adapter_path, hub_server):
    """PEFT's layout downloaded with snapshot_download: the subfolder's files are links into the repo's blobs,
    as the top folder's are, and load."""
    from huggingface_hub import HfApi, snapshot_download

    model, batch = _trained_gpt2()
    inject(model, LoRAConfig(r=2, target_modules=["c_attn"]), adapter_name="second")
    train_steps(model, batch)
    save_adapter(model, adapter_path)
    save_adapter(model, adapter_path, adapter_name="second")
    HfApi().create_repo("team/multi")
    HfApi().upload_folder(repo_id="team/multi", folder_path=adapter_path)
    snapshot = snapshot_download("team/multi")
    assert (Path(snapshot) / "second" / "adapter_model.safetensors").is_symlink()
    fresh = tiny_gpt2()
    load_adapter(fresh, snapshot)
    load_adapter(fresh, snapshot, adapter_name="second")
    assert torch.equal(model_output(fresh, batch), model_output(model, batch))
    assert validate_adapter(Path(snapshot) / "second").config.r == 2


def _save_until(stop, model, directory):
    while not stop.wait(0.002):  # a pause between saves, in which loads get the folder
        save_adapter(model, directory, metadata={"alpha": adapter_configs(model)["default"].alpha})


def test_concurrent_saves_and_loads_see_one_save(adapter_path):
    """Two processes saving other adapters to one folder while a third loads and validates it: every load gets
    the config and the weights of one save, never one's weights under the other's alpha (a silently wrong scale),
    and so does every validation (what push and pull check)."""
    import multiprocessing

    models = []
    for alpha, value in ((8, 1.0), (32, 2.0)):
        models.append(tiny_gpt2())
        inject(models[-1], LoRAConfig(r=4, alpha=alpha, target_modules=["c_attn"]))
        for _, layer in lora_layers(models[-1]):
            torch.nn.init.constant_(layer.lora_b["default"], value)
    save_adapter(models[0], adapter_path)
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    writers = [context.Process(target=_save_until, args=(stop, model, adapter_path)) for model in models]
    for writer in writers:
        writer.start()
    loads = []
    try:
        for _ in range(20):
            model = tiny_gpt2()
            alpha = load_adapter(model, adapter_path).alpha
            loads.append((alpha, next(iter(lora_layers(model)))[1].lora_b["default"][0, 0].item()))
            info = validate_adapter(adapter_path)
            loads.append((info.config.alpha, {"8.0": 1.0, "32.0": 2.0}[info.metadata["lightning_lora.alpha"]]))
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert set(loads) <= {(8.0, 1.0), (32.0, 2.0)}, sorted(set(loads))
    assert not list(adapter_path.glob(".*.tmp"))


def test_load_into_existing_adapter_overwrites_values(adapter_path):
    model, batch = _trained_gpt2()
    save_adapter(model, adapter_path)
    fresh = tiny_gpt2()
    inject(fresh, LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
    load_adapter(fresh, adapter_path)
    assert torch.equal(model_output(fresh, batch), model_output(model, batch))


def test_load_into_existing_adapter_activates_it(adapter_path):
    """Reloading an adapter that is not the active one makes it active, as loading a new one does."""
    model, batch = _trained_gpt2()
    save_adapter(model, adapter_path)
    fresh = tiny_gpt2()
    load_adapter(fresh, adapter_path)
    inject(fresh, LoRAConfig(r=2, target_modules=["c_attn"]), adapter_name="other")
    train_steps(fresh, batch)
    load_adapter(fresh, adapter_path)
    assert torch.equal(model_output(fresh, batch), model_output(model, batch))
    assert next(n for n, p in fresh.named_parameters() if p.requires_grad).endswith("lora_A.default")


def test_load_into_merged_model_refused(adapter_path):
    """The merged delta is the old A and B: new values under it would make unmerge leave a wrong base."""
    model, batch = _trained_gpt2()
    save_adapter(model, adapter_path)
    merged = tiny_gpt2()
    inject(merged, LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
    merge(train_steps(merged, batch, lr=0.2))
    before = state_snapshot(merged)
    with pytest.raises(AdapterError, match="has merged adapters; unmerge\\(model\\) before loading"):
        load_adapter(merged, adapter_path)
    assert_same_state(merged, before)


def test_load_into_existing_adapter_spelled_otherwise(adapter_path):
    """Saved from the config the model was injected with, the file differs only in spelling: the matched names
    for "all-linear", a task type (CAUSAL_LM for Llama), the base model's name. It loads; another alpha (same
    shapes, another scale) does not."""
    model, batch = tiny_llama(), token_batch()
    config = LoRAConfig(r=2, alpha=4, target_modules="all-linear")
    inject(model, config)
    train_steps(model, batch)
    save_adapter(model, adapter_path, base_model="tiny/llama")
    fresh = tiny_llama()
    inject(fresh, config)
    load_adapter(fresh, adapter_path)
    assert torch.equal(model_output(fresh, batch), model_output(model, batch))
    other = tiny_llama()
    inject(other, config.replace(alpha=8))
    with pytest.raises(AdapterError, match="already has an adapter 'default' with another config"):
        load_adapter(other, adapter_path)


def test_load_refuses_other_config_for_existing_adapter(adapter_path):
    model, _ = _trained_gpt2()
    save_adapter(model, adapter_path)
    fresh = tiny_gpt2()
    inject(fresh, LoRAConfig(r=2, target_modules=["c_attn"]))
    before = state_snapshot(fresh)
    with pytest.raises(AdapterError, match="already has an adapter 'default' with another config"):
        load_adapter(fresh, adapter_path)
    assert_same_state(fresh, before)


def test_fingerprint_mismatch_refused(adapter_path):
    model, _ = _trained_gpt2()
    save_adapter(model, adapter_path)
    weights = adapter_path / "adapter_model.safetensors"
    _header, meta = read_header(weights)
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    save_file(tensors, weights, metadata={**meta, "lightning_lora.fingerprint": "0" * 64})
    fresh = tiny_gpt2()
    before = state_snapshot(fresh)
    with pytest.raises(AdapterError, match="trained on a different base model"):
        load_adapter(fresh, adapter_path)
    assert_same_state(fresh, before)


def test_validate_adapter_reports(adapter_path):
    model, _ = _trained_gpt2()
    save_adapter(model, adapter_path, base_model="tiny/gpt2", card="# card\n")
    info = validate_adapter(adapter_path)
    assert info.base_model == "tiny/gpt2" and info.config.r == 4
    assert info.num_params == 2 * (4 * 32 + 96 * 4)
    assert info.size_bytes == sum(p.stat().st_size for p in adapter_path.iterdir())
    assert (adapter_path / "README.md").read_text() == "# card\n"


@pytest.mark.parametrize(("edit", "message"), [
    ({"use_dora": True}, r"module 'transformer.h.0.attn.c_attn' lacks a DoRA magnitude .* says use_dora=True"),
    ({"target_modules": ["c_proj"]}, (r"module 'transformer.h.0.attn.c_attn' has LoRA tensors but adapter_config"
                                      r".json's target_modules \['c_proj'\] .* does not select it")),
    ({"layers_to_transform": [1]}, r"module 'transformer.h.0.attn.c_attn' has LoRA tensors .* does not select it"),
])
def test_validate_refuses_what_load_refuses(adapter_path, edit, message):
    """A config that does not describe its weights: validate_adapter (what push and pull check) refuses it as
    load_adapter does, rather than accepting a folder that loads nowhere."""
    model, _ = _trained_gpt2()
    save_adapter(model, adapter_path)
    config = json.loads((adapter_path / "adapter_config.json").read_text())
    (adapter_path / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(AdapterError, match=message):
        validate_adapter(adapter_path)
    with pytest.raises(AdapterError, match=message):
        load_adapter(tiny_gpt2(), adapter_path)


def test_save_unknown_adapter_name(adapter_path):
    model, _ = _trained_gpt2()
    with pytest.raises(KeyError, match="no adapter named 'x'; the model has \\['default'\\]"):
        save_adapter(model, adapter_path, adapter_name="x")


def test_save_without_any_adapter_says_how_to_add_one(adapter_path):
    """A model without LoRA: save_adapter said only 'the model has none', AdapterState.from_model a bare 'default'."""
    from lightning_lora import AdapterState

    model = tiny_gpt2()
    for call in (lambda: save_adapter(model, adapter_path), lambda: AdapterState.from_model(model)):
        with pytest.raises(KeyError, match=r"no adapter named 'default'; the model has none: inject\(model, config\) "
                                           r"or load_adapter\(model, dir\) first"):
            call()
    assert not adapter_path.exists() or not any(adapter_path.iterdir())


def test_card_usage_names_the_class_that_loads_the_base(adapter_path):
    """No task type (a bare encoder): the snippet names the class the adapter was trained on, which PEFT then
    loads it onto with every key found; for a model outside transformers it names none (a guess loads a no-op)."""
    from transformers import BertConfig, BertModel

    from lightning_lora import render_card

    def encoder():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=32)).eval()

    model, batch = encoder(), token_batch()
    inject(model, LoRAConfig(r=2, target_modules=["query"]))
    for layer in dict(lora_layers(model)).values():
        torch.nn.init.normal_(layer.lora_b["default"])  # a trained adapter

    def hidden(m):
        with torch.no_grad():
            return m(**batch).last_hidden_state
    info = validate_adapter(save_adapter(model, adapter_path, base_model="tiny/bert"))
    card = render_card(info, repo_id="me/encoder")
    assert info.config.task_type is None and "from transformers import BertModel" in card
    assert "base = BertModel.from_pretrained" in card and "architecture" not in card
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(encoder(), adapter_path).eval()
    assert torch.allclose(hidden(loaded), hidden(model), atol=1e-5)
    assert not torch.allclose(hidden(encoder()), hidden(model), atol=1e-3)

    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject(plain, LoRAConfig(r=2, target_modules=["0"]))
    card = render_card(validate_adapter(save_adapter(plain, adapter_path / "plain", base_model="x")), repo_id="me/p")
    assert "from transformers" not in card and "`lora-hub pull me/p`, then load it onto the model" in card


def test_card_names_dora_and_nf4(adapter_path):
    """DoRA changes what the adapter computes (and which readers load it), NF4 what base it was trained on: the
    card's config table says both, from a saved adapter and from the callback's live config."""
    from lightning_lora import render_card

    model = tiny_gpt2()
    inject(model, LoRAConfig(r=2, target_modules=["c_attn"], use_dora=True))
    card = render_card(validate_adapter(save_adapter(model, adapter_path)))
    assert "| use_dora | true |" in card
    card = render_card(LoRAConfig(r=2, target_modules=["c_attn"], quantize="nf4", quant_backend="torchao"))
    assert "| quantize | nf4 |" in card and "| quant_backend | torchao |" in card and "use_dora" not in card


@pytest.mark.parametrize(("base", "hub_id"), [("org/base-1.5", True), ("/models/llama", False),
                                              ("./models/llama", False), ("~/models/llama", False)])
def test_card_metadata_names_only_a_hub_base(adapter_path, base, hub_id):
    """A base loaded from disk leaves its folder in _name_or_path; the Hub refuses a card whose base_model
    metadata is a local path, so the YAML names only Hub ids (the text and the snippet still name the base)."""
    from huggingface_hub import ModelCard

    from lightning_lora import render_card

    model, _ = _trained_gpt2()
    card = render_card(validate_adapter(save_adapter(model, adapter_path, base_model=base)), repo_id="me/a")
    data = ModelCard(card).data
    assert data.library_name == "peft" and "lora" in data.tags
    assert data.base_model == (base if hub_id else None)
    assert (f"base_model:adapter:{base}" in data.tags) == hub_id
    assert f"A LoRA adapter for `{base}`" in card and f'GPT2LMHeadModel.from_pretrained("{base}")' in card


def test_pattern_order_survives_a_round_trip(adapter_path):
    """The first matching pattern key applies, so its order is part of the config: written as given (PEFT sorts
    it, and would reload this adapter with rank 2 for layer 1), read back the same, and a fresh inject of the
    file's config on a loaded model is the no-op it should be."""
    config = LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 3, "layers.1.self_attn.q_proj": 2})
    model = tiny_llama()
    inject(model, config)
    assert {layer.lora_a["default"].shape[0] for _, layer in lora_layers(model)} == {3}
    save_adapter(model, adapter_path)
    written = json.loads((adapter_path / "adapter_config.json").read_text())
    assert list(written["rank_pattern"]) == ["q_proj", "layers.1.self_attn.q_proj"]
    assert list(written) == sorted(written)
    fresh = tiny_llama()
    loaded = load_adapter(fresh, adapter_path)
    inject(fresh, loaded)  # the same adapter: a no-op, although the file's config names a base model
    inject(fresh, config)
    assert {layer.lora_a["default"].shape[0] for _, layer in lora_layers(fresh)} == {3}


def test_all_linear_export_reloads_where_leaf_names_would_not(adapter_path):
    """Linear layers inside Sequentials (paths ending in "0", "2"): leaf names would select the Sequentials too."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
                                   torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)))

    model, x = build(), torch.randn(3, 4)
    inject(model, LoRAConfig(r=2, target_modules="all-linear"))
    train_steps(model, x)
    save_adapter(model, adapter_path)
    fresh = build()
    load_adapter(fresh, adapter_path)
    assert torch.allclose(model_output(fresh, x), model_output(model, x), atol=1e-6)


def test_folder_of_named_adapters_says_which_to_load(tmp_path):
    """save_adapter(..., adapter_name="other") writes PEFT's <dir>/other; loading <dir> said only that it has no
    adapter_config.json."""
    model = tiny_gpt2()
    inject(model, LoRAConfig(r=2, target_modules=["c_attn"]), "other")
    save_adapter(model, tmp_path, adapter_name="other")
    fresh = tiny_gpt2()
    before = state_snapshot(fresh)
    with pytest.raises(AdapterError, match=r"has no adapter_config.json but holds the named adapters \['other'\].*"
                                           r"load_adapter\(model, dir, adapter_name='other'\)"):
        load_adapter(fresh, tmp_path)
    with pytest.raises(AdapterError, match=r"holds the named adapters \['other'\]"):
        validate_adapter(tmp_path)
    assert_same_state(fresh, before)
    assert load_adapter(fresh, tmp_path, "other").r == 2


def test_hub_repo_id_passed_as_folder_says_to_pull_it(tmp_path, monkeypatch):
    """load_adapter(model, "team/my-task") (PEFT's from_pretrained habit) said only "not a folder"."""
    monkeypatch.chdir(tmp_path)
    model = tiny_gpt2()
    with pytest.raises(AdapterError, match=r"team/my-task@\^1.0 is not a folder holding an adapter \(a Hub repo id\? "
                                           r"download it first: hub.pull\('team/my-task@\^1.0'\)"):
        load_adapter(model, "team/my-task@^1.0")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "adapter").write_text("a file, not a repo id")
    with pytest.raises(AdapterError, match=r"runs/adapter is not a folder holding an adapter$"):
        load_adapter(model, "runs/adapter")
    assert not list(lora_layers(model))


def test_keys_shifted_by_a_module_path_say_which_model_to_load_into(tmp_path):
    """An adapter saved from BertModel loaded into BertForSequenceClassification (or back) listed missing and
    unexpected keys that differ only by 'bert.', without saying so."""
    config = LoRAConfig(r=2, target_modules=["query", "value"])
    encoder, task = tiny_bert_classifier().bert, tiny_bert_classifier()
    inject(encoder, config)
    save_adapter(encoder, tmp_path / "encoder")
    inject(task, config)
    save_adapter(task, tmp_path / "task")
    fresh = tiny_bert_classifier()
    before = state_snapshot(fresh)
    with pytest.raises(AdapterError, match=r"Every model key has an extra leading 'bert.': the adapter was saved from "
                                           r"the part of this model at 'bert'; load it into that part$"):
        load_adapter(fresh, tmp_path / "encoder")
    with pytest.raises(AdapterError, match=r"Every adapter key has an extra leading 'bert.': it was saved from a model "
                                           r"that holds this one as 'bert' .*; load it into that model$"):
        load_adapter(fresh.bert, tmp_path / "task")
    assert_same_state(fresh, before)
    load_adapter(fresh.bert, tmp_path / "encoder")
