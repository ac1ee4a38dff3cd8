"""Adapter arithmetic: `combine` with cat (exact), svd (truncated, energy reported) and linear (factor average)
on real trained adapters of a tiny GPT-2 (Conv1D layers, so the fan_in_fan_out layout is exercised)."""

from __future__ import annotations

import pytest
import torch
from helpers import image_batch, model_output, small_conv_net, tiny_gpt2, tiny_llama, token_batch, train_steps
from torch import nn

from lightning_lora import (
    AdapterError,
    AdapterState,
    ConfigError,
    LoRAConfig,
    combine,
    inject,
    load_adapter,
    lora_layers,
    save_adapter,
    validate_adapter,
)

TARGETS = ["c_attn", "c_fc"]


def _train(directory, config: LoRAConfig, seed: int, n_embd: int = 32):
    model = tiny_gpt2(n_embd=n_embd)
    torch.manual_seed(seed)
    inject(model, config)
    save_adapter(train_steps(model, token_batch(seed=seed, vocab=64)), directory)
    return directory


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Trained adapters: a and c share ranks (r=4, c_fc r=2), b has r=2 with rsLoRA; two misfits."""
    root = tmp_path_factory.mktemp("adapters")
    pattern = {"c_fc": 2}
    return {
        "a": _train(root / "a", LoRAConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern=pattern), 1),
        "b": _train(root / "b", LoRAConfig(r=2, alpha=3, target_modules=TARGETS, use_rslora=True), 2),
        "c": _train(root / "c", LoRAConfig(r=4, alpha=16, target_modules=TARGETS, rank_pattern=pattern), 3),
        "other_targets": _train(root / "t", LoRAConfig(r=4, alpha=8, target_modules=["c_proj"]), 4),
        "other_base": _train(root / "base", LoRAConfig(r=4, alpha=8, target_modules=TARGETS), 5, n_embd=48),
    }


def _deltas(directory) -> dict[str, torch.Tensor]:
    """Each adapted layer's delta weight, as our layers compute it after loading (base layout)."""
    model = tiny_gpt2()
    load_adapter(model, directory)
    return {path: layer.delta_weight("default") for path, layer in lora_layers(model)}


def test_cat_is_the_exact_weighted_sum_of_deltas(adapters, tmp_path):
    combined = combine([adapters["a"], adapters["b"]], [0.7, -0.3], method="cat")
    assert combined.config.r == 6 and combined.config.rank_pattern == {
        r"^transformer\.h\.0\.mlp\.c_fc": 4, r"^transformer\.h\.1\.mlp\.c_fc": 4}
    assert combined.config.scaling("transformer.h.0.mlp.c_fc") == combined.config.scaling("x.c_attn") == 1.0
    assert combined.total_discarded_energy == 0.0
    assert combined.metadata["architecture"] == "GPT2LMHeadModel"  # for the card and merge, as its inputs had
    out = combined.save(tmp_path / "cat")

    model = tiny_gpt2()
    load_adapter(model, out)
    da, db = _deltas(adapters["a"]), _deltas(adapters["b"])
    for path, layer in lora_layers(model):
        torch.testing.assert_close(layer.delta_weight("default"), 0.7 * da[path] - 0.3 * db[path], atol=1e-5, rtol=0)

    merged = tiny_gpt2()  # the base with both deltas merged by hand
    with torch.no_grad():
        for path, delta in da.items():
            merged.get_submodule(path).weight += 0.7 * delta - 0.3 * db[path]
    batch = token_batch()
    torch.testing.assert_close(model_output(model, batch), model_output(merged, batch), atol=1e-5, rtol=0)
    assert (model_output(merged, batch) - model_output(tiny_gpt2(), batch)).abs().max() > 1e-3


