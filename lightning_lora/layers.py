"""The LoRA layers: the paper's math around a frozen base layer, nothing else.

Every layer wraps (never copies) its frozen ``base_layer`` and adds, per named adapter, a low-rank update

    h = W0 x + s * B A x,        s = alpha / r   (alpha / sqrt(r) with rsLoRA)

with A random and B zero (the adapted layer starts exactly as the base), and only A and B training.
``merge`` folds ``W' = W0 + s B A`` into the base weight for zero inference cost, ``unmerge`` takes it out.

Parameter names mirror PEFT's module tree (``<path>.base_layer.weight``, ``<path>.lora_A.<adapter>``), so
the key mapping in `io.py` stays a one-line rule.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import quant

try:  # GPT-2 style layers store their weight transposed, as [in, out].
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the layers don't need it
    Conv1D = ()

#: Base layer types the fused linear path computes directly (a 4-bit base is another type: general path).
_DENSE = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


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
    def weight(self) -> torch.Tensor:
        """The base layer's weight (a 4-bit base: its quantized parameter), read-only, as PEFT's layers have it:
        transformers reads it through the module it built (T5's ``wo.weight.dtype``, ViT's ``projection.weight``,
        ``get_input_embeddings().weight``). A property, not a parameter: state dicts and counts hold it once."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, read-only (see `weight`)."""
        return self.base_layer.bias

    def add_adapter(
        self, name: str, r: int, scaling: float, dropout: float = 0.0, init: str = "kaiming", use_dora: bool = False
    ) -> None:
        """Create adapter `name` of rank `r` whose output starts at exactly zero."""
        if use_dora:
            raise ValueError(f"DoRA supports Linear and Conv1D layers only, not {type(self.base_layer).__name__}; "
                             f"exclude this module from target_modules")
        shape_a, shape_b = self._shapes(r)
        weight = self.weight
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
            self._merge_one(name)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the base weight again."""
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _merge_one(self, name: str) -> None:
        weight = self.weight
        weight.add_(self.delta_weight(name).to(weight.dtype))

    def _unmerge_one(self, name: str) -> None:
        weight = self.weight
        weight.sub_(self.delta_weight(name).to(weight.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s * B A`` in the base weight's layout, computed in fp32 at least."""
        raise NotImplementedError

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base_out = out = self.base_layer(x, *args, **kwargs)
        for name in self._unmerged_active():
            out = out + self._lora_output(x, name, base_out).to(out.dtype)
        return out

    def _unmerged_active(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    def _dropped(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """`x` after this adapter's dropout: `x` itself (the same object) when none is active."""
        p = self.dropout_p[name]
        return F.dropout(x, p) if p > 0 and self.training else x

    def _lora_output(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output `base_out` for input `x` (DoRA reuses `base_out`)."""
        raise NotImplementedError

    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_a.items()}
        return f"adapters={ranks}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoRALinear(LoRALayer):
    """LoRA (and DoRA) around ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2, weight stored ``[in, out]``),
    or a 4-bit base from `lightning_lora.quant` (QLoRA).

    Shapes follow PEFT for both: A ``[r, in]``, B ``[out, r]``. With one active adapter and a dense base (for
    DoRA: no active dropout, no autocast), forward and backward run through `lora_linear`, which saves only what
    the backward needs (and in inference skips autograd); under autocast it gets the inputs autocast would give
    ``F.linear``.

    DoRA (Liu et al. 2024) splits the adapted weight into a magnitude and a direction,

        W' = m * (W0 + s B A) / ||W0 + s B A||,      ||.|| the L2 norm of each output row (over the inputs),

    with ``m`` (``lora_magnitude_vector``, one entry per output) trainable and initialised to ``||W0||`` so
    the layer starts at the base. As the paper suggests (sec. 4.3) and PEFT does, the norm is a constant in
    backward. Then ``h = g * (W0 x + s B A x) + bias`` with ``g = m / ||W0 + s B A||``: the fused LoRA matmul
    plus one ``addcmul``, and the norm comes without forming ``B A`` ([out, in]) from

        ||W0 + s B A||^2 = ||W0||^2 + rowsum(sB * (2 W0 A^T + sB A A^T)),

    which costs one ``[r, in] x [in, out]`` product instead of an ``[out, r] x [r, in]`` one plus two passes
    over an ``[out, in]`` matrix.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) if Conv1D else False
        self.in_features, self.out_features = (
            base_layer.weight.shape if self.fan_in_fan_out else (base_layer.in_features, base_layer.out_features)
        )
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_merged_scale: dict[str, torch.Tensor] = {}
        self._sq_norm_key: tuple | None = None
        quant.keep_unpacked(base_layer)  # a 4-bit base must stay readable by merge and DoRA

    def _shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def add_adapter(
        self, name: str, r: int, scaling: float, dropout: float = 0.0, init: str = "kaiming", use_dora: bool = False
    ) -> None:
        """Create adapter `name`; with `use_dora` also its magnitude ``m = ||W0||`` (per output row)."""
        super().add_adapter(name, r, scaling, dropout, init)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self.dora_norm(name).to(self.lora_a[name].dtype))

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def adapter_params(self, name: str) -> Iterable[nn.Parameter]:
        extra = (self.lora_magnitude_vector[name],) if name in self.lora_magnitude_vector else ()
        return (*super().adapter_params(name), *extra)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_a[name], self.lora_b[name]
        delta = (_wide(b) @ _wide(a)) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    # -- DoRA -----------------------------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a view for dense layers, dequantized for a 4-bit base)."""
        base = self.base_layer
        if quant.is_quantized(base):
            return quant.dequantize(base)
        return base.weight.t() if self.fan_in_fan_out else base.weight

    @torch.no_grad()
    def dora_norm(self, name: str) -> torch.Tensor:
        """``||W0 + s B A||`` per output row, in fp32 at least, without forming ``B A`` (see the class doc)."""
        return self._dora_sq_norm(name).sqrt_()

    def _dora_sq_norm(self, name: str) -> torch.Tensor:
        w = self.dense_weight()
        dtype = torch.promote_types(w.dtype, torch.float32)
        a = self.lora_a[name].to(dtype)
        sb = self.lora_b[name].to(dtype) * self.scaling[name]
        wa = F.linear(a, w.to(dtype)).t()  # W0 A^T, [out, r]
        cross = torch.addmm(wa, sb, a @ a.t(), beta=2)  # 2 W0 A^T + sB A A^T
        return torch.linalg.vecdot(sb, cross).add_(self._base_sq_norm(w, dtype)).clamp_min_(0)

    def _base_sq_norm(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``||W0||^2`` per row, kept while the base weight's storage and version counter are unchanged
        (merge, ``load_state_dict`` and ``.to()`` all change one of them; writes through ``.data`` do not).
        Not cached for a 4-bit base, nor under ``torch.compile``, which fuses the norm into its kernels."""
        if quant.is_quantized(self.base_layer) or torch.compiler.is_compiling():
            return torch.linalg.vector_norm(w, dim=1, dtype=dtype).square_()
        weight = self.base_layer.weight
        key = (weight.data_ptr(), weight._version, dtype)
        if self._sq_norm_key != key:
            self._sq_norm = torch.linalg.vector_norm(w, dim=1, dtype=dtype).square_()
            self._sq_norm_key = key
        return self._sq_norm

    def dora_scale(self, name: str) -> torch.Tensor:
        """``g = m / ||W0 + s B A||``: differentiable in ``m`` only (the norm is a constant in backward)."""
        m = self.lora_magnitude_vector[name]
        with torch.no_grad():
            inv_norm = self._dora_sq_norm(name).rsqrt_()
        return m * inv_norm.to(m.dtype)

    def _per_output(self, g: torch.Tensor) -> torch.Tensor:
        """`g` shaped to scale the output rows of the stored base weight."""
        return g.view(1, -1) if self.fan_in_fan_out else g.view(-1, 1)

    # -- merge ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None) -> None:
        """As `LoRALayer.merge`; a 4-bit base is first replaced by its dequantized dense layer (in the dtype it
        was quantized from, `quant.dense_dtype`), so merge, unmerge and unload work on QLoRA models and the
        merged layer fits the rest of the model (`quant.unload_quantized` can re-quantize)."""
        if quant.is_quantized(self.base_layer):
            self.base_layer = quant.dequantize_module(self.base_layer)
        super().merge(names)

    def _merge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super()._merge_one(name)
        g = _wide(self.dora_scale(name))  # from the unmerged weight, as forward computes it
        self._dora_merged_scale[name] = g
        weight = self.weight
        weight.add_(self.delta_weight(name).to(weight.dtype)).mul_(self._per_output(g).to(weight.dtype))

    def _unmerge_one(self, name: str) -> None:
        if name not in self.lora_magnitude_vector:
            return super()._unmerge_one(name)
        g = self._dora_merged_scale.pop(name)
        weight = self.weight
        weight.div_(self._per_output(g).to(weight.dtype)).sub_(self.delta_weight(name).to(weight.dtype))

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self._unmerged_active()
        dtype = self._fused_dtype(x, names[0]) if len(names) == 1 else None
        if dtype is None:
            return super().forward(x)
        name, base = names[0], self.base_layer
        # under autocast, the casts autocast would make for F.linear (none when the dtype is already right)
        weight, bias = _cast(base.weight, dtype), None if base.bias is None else _cast(base.bias, dtype)
        a, b, s = _cast(self.lora_a[name], dtype), _cast(self.lora_b[name], dtype), self.scaling[name]
        x_lora = self._dropped(x, name)
        x, x_lora = _cast(x, dtype), None if x_lora is x else _cast(x_lora, dtype)
        if name not in self.lora_magnitude_vector:
            return lora_linear(x, weight, bias, a, b, s, self.fan_in_fan_out, x_lora)
        u = lora_linear(x, weight, None, a, b, s, self.fan_in_fan_out)  # (W0 + s B A) x
        return _scale_outputs(u, self.dora_scale(name), bias)

    def _fused_dtype(self, x: torch.Tensor, name: str) -> torch.dtype | None:
        """The dtype `lora_linear` runs adapter `name` in, or None where the general path must run.

        Under autocast that is autocast's dtype, the one ``F.linear`` would compute in, for inputs, weights and
        adapters in fp32 or already in it (DoRA under autocast takes the general path); otherwise the one dtype
        that input, weight and adapter share. Also general: a 4-bit base, a base with hooks (`_hooked`), and DoRA
        with active dropout, whose ``(g - 1) W0 x'`` needs a base product of the dropped input."""
        base = self.base_layer
        if type(base) not in _DENSE or _hooked(base):
            return None
        dora = name in self.lora_magnitude_vector
        w_dtype, a_dtype, device = base.weight.dtype, self.lora_a[name].dtype, x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            return dtype if not dora and {x.dtype, w_dtype, a_dtype} <= {torch.float32, dtype} else None
        if dora and self.training and self.dropout_p[name] > 0:
            return None
        return x.dtype if x.dtype == w_dtype == a_dtype else None

    def _lora_output(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_a[name], self.lora_b[name]
        device = x.device.type
        # autocast does not reach into an autograd.Function's backward: cast here as autocast would for F.linear
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        x = _cast(self._dropped(x, name), dtype)
        lora = _lora_product(x, _cast(a, dtype), _cast(b, dtype), self.scaling[name])
        if name not in self.lora_magnitude_vector:
            return lora
        # DoRA added to the base output W0 x + bias: (g - 1) W0 x' + g s B A x' (x' = x after dropout, as PEFT).
        # Without active dropout x' = x, and W0 x is the base output less its bias: no second base matmul.
        g = self.dora_scale(name)
        if self.dropout_p[name] == 0 or not self.training:
            bias = self.base_layer.bias
            w0x = base_out if bias is None else base_out - bias.to(base_out.dtype)
        else:
            w0x = F.linear(x, self.dense_weight().to(x.dtype))
        return (g - 1) * w0x + g * lora


class LoRAEmbedding(LoRALayer):
    """LoRA around ``nn.Embedding``: A ``[r, num_embeddings]`` (zero), B ``[dim, r]`` (random), as in PEFT,
    so a looked-up row gets ``s * B A[:, i]``. A scaled word embedding (Gemma's, BART's with ``scale_embedding``)
    multiplies its looked-up rows by its ``embed_scale``; the update's rows are scaled alike, as in PEFT, so that
    merging ``s B A`` into the weight leaves the output unchanged."""

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
        return (_wide(b) @ _wide(a)).t() * self.scaling[name]

    def _lora_output(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        rows = F.embedding(x, self.lora_a[name].t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq)
        out = (rows @ self.lora_b[name].t()) * self.scaling[name]
        embed_scale = getattr(base, "embed_scale", None)
        if isinstance(embed_scale, torch.Tensor):
            embed_scale = embed_scale.to(out.dtype)
        return out if embed_scale is None else out * embed_scale


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

    #: The base convolution's hyperparameters, readable on the wrapper as `weight` is: transformers reads them
    #: through the module it built (Whisper's encoder: ``conv1.stride``).
    _BASE_ATTRIBUTES = frozenset({"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                                  "groups", "padding_mode"})

    def __getattr__(self, name: str):
        if name in LoRAConv._BASE_ATTRIBUTES:
            return getattr(self.base_layer, name)
        return super().__getattr__(name)

    def _shapes(self, r: int):
        out_ch, in_ch, *kernel = self.base_layer.weight.shape
        return (r, in_ch, *kernel), (out_ch, r, *([1] * len(kernel)))

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = _wide(self.lora_a[name]), _wide(self.lora_b[name])
        # conv(A^T, B) composes the two convolutions into one kernel: [in, out, *k] -> [out, in, *k].
        return self._conv(a.transpose(0, 1), b).transpose(0, 1) * self.scaling[name]

    def _lora_output(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        base, a = self.base_layer, self.lora_a[name]
        x = self._dropped(x, name).to(a.dtype)
        hidden = self._conv(x, a, None, base.stride, base.padding, base.dilation)
        return self._conv(hidden, self.lora_b[name]) * self.scaling[name]


class _LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + bias + s (x' A^T) B^T`` (``x'``: x, or x after dropout) with a backward that keeps only
    ``x'`` and ``x' A^T``.

    The frozen base needs no weight gradient, so nothing beyond the inputs is saved. The rank-r product (with
    the bias and the scale) is written first and the base GEMM accumulates onto it in place (``addmm_``, BLAS
    beta=1), in forward for ``y`` and in backward for ``dx``: the LoRA term costs no pass over ``[T, out]`` of
    its own, no scale, add or copy (with a bias this replaces the copy of the bias that ``addmm`` starts with).

    The backward works in the rank-major layout: ``dxa^T = B^T dy^T`` (``[r, T]``) and ``dB^T = xa^T dy``
    (``[r, out]``). These are the same products as ``dy B`` and ``dy^T xa``, but with the long ``T`` or ``out``
    axis as the GEMM's output columns; CPU BLAS runs rank-8 GEMMs shaped that way 3-6x faster (measured with
    torch 2.13 / oneDNN on x86: ``dy B`` 0.68 ms vs ``B^T dy^T`` 0.23 ms for ``T=512, out=2304``).

    With dropout the LoRA branch reads ``x_lora`` (x after dropout, made outside by ``F.dropout``) and the
    backward returns its gradient separately; without, ``x_lora`` is None and ``dx`` is one accumulated GEMM.
    A backward that must itself be differentiable (``create_graph=True``) is the formula's, see `_differentiated`.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling: float, fan_in_fan_out: bool):
        out, _, _, xa = _fused_forward(x, x_lora, weight, bias, lora_a, lora_b, scaling, fan_in_fan_out)
        need_x_value = x_lora is None or ctx.needs_input_grad[2]  # the LoRA input, or a user unfroze the weight
        ctx.save_for_backward(x if need_x_value else None, x_lora, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.fan_in_fan_out, ctx.x_shape = scaling, fan_in_fan_out, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, x_lora, xa, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        w = weight.t() if ctx.fan_in_fan_out else weight  # [out, in]
        x2 = None if x is None else x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():  # create_graph=True: see `_differentiated`
            lora = functools.partial(_product_formula, scaling=ctx.scaling)
            lora_in, need_in = (x, need_x) if x_lora is None else (x_lora, need_xl)
            grad_in, grad_a, grad_b = _differentiated(lora, (lora_in, lora_a, lora_b), (need_in, need_a, need_b),
                                                      grad_out)
            grad_x = (dy @ w).view(ctx.x_shape) if need_x else None
            grad_xl = None
            if x_lora is None and need_x:
                grad_x = grad_x + grad_in
            elif x_lora is not None:
                grad_xl = grad_in
        else:
            xl2 = x2 if x_lora is None else x_lora.reshape(-1, x_lora.shape[-1])
            dxa_t, grad_a, grad_b = _lora_grads(dy, xl2, xa, lora_a, lora_b, ctx.scaling, need_a, need_b)
            grad_x = grad_xl = None
            if x_lora is None and need_x:
                grad_x = (dxa_t.t() @ lora_a).addmm_(dy, w).view(ctx.x_shape)
            elif need_x:
                grad_x = (dy @ w).view(ctx.x_shape)
            if need_xl:
                grad_xl = (dxa_t.t() @ lora_a).view(ctx.x_shape)
        grad_w = (x2.t() @ dy if ctx.fan_in_fan_out else dy.t() @ x2) if need_w else None
        grad_bias = dy.sum(0) if need_bias else None
        return grad_x, grad_xl, grad_w, grad_bias, grad_a, grad_b, None, None


class _LoRAProduct(torch.autograd.Function):
    """``s (x A^T) B^T`` alone, with `_LoRALinearFunction`'s rank-major backward: the LoRA branch of the
    general path (a 4-bit base, several adapters, mixed dtypes, DoRA with dropout or under autocast), whose base
    output comes apart."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()
        ctx.save_for_backward(x, xa, lora_a, lora_b)
        ctx.scaling = scaling
        return (xa @ (lora_b.t() * scaling)).view(*x.shape[:-1], lora_b.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, xa, lora_a, lora_b = ctx.saved_tensors
        if torch.is_grad_enabled():
            formula = functools.partial(_product_formula, scaling=ctx.scaling)
            return *_differentiated(formula, (x, lora_a, lora_b), ctx.needs_input_grad[:3], grad_out), None
        x2, dy = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        dxa_t, grad_a, grad_b = _lora_grads(dy, x2, xa, lora_a, lora_b, ctx.scaling, *ctx.needs_input_grad[1:3])
        grad_x = (dxa_t.t() @ lora_a).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, None


def _fused_forward(x, x_lora, weight, bias, lora_a, lora_b, scaling: float, fan_in_fan_out: bool):
    """`_LoRALinearFunction`'s arithmetic: the rank-r product with the bias and the scale first, the base GEMM
    accumulating onto it. Returns the output and, for a backward, ``x``, ``x_lora`` (as ``[T, in]``) and
    ``x_lora A^T``."""
    x2 = x.reshape(-1, x.shape[-1])
    xl2 = x2 if x_lora is None else x_lora.reshape(x2.shape)
    xa = xl2 @ lora_a.t()
    lora_bt = lora_b.t()
    out = torch.addmm(bias, xa, lora_bt, alpha=scaling) if bias is not None else xa @ (lora_bt * scaling)
    out.addmm_(x2, weight if fan_in_fan_out else weight.t())
    return out.view(*x.shape[:-1], out.shape[-1]), x2, xl2, xa


def _product_formula(x, lora_a, lora_b, scaling: float):
    """`_LoRAProduct`'s ``s (x A^T) B^T`` in plain differentiable ops."""
    return F.linear(F.linear(x, lora_a), lora_b) * scaling


def _differentiated(formula, inputs: tuple, needs: tuple, grad_out: torch.Tensor) -> tuple:
    """The gradients of ``formula(*inputs)`` (for the inputs that `needs` marks) as autograd's own ops, when a
    fused function's backward must itself be differentiable (``create_graph=True``: Hessian-vector products,
    gradient penalties): what the fused forward saved (``x A^T``) would be a constant there, and the second
    derivatives through it silently lost. (The base term's gradients are linear in ``dy``: written directly.)"""
    wanted = [t for t, need in zip(inputs, needs) if need]
    if not wanted:  # e.g. frozen adapters under a trainable base: only the base term has gradients
        return (None,) * len(needs)
    grads = iter(torch.autograd.grad(formula(*inputs), wanted, grad_out, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


def _lora_grads(dy, x2, xa, lora_a, lora_b, scaling: float, need_a: bool, need_b: bool):
    """``s dxa^T`` (``[r, T]``) and the gradients of A and B (or None), in the rank-major layout; `dy` is read
    by the two GEMMs back to back, while it is still in cache."""
    dxa_t = (lora_b.t() @ dy.t()).mul_(scaling)
    grad_b = (xa.t() @ dy).mul_(scaling).t().contiguous() if need_b else None
    grad_a = dxa_t @ x2 if need_a else None
    return dxa_t, grad_a, grad_b


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False, x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused LoRA linear: equal to ``F.linear(x, W, bias) + s * F.linear(F.linear(x_lora, A), B)``.

    `weight` is ``[out, in]`` (``[in, out]`` when `fan_in_fan_out`), `lora_a` ``[r, in]``, `lora_b` ``[out, r]``;
    `x_lora` is the LoRA branch's input (`x` after dropout), None for `x` itself. With nothing to differentiate
    (``no_grad``, ``inference_mode``, frozen adapters) or under ``torch.func`` transforms the same arithmetic
    runs without the autograd function.
    """
    if _use_function(lora_a, lora_b, x, x_lora, weight, bias):
        return _LoRALinearFunction.apply(x, x_lora, weight, bias, lora_a, lora_b, scaling, fan_in_fan_out)
    return _fused_forward(x, x_lora, weight, bias, lora_a, lora_b, scaling, fan_in_fan_out)[0]


def _lora_product(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s (x A^T) B^T``: `_LoRAProduct`, or without anything to differentiate the same product without it."""
    if _use_function(lora_a, lora_b, x):
        return _LoRAProduct.apply(x, lora_a, lora_b, scaling)
    return (x @ lora_a.t()) @ (lora_b.t() * scaling)  # the function's GEMMs; matmul folds x's leading dims


def _scale_outputs(u: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``u * g + bias``: `_ScaleOutputs`, or without anything to differentiate the same arithmetic without it."""
    if _use_function(g, u, bias):
        return _ScaleOutputs.apply(u, g, bias)
    return torch.addcmul(bias, u, g) if bias is not None else u * g


def _use_function(*tensors: torch.Tensor | None) -> bool:
    """Whether to run the fused autograd function: when autograd must see this call, outside ``torch.func``
    transforms. Otherwise the same arithmetic runs in plain ops: without anything to differentiate (``no_grad``,
    ``inference_mode``, frozen adapters: inference and evaluation) that saves ``autograd.Function.apply``, about
    8 us per call, most of a small layer's cost; under ``torch.func.grad`` / ``vmap`` (per-sample gradients)
    functorch differentiates and batches the plain ops itself. Pass the adapters first: in training the
    requires_grad check stops there."""
    return (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
            and not torch._C._are_functorch_transforms_active())


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` does more than its forward: hooks registered on it (most often before injection:
    activation capture, steering, pruning masks) or a forward replaced on the instance (accelerate's device
    hooks). The fused path reads the weight without calling the module and would skip them; PEFT calls it."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks) or "forward" in module.__dict__


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in fp32 at least: low-precision adapters merge in fp32, fp64 ones stay fp64."""
    return _cast(t, torch.promote_types(t.dtype, torch.float32))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without its dispatch when `t` already has that dtype (forward runs this ~7x per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


class _ScaleOutputs(torch.autograd.Function):
    """``h = u * g + bias`` (g per output feature) for DoRA, with one pass over ``[T, out]`` per gradient:
    ``du = dy * g``, ``dg = sum_t dy * u`` (autograd's addcmul backward makes two multiplies for each)."""

    @staticmethod
    def forward(ctx, u, g, bias):
        ctx.save_for_backward(u, g)
        ctx.has_bias = bias is not None
        return _scale_outputs(u, g, bias)  # autograd is off in here: the arithmetic alone

    @staticmethod
    def backward(ctx, grad_out):
        u, g = ctx.saved_tensors
        need_u, need_g, need_bias = ctx.needs_input_grad
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        grad_u = grad_out * g if need_u else None
        grad_g = torch.linalg.vecdot(dy, u.reshape(dy.shape), dim=0) if need_g else None
        grad_bias = dy.sum(0) if need_bias and ctx.has_bias else None
        return grad_u, grad_g, grad_bias


def lora_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that can wrap `module`, or None if it cannot be wrapped (an unsupported type, or a
    grouped or non-zero-padding convolution)."""
    if isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D)):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoRAConv if module.groups == 1 and module.padding_mode == "zeros" else None
    return None
