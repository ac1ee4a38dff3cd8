"""The LoRA paper's subspace similarity and amplification factor on constructed adapters with known answers,
the phi heatmap, and the `lora-hub combine` / `compare` commands."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import tiny_gpt2

from lightning_lora import (
    AdapterError,
    AdapterState,
    LoRAConfig,
    amplification_factors,
    compare_subspaces,
    inject,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    subspace_similarity,
)
from lightning_lora.analysis import amplification, plot_similarity, similarity_grid

SCALES = torch.tensor([4.0, 3.0, 2.0, 1.0])


def _basis(dim: int = 32) -> torch.Tensor:
    """A random orthonormal basis (columns), so nothing lines up with the coordinate axes by accident."""
    return torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]


def _a(columns: list[int], dim: int = 32) -> torch.Tensor:
    """An A factor [4, dim] whose right-singular directions, strongest first, are the basis columns given."""
    return SCALES.double()[:, None] * _basis(dim)[:, columns].t()


def test_identical_subspaces_give_one():
    a = _a([0, 1, 2, 3])
    assert torch.allclose(similarity_grid(a, a), torch.ones(4, 4, dtype=torch.float64), atol=1e-12)
    mixed = torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) @ a
    assert subspace_similarity(a, mixed, 4, 4) == pytest.approx(1.0, abs=1e-12)  # same span, other basis


def test_orthogonal_subspaces_give_zero():
    grid = similarity_grid(_a([0, 1, 2, 3]), _a([4, 5, 6, 7]))
    assert grid.shape == (4, 4) and grid.abs().max() < 1e-12


def test_partial_overlap_gives_known_values():
    a1, a2 = _a([0, 1, 2, 3]), _a([2, 3, 4, 5])  # spans share two directions; a2's strongest is a1's third
    for (i, j), want in {(4, 4): 0.5, (1, 1): 0.0, (2, 2): 0.0, (3, 1): 1.0, (3, 2): 0.5, (4, 2): 1.0,
                         (2, 4): 0.0}.items():
        assert subspace_similarity(a1, a2, i, j) == pytest.approx(want, abs=1e-12), (i, j)
    torch.testing.assert_close(similarity_grid(a2, a1), similarity_grid(a1, a2).t())
    with pytest.raises(ValueError, match=r"phi\(i=5, j=1\) needs 1 <= i <= 4"):
        subspace_similarity(a1, a2, 5, 1)


def _adapter_with(directory, columns: list[int]):
    """A saved GPT-2 adapter (r=4 on c_attn) whose A factors are `_a(columns)` in every layer."""
    model = tiny_gpt2()
    inject(model, LoRAConfig(r=4, alpha=4, target_modules=["c_attn"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_a["default"].copy_(_a(columns))
            layer.lora_b["default"].normal_()
    return save_adapter(model, directory)


def test_compare_subspaces_per_layer_on_saved_adapters(tmp_path):
    x, y, z = (_adapter_with(tmp_path / n, cols) for n, cols in (("x", [0, 1, 2, 3]), ("y", [2, 3, 4, 5]),
                                                                   ("z", [8, 9, 10, 11])))
    same, partial, apart = compare_subspaces(x, x), compare_subspaces(x, y), compare_subspaces(x, z)
    assert [layer.path for layer in partial] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(layer.mean == pytest.approx(1.0, abs=1e-6) for layer in same)
    assert all(layer.phi(4, 4) == pytest.approx(0.5, abs=1e-6) for layer in partial)
    assert all(layer.grid.abs().max() < 1e-6 for layer in apart)


def test_compare_needs_a_shared_layer(tmp_path):
    model = tiny_gpt2()
    inject(model, LoRAConfig(r=2, target_modules=["c_fc"]))
    other = save_adapter(model, tmp_path / "fc")
    with pytest.raises(AdapterError, match="share no adapted layer"):
        compare_subspaces(_adapter_with(tmp_path / "attn", [0, 1, 2, 3]), other)


def test_amplification_on_a_constructed_update():
    weight = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight[0, 1], weight[2, 3], weight[0, 3], weight[2, 1] = 0.5, 0.25, 0.0, 0.0
    delta = torch.zeros(8, 6, dtype=torch.float64)
    delta[0, 1] = 3.0
    assert amplification(delta, weight, r=1) == pytest.approx(3.0 / 0.5)
    delta[2, 3] = 2.0  # U = [e0, e2], V = [e1, e3]: U^T W V^T = diag(0.5, 0.25)
    assert amplification(delta, weight, r=2) == pytest.approx(13 ** 0.5 / (0.5 ** 2 + 0.25 ** 2) ** 0.5)


def test_amplification_factors_read_the_base_in_its_own_layout(tmp_path):
    """GPT-2's Conv1D stores W as [in, out]: an update s * e_out e_in^T must meet W[in, out]."""
    model = tiny_gpt2()
    inject(model, LoRAConfig(r=1, alpha=2, target_modules=["c_attn"]))  # scaling 2
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_a["default"].zero_()[0, 3] = 1.0  # input feature 3
            layer.lora_b["default"].zero_()[5, 0] = 1.0  # output feature 5
    directory = save_adapter(model, tmp_path / "one")
    base = tiny_gpt2()
    with torch.no_grad():
        for path, _ in lora_layers(model):
            base.get_submodule(path).weight[3, 5] = 0.25
    factors = amplification_factors(base, directory)
    assert factors == pytest.approx({path: 2.0 / 0.25 for path, _ in lora_layers(model)})
    load_adapter(base, directory)  # unmerged LoRA layers: the base weight is still W0
    assert amplification_factors(base, directory) == pytest.approx(factors)
    merge(base)
    with pytest.raises(AdapterError, match="merged adapters; unmerge"):
        amplification_factors(base, directory)