def test_svd_full_rank_is_exact_and_truncation_reports_discarded_energy(adapters):
    inputs, weights = [adapters["a"], adapters["b"]], [0.7, -0.3]
    exact = combine(inputs, weights, method="cat")
    full = combine(inputs, weights, method="svd", r=6)  # c_fc: 2 + 2 < 6, kept at its exact rank 4
    assert full.total_discarded_energy < 1e-12 and full.config.rank_pattern == exact.config.rank_pattern
    for path in exact.factors():
        torch.testing.assert_close(full.delta(path), exact.delta(path), atol=1e-5, rtol=0)

    cut = combine(inputs, weights, method="svd", r=2)
    assert cut.config.r == 2 and cut.config.rank_pattern == {}
    discarded = total = 0.0
    for path, (a, b, scaling) in cut.factors().items():
        assert a.shape[0] == b.shape[1] == 2 and scaling == 1.0
        target = exact.delta(path)
        sigma2 = torch.linalg.svdvals(target).square()
        want = (sigma2[2:].sum() / sigma2.sum()).item()
        assert cut.discarded_energy[path] == pytest.approx(want, abs=1e-6)
        # Eckart-Young: the truncation is the best rank-2 approximation, its error is exactly that energy
        error = (target - cut.delta(path)).square().sum() / target.square().sum()
        assert error.item() == pytest.approx(want, abs=1e-6)
        discarded, total = discarded + sigma2[2:].sum().item(), total + sigma2.sum().item()
    assert 0.0 < cut.total_discarded_energy == pytest.approx(discarded / total, abs=1e-9)
    assert combine(inputs, weights, method="svd").config.r == 4  # default: the largest input rank


def test_linear_averages_the_factors_not_the_deltas(adapters):
    a, c = AdapterState.load(adapters["a"]), AdapterState.load(adapters["c"])
    mixed = combine([a, c], [0.25, 0.75], method="linear")
    assert mixed.config.r == 4 and mixed.config.rank_pattern == {
        r"^transformer\.h\.0\.mlp\.c_fc": 2, r"^transformer\.h\.1\.mlp\.c_fc": 2}
    fa, fc = a.factors(), c.factors()
    for path, (am, bm, scaling) in mixed.factors().items():
        (a1, b1, s1), (a2, b2, s2) = fa[path], fc[path]
        assert scaling == 1.0
        torch.testing.assert_close(am, 0.25 * a1 + 0.75 * a2, atol=1e-6, rtol=0)
        torch.testing.assert_close(bm, 0.25 * s1 * b1 + 0.75 * s2 * b2, atol=1e-6, rtol=0)
        weighted_sum = 0.25 * a.delta(path) + 0.75 * c.delta(path)
        cross_terms = (0.25 * s1 * b1.double() + 0.75 * s2 * b2.double()) @ (0.25 * a1 + 0.75 * a2).double()
        torch.testing.assert_close(mixed.delta(path), cross_terms, atol=1e-6, rtol=0)
        assert (mixed.delta(path) - weighted_sum).norm() > 0.1 * weighted_sum.norm()

    same = combine([a, a], [0.5, 0.5], method="linear")  # averaging copies gives the adapter back
    for path in fa:
        torch.testing.assert_close(same.delta(path), a.delta(path), atol=1e-6, rtol=0)


def test_loaded_adapters_combine_like_folders(adapters):
    model = tiny_gpt2()
    load_adapter(model, adapters["a"])
    from_memory = combine([AdapterState.from_model(model), validate_adapter(adapters["b"])], [1.0, 2.0])
    from_disk = combine([adapters["a"], adapters["b"]], [1.0, 2.0])
    assert from_memory.config == from_disk.config and from_memory.fingerprint == from_disk.fingerprint
    for key, tensor in from_disk.tensors.items():
        torch.testing.assert_close(from_memory.tensors[key], tensor, atol=0, rtol=0)


