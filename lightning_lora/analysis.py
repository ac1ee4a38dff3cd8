"""The LoRA paper's low-rank analysis (Hu et al. 2021, Section 7), for saved or loaded adapters.

Subspace similarity (7.2). With ``A = U S V^T``, let ``V_i`` be A's top-i right-singular directions (rows of
``V^T``, in the layer's input space). For two adapters of one layer

    phi(A_1, A_2, i, j) = ||V_1,i V_2,j^T||_F^2 / min(i, j)   in [0, 1]:

1 when one span contains the other, 0 when they are orthogonal. With ``M = V_1 V_2^T`` (``[r_1, r_2]``, the
cosines between directions), ``phi(i, j) = sum_{a<=i, b<=j} M_ab^2 / min(i, j)``: the whole grid is one 2-D
cumulative sum. (The paper writes U for these right-singular matrices.)

Amplification factor (7.3). Project the base weight W onto the r-dimensional subspace of the update dW:
``U^T W V^T`` with U, V^T the top-r left/right singular vectors of dW (r the adapter's rank). Then

    amplification = ||dW||_F / ||U^T W V^T||_F,

large (about 21.5 for r = 4 on GPT-3's W_q in the paper) when dW amplifies directions W hardly uses.
dW includes the adapter's scaling ``alpha / r``: it is the real change to the weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import quant
from .combine import AdapterLike, as_adapter_state
from .io import AdapterError, atomic_write
from .layers import LoRALayer, lora_class_for


@dataclass
class LayerSimilarity:
    """phi for one layer: ``grid[i - 1, j - 1] = phi(A_1, A_2, i, j)`` for i <= r_1, j <= r_2."""

    path: str
    grid: torch.Tensor

    def phi(self, i: int, j: int) -> float:
        r1, r2 = self.grid.shape
        if not (1 <= i <= r1 and 1 <= j <= r2):
            raise ValueError(f"phi(i={i}, j={j}) needs 1 <= i <= {r1} and 1 <= j <= {r2} for layer {self.path!r}")
        return float(self.grid[i - 1, j - 1])

    @property
    def mean(self) -> float:
        return float(self.grid.mean())


def similarity_grid(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """``phi(a1, a2, i, j)`` for every ``1 <= i <= r_1``, ``1 <= j <= r_2`` (float64, ``[r_1, r_2]``).
    A conv adapter's A ``[r, in, *kernel]`` is flattened to ``[r, in * kernel]``."""
    a1, a2 = a1.reshape(a1.shape[0], -1).double(), a2.reshape(a2.shape[0], -1).double()
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"A factors of {a1.shape[1]} and {a2.shape[1]} input features live in different spaces")
    v1 = torch.linalg.svd(a1, full_matrices=False).Vh
    v2 = torch.linalg.svd(a2, full_matrices=False).Vh
    overlap = (v1 @ v2.t()).square().cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=overlap.dtype)[None, :]
    return overlap / torch.minimum(i, j)


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    """The paper's ``phi(A_1, A_2, i, j)`` for two A factors ``[r, in]`` of the same layer."""
    return LayerSimilarity("", similarity_grid(a1, a2)).phi(i, j)


def compare_subspaces(adapter1: AdapterLike, adapter2: AdapterLike) -> list[LayerSimilarity]:
    """phi grids, per layer, between the A factors of two adapters (folders or `AdapterState`) over the
    layers both adapt, in the first adapter's order. Raises AdapterError if they share no layer, or if a shared
    layer's inputs differ in size (the adapters were trained on different base models)."""
    f1, f2 = as_adapter_state(adapter1).factors(), as_adapter_state(adapter2).factors()
    shared = [path for path in f1 if path in f2]
    if not shared:
        raise AdapterError(f"the adapters share no adapted layer (first: {list(f1)[:3]}, second: {list(f2)[:3]})")
    for path in shared:
        if f1[path][0].shape[1:] != f2[path][0].shape[1:]:
            raise AdapterError(f"layer {path!r} has inputs of shape {list(f1[path][0].shape[1:])} in the first adapter "
                               f"and {list(f2[path][0].shape[1:])} in the second: they were trained on different base "
                               f"models")
    return [LayerSimilarity(path, similarity_grid(f1[path][0], f2[path][0])) for path in shared]


def amplification(delta: torch.Tensor, weight: torch.Tensor, r: int) -> float:
    """``||dW||_F / ||U^T W V^T||_F`` with U, V^T the top-`r` singular vectors of `delta` (same layout as
    `weight`, 2-D). Infinite when W has nothing in dW's subspace."""
    delta, weight = delta.double(), weight.double()
    if delta.shape != weight.shape:
        raise ValueError(f"delta {list(delta.shape)} and weight {list(weight.shape)} must have the same shape")
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    projected = u[:, :r].t() @ weight @ vh[:r].t()
    return (torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(projected)).item()


def amplification_factors(base: nn.Module, adapter: AdapterLike) -> dict[str, float]:
    """The amplification factor of every layer `adapter` adapts, against the weights of `base` (the base
    model, plain or with unmerged LoRA layers, 4-bit layers dequantized; a merged one would project dW onto
    W0 + dW)."""
    state = as_adapter_state(adapter)
    out = {}
    for path, (a, b, scaling) in state.factors().items():
        try:
            module = base.get_submodule(path)
        except AttributeError:
            raise AdapterError(f"the base model has no module {path!r}; is it the adapter's base?") from None
        if isinstance(module, LoRALayer):
            if module.merged_adapters:
                raise AdapterError(f"layer {path!r} has merged adapters; unmerge the model first")
            module = module.base_layer
        cls = lora_class_for(module)
        if cls is None:
            raise AdapterError(f"layer {path!r} ({type(module).__name__}) cannot carry LoRA; is it the adapter's base?")
        probe = cls(module)  # a throw-away wrapper: the layer decides dW's layout
        probe.add_adapter("probe", a.shape[0], scaling)
        with torch.no_grad():
            probe.lora_a["probe"].copy_(a)
            probe.lora_b["probe"].copy_(b)
        delta = probe.delta_weight("probe")
        weight = quant.dequantize(module) if quant.is_quantized(module) else module.weight.detach()
        out[path] = amplification(delta.reshape(delta.shape[0], -1), weight.reshape(weight.shape[0], -1), a.shape[0])
    return out


def plot_similarity(layers: list[LayerSimilarity], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write the phi grids as a PNG of heatmaps, one panel per layer (needs the ``plot`` extra). Uses a bare
    `Figure`, not pyplot, so the caller's matplotlib backend and open figures are left alone."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'lightning-lora[plot]'") from None
    if not layers:
        raise ValueError("no layers to plot")
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig = Figure(figsize=(3.2 * cols + 1, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        r1, r2 = layer.grid.shape
        image = ax.imshow(layer.grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="lower",
                          extent=(0.5, r2 + 0.5, 0.5, r1 + 0.5), aspect="auto")
        ax.set_title(layer.path, fontsize=7)
        ax.set_xlabel("j (second adapter)", fontsize=8)
        ax.set_ylabel("i (first adapter)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="phi(i, j)")
    if title:
        fig.suptitle(title)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
