"""A corpus of broken and hostile adapters, generated from one good adapter: each case must raise a clear
`AdapterError` (message matched) and leave the model exactly as it was. Plus property-based tests of
`LoRAConfig` validation and target resolution."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_same_state,
    model_output,
    small_conv_net,
    state_snapshot,
    tiny_gpt2,
    tiny_llama,
    token_batch,
    train_steps,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from lightning_lora import (
    AdapterError,
    ConfigError,
    LoRAConfig,
    inject,
    load_adapter,
    lora_layers,
    save_adapter,
)
from lightning_lora.config import matches
from lightning_lora.inject import find_targets

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
A0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
B0 = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
A1 = "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
B1 = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory) -> Path:
    model = tiny_gpt2()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
    train_steps(model, token_batch(), steps=2)
    return save_adapter(model, tmp_path_factory.mktemp("good") / "adapter")


# -- ways to break an adapter folder ------------------------------------------------------------------------
def _raw(d: Path) -> tuple[int, dict, bytes]:
    blob = (d / WEIGHTS).read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return n, json.loads(blob[8:8 + n]), blob[8 + n:]


def _write_raw(d: Path, header, data: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _edit_header(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        _, header, data = _raw(d)
        edit(header)
        _write_raw(d, header, data)
    return mutate


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(d / WEIGHTS)
        edit(tensors)
        save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})
    return mutate


def _edit_config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        result = edit(config)
        (d / CONFIG).write_text(json.dumps(config if result is None else result))
    return mutate


def _config_text(text: str | bytes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / CONFIG).write_bytes(text if isinstance(text, bytes) else text.encode())
    return mutate


def _truncate(size: int | None = None) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        blob = (d / WEIGHTS).read_bytes()
        (d / WEIGHTS).write_bytes(blob[: (len(blob) // 2 if size is None else size)])
    return mutate


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _rename(old: str, new: str):
    return lambda t: t.__setitem__(new, t.pop(old))


def _symlink_outside(name: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        outside = d.parent / f"outside-{name}"
        shutil.copy(d / name, outside)
        (d / name).unlink()
        os.symlink(outside, d / name)
    return mutate


def _pickle_only(d: Path) -> None:
    (d / "adapter_model.bin").write_bytes(b"\x80\x04\x95 pickle that would run code")
    (d / WEIGHTS).unlink()


def _overlap(h: dict) -> None:
    h[A1]["data_offsets"] = h[A0]["data_offsets"]


def _shift_offsets(h: dict) -> None:
    begin, end = h[A0]["data_offsets"]
    h[A0]["data_offsets"] = [begin + 4, end]


def _gap(d: Path) -> None:
    _, header, data = _raw(d)
    for key, entry in header.items():
        if key != "__metadata__":
            entry["data_offsets"] = [offset + 8 for offset in entry["data_offsets"]]
    _write_raw(d, header, bytes(8) + data)


def _malformed(h: dict) -> None:
    h[A0]["shape"] = 7


def _deep_json(d: Path) -> None:
    (d / CONFIG).write_text("[" * 100_000 + "]" * 100_000)


CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    # the safetensors container
    "truncated-half": (_truncate(), r"truncated or corrupt"),
    "truncated-to-4-bytes": (_truncate(4), r"truncated: 4 bytes, not even a safetensors header length"),
    "empty-file": (_truncate(0), r"truncated: 0 bytes"),
    "header-length-lies": (lambda d: _write_raw(d, _raw(d)[1], _raw(d)[2], length=10**6),
                           r"header length 1000000 does not fit a \d+-byte file"),
    "oversized-header": (lambda d: _write_raw(d, _raw(d)[1], _raw(d)[2], length=2**40),
                         r"header length 1099511627776 does not fit"),
    "header-not-json": (lambda d: _write_raw(d, b"{not json" + b" " * 7, _raw(d)[2]), r"header is not valid JSON"),
    "header-not-utf8": (lambda d: _write_raw(d, b"\xff\xfe\x00\x00", _raw(d)[2]), r"header is not valid JSON"),
    "header-is-a-list": (lambda d: _write_raw(d, [1, 2], _raw(d)[2]), r"header is not a JSON object"),
    "offsets-lie-about-size": (_edit_header(_shift_offsets), r"offsets span \d+ bytes, shape needs \d+"),
    "offsets-overlap": (_edit_header(_overlap), r"overlap|data section is \d+ bytes"),
    "gap-in-data": (_gap, r"tensors overlap or leave gaps in the data section"),
    "trailing-garbage": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes() + b"junk"),
                         r"data section is \d+ bytes but the header describes \d+"),
    "malformed-entry": (_edit_header(_malformed), rf"tensor '{A0}' has (a malformed header entry|an invalid shape)"),
    "negative-offsets": (_edit_header(lambda h: h[A0].__setitem__("data_offsets", [-4, 0])),
                         r"invalid shape or offsets|malformed"),
    "metadata-not-a-dict": (_edit_header(lambda h: h.__setitem__("__metadata__", [1, 2])),
                            r"__metadata__ must be a JSON object of strings"),
    "metadata-not-strings": (_edit_header(lambda h: h.__setitem__("__metadata__", {"format": {"pt": 1}})),
                             r"__metadata__ must be a JSON object of strings"),
    "scalar-lora-tensor": (_edit_tensors(_set(A0, torch.tensor(1.0))),
                           r"a LoRA factor of shape \[\[\], \[96, 4\]\] is not a matrix"),
    "int-dtype": (_edit_header(lambda h: h[A0].__setitem__("dtype", "I32")),
                  r"has dtype I32; adapters hold float tensors only"),
    "bool-dtype": (_edit_header(lambda h: h[B0].__setitem__("dtype", "BOOL")), r"has dtype BOOL"),
    "unknown-dtype": (_edit_header(lambda h: h[B0].__setitem__("dtype", "X99")), r"has dtype X99"),
    # the tensors
    "nan-weights": (_edit_tensors(lambda t: t[B0].__setitem__((0, 0), math.nan)), r"holds NaN or Inf values"),
    "inf-weights": (_edit_tensors(lambda t: t[A1].__setitem__((1, 1), math.inf)), r"holds NaN or Inf values"),
    "wrong-shape": (_edit_tensors(_set(B0, torch.zeros(48, 4))), rf"{B0} has shape \[48, 4\], the model needs \[96, 4\]"),
    "rank-disagrees-with-config": (_edit_tensors(lambda t: t.update({A0: t[A0][:2], B0: t[B0][:, :2].contiguous()})),
                                   r"has rank 2x2 but adapter_config.json says r=4"),
    "missing-one-factor": (_edit_tensors(lambda t: t.pop(B1)), r"'transformer.h.1.attn.c_attn' has only one of"),
    "missing-module": (_edit_tensors(lambda t: (t.pop(A1), t.pop(B1))), rf"missing keys \['{A1}', '{B1}'\]"),
    "extra-lora-module": (_edit_tensors(lambda t: t.update({
        A0.replace("c_attn", "c_proj"): torch.zeros(4, 32), B0.replace("c_attn", "c_proj"): torch.zeros(32, 4)})),
        r"module 'transformer.h.0.attn.c_proj' has LoRA tensors but adapter_config.json's target_modules \['c_attn'\]"),
    "extra-base-weight": (_edit_tensors(_set("base_model.model.transformer.h.0.ln_1.weight", torch.zeros(32))),
                          r"unexpected keys \['base_model.model.transformer.h.0.ln_1.weight'\]"),
    "peft-default-in-keys": (_edit_tensors(lambda t: (_rename(A0, A0.replace("lora_A.", "lora_A.default."))(t),
                                                      _rename(B0, B0.replace("lora_B.", "lora_B.default."))(t))),
                             r"in-memory adapter name '.default.'"),
    "no-base-model-prefix": (_edit_tensors(_rename(A0, A0.removeprefix("base_model.model."))),
                             r"lacks PEFT's 'base_model.model.' prefix"),
    "no-lora-tensors": (_edit_tensors(lambda t: t.clear()), r"holds no LoRA tensors"),
    # the config
    "config-missing": (lambda d: (d / CONFIG).unlink(), r"has no adapter_config.json"),
    "config-not-json": (_config_text("{'r': 4,"), r"adapter_config.json is not valid JSON"),
    "config-not-utf8": (_config_text(b"\xff\xfe{}"), r"not valid JSON"),
    "config-a-list": (_edit_config(lambda c: [c]), r"must hold a JSON object, got list"),
    "config-deeply-nested": (_deep_json, r"nested too deeply|not valid JSON"),
    "config-huge": (_config_text('{"peft_type": "LORA", "pad": "' + "x" * 2_000_000 + '"}'),
                    r"is 2000\d+ bytes; an adapter config is a few hundred"),
    "r-zero": (_edit_config(_set("r", 0)), r"r must be a positive integer \(e.g. 8\), got 0"),
    "r-negative": (_edit_config(_set("r", -4)), r"r must be a positive integer"),
    "r-string": (_edit_config(_set("r", "4")), r"r must be a positive integer \(e.g. 8\), got '4'"),
    "r-float": (_edit_config(_set("r", 4.0)), r"r must be a positive integer"),
    "r-bool": (_edit_config(_set("r", True)), r"r must be a positive integer"),
    "r-huge": (_edit_config(_set("r", 10**12)), r"r=1000000000000 is implausibly large"),
    "r-null": (_edit_config(_set("r", None)), r"r must be a positive integer"),
    "alpha-negative": (_edit_config(_set("lora_alpha", -1)), r"alpha must be a positive number"),
    "alpha-nan": (_config_text('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["c_attn"]}'),
                  r"alpha must be a positive number"),
    "alpha-string": (_edit_config(_set("lora_alpha", "16")), r"alpha must be a positive number"),
    "dropout-one": (_edit_config(_set("lora_dropout", 1.0)), r"dropout must be a number in \[0, 1\)"),
    "unknown-peft-type": (_edit_config(_set("peft_type", "PREFIX_TUNING")), r"peft_type must be 'LORA'"),
    "no-peft-type": (_edit_config(lambda c: c.__delitem__("peft_type")), r"peft_type must be 'LORA', got None"),
    "flag-as-string": (_edit_config(_set("use_rslora", "false")), r"use_rslora must be true or false, got 'false'"),
    "targets-a-number": (_edit_config(_set("target_modules", 5)), r"target_modules must be a list of module names"),
    "targets-list-of-numbers": (_edit_config(_set("target_modules", [1, 2])), r"target_modules must be a list"),
    "targets-bad-regex": (_edit_config(_set("target_modules", "c_attn(")), r"not a valid regular expression"),
    "targets-another-base": (_edit_config(_set("target_modules", ["q_proj", "v_proj"])),
                             r"target_modules \['q_proj', 'v_proj'\] .* does not select it"),
    "bias-unknown": (_edit_config(_set("bias", "some")), r"bias must be 'none', 'all' or 'lora_only'"),
    "rank-pattern-list": (_edit_config(_set("rank_pattern", [1])), r"rank_pattern must map module names"),
    "rank-pattern-zero": (_edit_config(_set("rank_pattern", {"c_attn": 0})),
                          r"rank_pattern\['c_attn'\] must be a positive integer"),
    "rank-pattern-bad-regex": (_edit_config(_set("rank_pattern", {"c_attn(": 4})),
                               r"rank_pattern key 'c_attn\(' is not a valid regular expression"),
    "alpha-pattern-bad-regex": (_edit_config(_set("alpha_pattern", {"c_attn(": 4})),
                                r"alpha_pattern key 'c_attn\(' is not a valid regular expression"),
    "layers-pattern-bad-regex": (_edit_config(lambda c: c.update(layers_to_transform=[0], layers_pattern="h(")),
                                 r"layers_pattern 'h\(' is not a valid regular expression"),
    "init-pissa": (_edit_config(_set("init_lora_weights", "pissa_niter_4")),
                   r"init_lora_weights='pissa_niter_4': PEFT changed the base weights.*converted to plain LoRA"),
    "init-unknown": (_edit_config(_set("init_lora_weights", "mica")), r"init_lora_weights='mica' is not supported"),
    "unsupported-option": (_edit_config(_set("layer_replication", [[0, 1]])), r"unsupported PEFT options"),
    "activated-lora": (_edit_config(_set("alora_invocation_tokens", [5, 6])),
                       r"unsupported PEFT options.*'alora_invocation_tokens': \[5, 6\]\} \(they change what"),
    "trainable-tokens": (_edit_config(_set("trainable_token_indices", [1])), r"'trainable_token_indices'"),
    "base-model-not-string": (_edit_config(_set("base_model_name_or_path", {"x": 1})),
                              r"base_model_name_or_path must be a string or null"),
    "modules-to-save-not-in-file": (_edit_config(_set("modules_to_save", ["ln_f"])),
                                    r"missing keys \['base_model.model.transformer.ln_f.bias', '.*ln_f.weight'\]"),
    # the folder
    "pickle-only": (_pickle_only, r"adapter_model.bin, a pickle, which can run arbitrary code when loaded"),
    "weights-symlink-outside": (_symlink_outside(WEIGHTS), r"symlink pointing outside the adapter folder"),
    "config-symlink-outside": (_symlink_outside(CONFIG), r"symlink pointing outside the adapter folder"),
    "not-a-folder": (lambda d: shutil.rmtree(d), r"is not a folder holding an adapter"),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_adapter_refused_model_unchanged(case, good_adapter, tmp_path):
    mutate, message = CORPUS[case]
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    mutate(folder)
    model = tiny_gpt2()
    before = state_snapshot(model)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, folder)
    assert_same_state(model, before)
    assert not list(lora_layers(model)) and not getattr(model, "_lora_configs", None)


def test_bad_adapter_leaves_existing_adapter_untouched(good_adapter, tmp_path):
    """A failed load into a model that already holds the adapter changes none of its values."""
    model = tiny_gpt2()
    load_adapter(model, good_adapter)
    before = state_snapshot(model)
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    CORPUS["nan-weights"][0](folder)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        load_adapter(model, folder)
    assert_same_state(model, before)


def test_half_precision_adapter_loads(good_adapter, tmp_path):
    """Not bad input: an fp16 adapter is legitimate and is cast to the layers' dtype."""
    folder = tmp_path / "adapter"
    shutil.copytree(good_adapter, folder)
    _edit_tensors(lambda t: t.update({k: v.half() for k, v in t.items()}))(folder)
    reference, model = tiny_gpt2(), tiny_gpt2()
    load_adapter(reference, good_adapter)
    load_adapter(model, folder)
    batch = token_batch()
    assert torch.allclose(model_output(model, batch), model_output(reference, batch), atol=1e-2)