@pytest.mark.parametrize(("make", "batch", "targets"), [
    (small_conv_net, image_batch, ["conv_in", "conv_mid", "conv_row"]),  # A [r, in, *k], B [out, r, 1...]
    (tiny_gpt2, token_batch, ["wte"]),  # lora_embedding_A/B, delta transposed
])
@pytest.mark.parametrize("method", ["cat", "svd"])
def test_conv_and_embedding_layouts_combine_exactly(tmp_path, make, batch, targets, method):
    dirs, deltas = [], []
    for seed, r in ((1, 2), (2, 3)):
        model = make()
        torch.manual_seed(seed)
        inject(model, LoRAConfig(r=r, alpha=2 * r, target_modules=targets))
        train_steps(model, batch(seed=seed), steps=2)
        dirs.append(save_adapter(model, tmp_path / str(seed)))
        deltas.append({path: layer.delta_weight("default") for path, layer in lora_layers(model)})
    combined = combine(dirs, [0.5, 2.0], method=method, r=5 if method == "svd" else None)
    model = make()
    load_adapter(model, combined.save(tmp_path / "out"))
    for path, layer in lora_layers(model):
        torch.testing.assert_close(layer.delta_weight("default"), 0.5 * deltas[0][path] + 2.0 * deltas[1][path],
                                   atol=1e-5, rtol=0)
        assert deltas[0][path].abs().max() > 1e-3


class _Nested(nn.Module):
    """``fc`` at the top and again inside ``enc``: the path ``fc`` is a dotted suffix of ``enc.fc``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.enc = nn.Linear(4, 4), nn.Sequential()
        self.enc.fc, self.enc.out = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc.out(self.enc.fc(x)) + self.fc(x[:, :4]).sum(-1, keepdim=True)


def test_per_module_ranks_apply_to_their_module_alone(tmp_path):
    """svd keeps ``fc`` (4 x 4) at rank 4 and the others at 8: its rank_pattern key must not also set
    ``enc.fc``, in our loader and in PEFT's."""
    from peft import PeftModel

    states = []
    for seed in (1, 2):
        model = _Nested()
        torch.manual_seed(seed)
        inject(model, LoRAConfig(r=8, alpha=8, target_modules=["fc", "enc.fc", "enc.out"]))
        for _, layer in lora_layers(model):
            nn.init.normal_(layer.lora_b["default"])
        states.append(AdapterState.from_model(model))
    combined = combine(states, [0.5, 0.5], method="svd", r=8)
    out = combined.save(tmp_path / "svd")
    ours = _Nested()
    load_adapter(ours, out)
    assert {path: layer.lora_a["default"].shape[0] for path, layer in lora_layers(ours)} == {
        "fc": 4, "enc.fc": 8, "enc.out": 8}
    theirs = PeftModel.from_pretrained(_Nested(), str(out)).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(model_output(ours, x), model_output(theirs, x), atol=1e-5, rtol=0)
    for path in ("fc", "enc.fc", "enc.out"):  # each layer holds the combination's update at scale 1
        torch.testing.assert_close(ours.get_submodule(path).delta_weight("default").double(), combined.delta(path),
                                   atol=1e-5, rtol=0)


def test_peft_adapters_with_an_embedding_base_weight_combine(tmp_path):
    """PEFT saves a targeted embedding's full base weight beside its factors: not an update, carried over."""
    from peft import LoraConfig, PeftModel, get_peft_model

    dirs, deltas = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                             init_lora_weights=False))
        directory = tmp_path / str(seed)
        peft_model.save_pretrained(directory)
        dirs.append(directory)
        model = tiny_llama()
        load_adapter(model, directory)
        deltas.append({path: layer.delta_weight("default") for path, layer in lora_layers(model)})
    out = combine(dirs, [0.5, 2.0]).save(tmp_path / "cat")
    ours = tiny_llama()
    load_adapter(ours, out)
    for path, layer in lora_layers(ours):
        torch.testing.assert_close(layer.delta_weight("default"), 0.5 * deltas[0][path] + 2.0 * deltas[1][path],
                                   atol=1e-5, rtol=0)
    theirs = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    batch = token_batch()
    torch.testing.assert_close(model_output(ours, batch), model_output(theirs, batch), atol=1e-5, rtol=0)

    other = AdapterState.load(dirs[1])
    key = next(k for k in other.tensors if k.endswith("embed_tokens.base_layer.weight"))
    other.tensors[key] = other.tensors[key] + 1.0
    with pytest.raises(AdapterError, match=r"carries another .*embed_tokens.base_layer.weight.*one base"):
        combine([dirs[0], other], [0.5, 0.5])