def test_phi_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    layers = compare_subspaces(_adapter_with(tmp_path / "x", [0, 1, 2, 3]), _adapter_with(tmp_path / "y", [2, 3, 4, 5]))
    out = plot_similarity(layers, tmp_path / "phi.png", title="x vs y")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, channels = imread(out).shape
    assert height > 100 and width > 200 and channels in (3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi.png", "x", "y"]  # no temporary file left


def test_phi_heatmap_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    for name in ["matplotlib", *(n for n in sys.modules if n.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if the `plot` extra were not installed
    layers = compare_subspaces(*(_adapter_with(tmp_path / n, [0, 1, 2, 3]) for n in "xy"))
    with pytest.raises(ImportError, match=r"pip install 'lightning-lora\[plot\]'"):
        plot_similarity(layers, tmp_path / "phi.png")


# -- the CLI: thin commands over compare_subspaces / plot_similarity / combine ----------------------------------
def test_cli_compare_local_and_hub_spec(hub_server, tmp_path):
    from typer.testing import CliRunner

    import hub
    from hub.cli import app

    x, y = _adapter_with(tmp_path / "x", [0, 1, 2, 3]), _adapter_with(tmp_path / "y", [2, 3, 4, 5])
    hub.push(y, "me/partial", version="1.0.0", endpoint=hub_server.url)
    png = tmp_path / "phi.png"
    result = CliRunner().invoke(app, ["compare", str(x), "me/partial@^1.0", "--png", str(png)])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[2:-1] for line in result.output.splitlines() if "4 x 4" in line]
    # phi(1, 1) = phi(1, r2) = 0 (y's strongest direction is x's third), phi(4, 4) = 1/2, mean of the grid 1/3
    assert [[cell.strip() for cell in row] for row in rows] == [["4 x 4", "0.000", "0.000", "0.500", "0.333"]] * 2
    assert "transformer.h.0.at" in result.output and "transformer.h.1.at" in result.output
    assert "all layers" in result.output and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_combine_weights_as_in_the_issue(hub_server, tmp_path):
    from typer.testing import CliRunner

    import hub
    from hub.cli import app
    from lightning_lora import combine, validate_adapter

    x, y = _adapter_with(tmp_path / "x", [0, 1, 2, 3]), _adapter_with(tmp_path / "y", [2, 3, 4, 5])
    hub.push(y, "me/y", endpoint=hub_server.url)
    runner = CliRunner()
    result = runner.invoke(app, ["combine", str(x), "me/y", "--weights", "0.7", "0.3", "--out", str(tmp_path / "xy")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'xy'}: cat of 2 adapters, r=8" in result.output
    want = combine([x, y], [0.7, 0.3])
    got = AdapterState.load(tmp_path / "xy")
    assert got.config == want.config and got.tensors.keys() == want.tensors.keys()
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)

    result = runner.invoke(app, ["combine", str(x), str(y), "--weights", "1", "--weights=-1", "--method", "svd",
                                 "--r", "2", "--out", str(tmp_path / "svd")])
    assert result.exit_code == 0, result.output
    assert validate_adapter(tmp_path / "svd").config.r == 2 and "discarded energy" in result.output

    result = runner.invoke(app, ["combine", str(x), str(y), "--weights", "1", "--method", "linear",
                                 "--out", str(tmp_path / "bad")])
    assert result.exit_code == 1 and "got 1 weights for 2 adapters" in result.output
    assert not (tmp_path / "bad").exists()