@pytest.mark.parametrize("fields, message", [
    ({"r": 0}, r"r must be a positive integer \(e.g. 8\), got 0"),
    ({"alpha": 0}, r"alpha must be a positive number \(e.g. 16\), got 0"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
    ({"target_modules": []}, r"target_modules is an empty list"),
    ({"target_modules": "(unclosed"}, r"target_modules='\(unclosed' is not a valid regular expression"),
    ({"target_modules": "all_linear"}, r"target_modules='all_linear' is not a keyword .*: write 'all-linear'"),
    ({"bias": "yes"}, r"bias must be 'none', 'all' or 'lora_only', got 'yes'"),
    ({"init": "zeros"}, r"init must be 'kaiming' or 'gaussian'"),
    ({"modules_to_save": False}, r"modules_to_save must be a list of module names"),
    ({"target_modules": ["q"], "layers_to_transform": [0, -1]}, r"layers_to_transform must be a layer index >= 0"),
    ({"target_modules": ["q"], "layers_to_transform": True}, r"layers_to_transform must be a layer index"),
    ({"target_modules": ["q"], "layers_pattern": "layers"}, r"layers_pattern only says .*: set layers_to_transform"),
    ({"target_modules": ["q"], "layers_to_transform": 0, "layers_pattern": [""]}, r"layers_pattern must be a module"),
    ({"target_modules": "all-linear", "layers_to_transform": 0}, r"layers_to_transform needs target_modules as a list"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        LoRAConfig(**fields)


def test_all_linear_in_any_case_is_all_linear():
    assert LoRAConfig(target_modules="ALL-Linear").target_modules == "all-linear"  # as PEFT reads it


def test_one_module_to_save_is_a_list_of_one():
    assert LoRAConfig(modules_to_save="classifier").modules_to_save == ["classifier"]  # not 10 letters


# -- property-based tests --------------------------------------------------------------------------------
anything = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(), max_size=2))


@given(r=anything | st.integers(1, 70000), alpha=anything, dropout=anything)
def test_config_accepts_exactly_the_valid_numbers(r, alpha, dropout):
    valid = (
        isinstance(r, int) and not isinstance(r, bool) and 0 < r <= 65536
        and isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0
        and isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1
    )
    if valid:
        config = LoRAConfig(r=r, alpha=alpha, dropout=dropout)
        assert config.scaling("any") == pytest.approx(alpha / r)
    else:
        with pytest.raises(ConfigError, match="must be|implausibly large"):
            LoRAConfig(r=r, alpha=alpha, dropout=dropout)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
peft_keys = st.sampled_from(["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                             "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save", "init_lora_weights",
                             "exclude_modules", "fan_in_fan_out", "task_type"])


@given(data=st.dictionaries(peft_keys, json_values, max_size=8))
def test_any_json_config_is_a_config_or_a_config_error(data):
    data.setdefault("peft_type", "LORA")
    try:
        config = LoRAConfig.from_peft_dict(data)
    except ConfigError as err:
        assert str(err)
    else:
        assert config.r > 0 and config.alpha > 0 and 0 <= config.dropout < 1
        written = config.to_peft_dict()  # what we write reads back as the same config
        assert LoRAConfig.from_peft_dict(written).to_peft_dict() == written


LLAMA = tiny_llama(layers=2, hidden=16)
LLAMA_LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_PATHS = [p for p, m in LLAMA.named_modules() if isinstance(m, torch.nn.Linear) and p != "lm_head"]


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(leaves=st.sets(st.sampled_from(LLAMA_LEAVES), min_size=1), layer=st.sampled_from(["0", "1", None]))
def test_target_resolution_by_names_and_regex_agree(leaves, layer):
    """A list of leaf names, the same as a regex, and the same as full paths select the same modules:
    exactly those whose last path segment is listed."""
    expected = [p for p in LLAMA_PATHS if p.rsplit(".", 1)[-1] in leaves and (layer is None or f".{layer}." in p)]
    names = sorted(leaves) if layer is None else [p for p in expected]
    regex = (r".*\." if layer is None else rf".*\.{layer}\..*\.") + "(" + "|".join(sorted(leaves)) + ")"
    assert find_targets(LLAMA, LoRAConfig(target_modules=names)) == expected
    assert find_targets(LLAMA, LoRAConfig(target_modules=regex)) == expected
    assert not list(lora_layers(LLAMA))  # resolution never changes the model


@given(name=st.from_regex(r"[a-z_]{1,6}", fullmatch=True), path=st.lists(st.from_regex(r"[a-z_0-9]{1,5}",
       fullmatch=True), min_size=1, max_size=4).map(".".join))
def test_name_matching_is_exact_or_dotted_suffix(name, path):
    assert matches([name], path) == (path == name or path.endswith("." + name))
    assert matches([name], f"{path}.{name}") and not matches([name], f"{path}.{name}_x")
    assert matches(path.replace(".", r"\."), path)  # a string is a regex over the whole path


def test_adapter_for_a_conv_this_model_groups_refused(tmp_path):
    """An adapter targeting a conv that is grouped in this model is an AdapterError naming the layer, not a
    bare ValueError from building the LoRA layer."""
    source = small_conv_net()
    inject(source, LoRAConfig(r=2, target_modules=["conv_in", "conv_mid"]))
    save_adapter(source, tmp_path / "adapter")
    model = small_conv_net()
    model.conv_mid = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
    before = state_snapshot(model)
    with pytest.raises(AdapterError, match="does not fit this model: target 'conv_mid' is a Conv2d, which LoRA"):
        load_adapter(model, tmp_path / "adapter")
    assert_same_state(model, before)
    assert not list(lora_layers(model)) and not getattr(model, "_lora_configs", None)