@pytest.mark.parametrize(("names", "kwargs", "error", "match"), [
    (["a", "other_targets"], {}, AdapterError, "target different modules"),
    (["a", "other_base"], {}, AdapterError, "different base model"),
    (["a", "b"], {"method": "linear"}, AdapterError, "same rank everywhere.*'transformer.h.0.attn.c_attn'"),
    (["a", "b"], {"weights": [1.0]}, ConfigError, "got 1 weights for 2 adapters"),
    (["a", "b"], {"weights": [1.0, float("nan")]}, ConfigError, "finite numbers"),
    (["a", "b"], {"method": "sum"}, ConfigError, "method must be one of"),
    (["a", "b"], {"method": "cat", "r": 2}, ConfigError, "r applies to method='svd' only"),
    (["a", "b"], {"method": "svd", "r": 0}, ConfigError, "r must be a positive integer"),
    ([], {"weights": []}, ConfigError, "at least one adapter"),
])
def test_mismatches_raise_clear_errors(adapters, names, kwargs, error, match):
    kwargs = {"weights": [0.5] * len(names)} | kwargs
    with pytest.raises(error, match=match):
        combine([adapters[n] for n in names], **kwargs)


def test_refuses_other_bases_dora_and_full_tensors(adapters):
    a = AdapterState.load(adapters["a"])
    renamed = [AdapterState(a.config.replace(base_model=name), a.tensors) for name in ("org/base-1", "org/base-2")]
    with pytest.raises(AdapterError, match=r"different base models \['org/base-1', 'org/base-2'\]"):
        combine(renamed, [1, 1])
    with pytest.raises(AdapterError, match="DoRA adapter"):
        combine([a, AdapterState(a.config.replace(use_dora=True), a.tensors, source="dora")], [1, 1])
    head = a.tensors | {"base_model.model.lm_head.weight": torch.zeros(64, 32)}
    with pytest.raises(AdapterError, match=r"non-LoRA tensors \['base_model.model.lm_head.weight'\]"):
        combine([a, AdapterState(a.config, head)], [1, 1])


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_saved_combination_loads_here_and_in_peft(adapters, tmp_path, method):
    from peft import PeftModel

    combined = combine([adapters["a"], adapters["b"]], [0.7, 0.3], method=method)
    out = combined.save(tmp_path / method)
    info = validate_adapter(out)
    assert info.config.r == combined.config.r and info.metadata["lightning_lora.discarded_energy"] == \
        f"{combined.total_discarded_energy:.6g}"
    ours = tiny_gpt2()
    load_adapter(ours, out)
    theirs = PeftModel.from_pretrained(tiny_gpt2(), str(out)).eval()
    batch = token_batch()
    torch.testing.assert_close(model_output(ours, batch), model_output(theirs, batch), atol=1e-5, rtol=0)


def test_a_model_in_place_of_an_adapter_says_how_to_take_its_adapter():
    """combine([model_a, model_b], ...) failed in os.fspath ("expected str, bytes or os.PathLike object")."""
    model = tiny_gpt2()
    inject(model, LoRAConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(TypeError, match=r"got GPT2LMHeadModel: .*AdapterState.from_model\(model, adapter_name\)"):
        combine([model, model], [0.5, 0.5])
    assert combine([AdapterState.from_model(model)] * 2, [0.5, 0.5]).config.r == 4
