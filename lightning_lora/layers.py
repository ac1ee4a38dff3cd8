"""The LoRA layers: the paper's math around a frozen base layer, nothing else.

Every layer wraps (never copies) its frozen ``base_layer`` and adds, per named adapter, a low-rank update

    h = W0 x + s * B A x,        s = alpha / r   (alpha / sqrt(r) with rsLoRA)

with A random and B zero (the adapted layer starts exactly as the base), and only A and B training.
``merge`` folds ``W' = W0 + s B A`` into the base weight for zero inference cost, ``unmerge`` takes it out.

Parameter names mirror PEFT's module tree (``<path>.base_layer.weight``, ``<path>.lora_A.<adapter>``), so
the key mapping in `io.py` stays a one-line rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2 style layers store their weight transposed, as [in, out].
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the layers don't need it
    Conv1D = ()


class LoRALayer(nn.Module):
    """A frozen ``base_layer`` plus any number of named low-rank adapters.

    Subclasses define the update's shapes (`_shapes`), its output (`_lora_output`) and its weight-space form
    (`delta_weight`). Attributes: ``active_adapters`` (used in forward), ``merged_adapters`` (folded into the
    base weight), ``disabled`` (forward returns the base output).
    """

    #: Attribute names of the two factors; PEFT calls them lora_embedding_A/B for embeddings.
    A_NAME = "lora_A"
    B_NAME = "lora_B"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.A_NAME, nn.ParameterDict())
        setattr(self, self.B_NAME, nn.ParameterDict())
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- adapters -------------------------------------------------------------------------------------------
    @property
    def lora_a(self) -> nn.ParameterDict:
        return getattr(self, self.A_NAME)

    @property
    def lora_b(self) -> nn.ParameterDict:
        return getattr(self, self.B_NAME)

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0, init: str = "kaiming") -> None:
        """Create adapter `name` of rank `r` whose output starts at exactly zero."""
        shape_a, shape_b = self._shapes(r)
        weight = self.base_weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        a = torch.empty(shape_a, dtype=dtype, device=weight.device)
        b = torch.empty(shape_b, dtype=dtype, device=weight.device)
        self._init(a, b, r, init)
        self.lora_a[name] = nn.Parameter(a)
        self.lora_b[name] = nn.Parameter(b)
        self.scaling[name] = float(scaling)
        self.dropout_p[name] = float(dropout)
        self.active_adapters = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting")
        del self.lora_a[name], self.lora_b[name], self.scaling[name], self.dropout_p[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_params(self, name: str) -> Iterable[nn.Parameter]:
        return (self.lora_a[name], self.lora_b[name])

    def _init(self, a: torch.Tensor, b: torch.Tensor, r: int, init: str) -> None:
        # A random, B zero: the paper's choice, so the adapted layer starts exactly at the base.
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)

    # -- merge ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        """Fold ``s B A`` of each adapter into the base weight (in place). Refuses an already merged one."""
        for name in list(names if names is not None else self.active_adapters):
            if name in self.merged_adapters:
                raise RuntimeError(f"adapter {name!r} is already merged; unmerge it first")
            weight = self.base_weight
            weight.add_(self.delta_weight(name).to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the base weight again."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_weight
            weight.sub_(self.delta_weight(name).to(weight.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B A`` in the base weight's layout, computed in fp32 at least."""
        raise NotImplementedError

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self._unmerged_active():
            out = out + self._lora_output(x, name).to(out.dtype)
        return out

    def _unmerged_active(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def _dropped(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.dropout_p[name]
        return F.dropout(x, p, self.training) if p > 0 else x

    def _lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_a.items()}
        return f"adapters={ranks}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoRALinear(LoRALayer):
    """LoRA around ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2, weight stored ``[in, out]``).

    Shapes follow PEFT for both: A ``[r, in]``, B ``[out, r]``. With one active adapter, no dropout and no
    autocast, forward and backward run through `lora_linear`, which saves only what the backward needs.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) if Conv1D else False
        self.in_features, self.out_features = (
            base_layer.weight.shape if self.fan_in_fan_out else base_layer.weight.shape[::-1]
        )

    def _shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_a[name], self.lora_b[name]
        delta = (b.float() @ a.float()) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self._unmerged_active()
        if len(names) == 1 and self._fast_path_ok(x, names[0]):
            name = names[0]
            return lora_linear(
                x, self.base_layer.weight, self.base_layer.bias, self.lora_a[name], self.lora_b[name],
                self.scaling[name], self.fan_in_fan_out,
            )
        return super().forward(x)

    def _fast_path_ok(self, x: torch.Tensor, name: str) -> bool:
        weight = self.base_layer.weight
        return (
            type(self.base_layer) in (nn.Linear, Conv1D)
            and (self.dropout_p[name] == 0 or not self.training)
            and x.dtype == weight.dtype == self.lora_a[name].dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_a[name]
        x = self._dropped(x, name).to(a.dtype)
        return F.linear(F.linear(x, a), self.lora_b[name]) * self.scaling[name]


class LoRAEmbedding(LoRALayer):
    """LoRA around ``nn.Embedding``: A ``[r, num_embeddings]`` (zero), B ``[dim, r]`` (random), as in PEFT,
    so a looked-up row gets ``s * B A[:, i]``."""

    A_NAME = "lora_embedding_A"
    B_NAME = "lora_embedding_B"

    def _shapes(self, r: int):
        num, dim = self.base_layer.weight.shape
        return (r, num), (dim, r)

    def _init(self, a, b, r, init):
        # Reversed with respect to Linear (PEFT's choice): a zero A keeps the output at the base.
        nn.init.zeros_(a)
        nn.init.normal_(b)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_a[name], self.lora_b[name]
        return (b.float() @ a.float()).t() * self.scaling[name]

    def _lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        rows = F.embedding(x, self.lora_a[name].t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq)
        return (rows @ self.lora_b[name].t()) * self.scaling[name]


class LoRAConv(LoRALayer):
    """LoRA around ``nn.Conv1d/2d/3d``: A is a conv with the base's kernel and stride to ``r`` channels, B a
    1x1 conv back to ``out`` channels (PEFT's layout). Grouped convolutions are not supported."""

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1 or base_layer.padding_mode != "zeros":
            raise ValueError(
                f"LoRA supports only convolutions with groups=1 and padding_mode='zeros', got "
                f"groups={base_layer.groups}, padding_mode={base_layer.padding_mode!r}; exclude this module"
            )
        super().__init__(base_layer)
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base_layer.weight.dim() - 2]

    def _shapes(self, r: int):
        out_ch, in_ch, *kernel = self.base_layer.weight.shape
        return (r, in_ch, *kernel), (out_ch, r, *([1] * len(kernel)))

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_a[name].float(), self.lora_b[name].float()
        # conv(A^T, B) composes the two convolutions into one kernel: [in, out, *k] -> [out, in, *k].
        return self._conv(a.transpose(0, 1), b).transpose(0, 1) * self.scaling[name]

    def _lora_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base, a = self.base_layer, self.lora_a[name]
        x = self._dropped(x, name).to(a.dtype)
        hidden = self._conv(x, a, None, base.stride, base.padding, base.dilation)
        return self._conv(hidden, self.lora_b[name]) * self.scaling[name]


class _LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + bias + s (x A^T) B^T`` with a backward that keeps only ``x`` and ``x A^T``.

    The frozen base needs no weight gradient, so nothing beyond the inputs is saved; both LoRA products are
    fused into the base GEMM's output with ``addmm_`` (no separate scale, add or clone over ``[T, out]``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, fan_in_fan_out: bool):
        x2 = x.reshape(-1, x.shape[-1])
        w = weight if fan_in_fan_out else weight.t()  # [in, out]
        out = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
        xa = x2 @ lora_a.t()
        out.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.fan_in_fan_out, ctx.x_shape = scaling, fan_in_fan_out, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        dxa = (dy @ lora_b).mul_(s)  # [T, r]
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = dy @ (weight.t() if ctx.fan_in_fan_out else weight)
            grad_x.addmm_(dxa, lora_a)
            grad_x = grad_x.view(ctx.x_shape)
        if need_w:  # only when a user unfroze the base weight
            grad_w = x2.t() @ dy if ctx.fan_in_fan_out else dy.t() @ x2
        if need_bias:
            grad_bias = dy.sum(0)
        if need_a:
            grad_a = dxa.t() @ x2
        if need_b:
            grad_b = (dy.t() @ xa).mul_(s)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """The fused LoRA linear: equal to ``F.linear(x, W, bias) + s * F.linear(F.linear(x, A), B)``.

    `weight` is ``[out, in]`` (``[in, out]`` when `fan_in_fan_out`), `lora_a` ``[r, in]``, `lora_b` ``[out, r]``.
    """
    return _LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, fan_in_fan_out)


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that can wrap `module`, or None if its type is not supported."""
    if isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D)):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoRAConv
    return None
