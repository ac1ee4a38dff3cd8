"""QLoRA's frozen 4-bit base (Dettmers et al. 2023) behind one small interface, with two backends.

NF4 stores each block of 64 weights as 4-bit indices into the 16 quantiles of N(0, 1) scaled to [-1, 1],
times the block's absmax; the absmaxes are quantized again to 8 bits in blocks of 256 ("double
quantization"), so a weight costs about 4.13 bits: ~7.7x smaller than fp32. LoRA on top trains in full
precision; the base computes ``x W^T`` by dequantizing W to ``compute_dtype`` on the fly.

The interface (every function takes the 4-bit module, whatever its backend):

- `quantize(linear, backend, compute_dtype)`: a frozen 4-bit copy of an ``nn.Linear`` (or GPT-2 ``Conv1D``);
- `dequantize(module)`: its weight as a dense ``[out, in]`` tensor in the compute dtype;
- `linear(module, x)`: ``x W^T + bias``;
- `dequantize_module(module)`: the 4-bit layer as a dense ``nn.Linear`` in its `dense_dtype`.

Backends: ``"bnb"`` is bitsandbytes' ``Linear4bit`` (also what transformers' ``BitsAndBytesConfig(
load_in_4bit=True)`` loads, so such models are wrapped as they are); ``"torchao"`` is `NF4Linear`, an
``nn.Linear`` whose weight is a torchao ``NF4Tensor``. On CPUs with AVX512-BF16, bitsandbytes repacks a
``Linear4bit``'s weight in place at its first eval-mode forward (bf16 absmax), which a later dequantize then
reads wrongly; we switch that repacking off for the layers we adapt and undo it where it already happened.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

from .config import ConfigError, LoRAConfig

BACKENDS = ("bnb", "torchao")
_BLOCK = 64  # weights per absmax (both backends)
_SCALER_BLOCK = 256  # absmaxes per second-level scale


def available_backends() -> list[str]:
    """The installed backends, in order of preference."""
    out = []
    for name, module in (("bnb", "bitsandbytes"), ("torchao", "torchao")):
        try:
            __import__(module)
        except ImportError:
            continue
        out.append(name)
    return out


def resolve_backend(backend: str | None) -> str:
    """`backend`, or the first installed one when None; ConfigError with the install hint if missing."""
    installed = available_backends()
    if backend is None and installed:
        return installed[0]
    if backend in installed:
        return backend
    wanted = backend or "bnb or torchao"
    raise ConfigError(f"quantize='nf4' needs the {wanted} backend, which is not installed; "
                      f"pip install 'lightning-lora[{backend or 'bnb'}]'")


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is a torchao ``NF4Tensor`` (the ``"torchao"`` backend).

    It subclasses ``nn.Linear`` (without allocating a dense weight) so target matching treats it as one.
    """

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a 4-bit layer of either backend."""
    return isinstance(module, NF4Linear) or _is_bnb(module)


def quantize(linear_layer: nn.Module, backend: str, compute_dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A frozen NF4 copy of `linear_layer` (``nn.Linear`` or ``Conv1D``); its bias object is kept as is."""
    problem = _unquantizable(linear_layer, backend)
    if problem:
        raise ValueError(f"cannot quantize this {type(linear_layer).__name__} with {backend}: {problem}")
    weight = _out_in(linear_layer).to(compute_dtype).contiguous()
    bias = linear_layer.bias
    if backend == "torchao":
        module = NF4Linear(_to_nf4(weight), bias, compute_dtype)
    else:
        module = _bnb_linear4bit(weight, bias, compute_dtype)
    module.dense_dtype = linear_layer.weight.dtype
    module.from_conv1d = not isinstance(linear_layer, nn.Linear)
    return module


def _bnb_linear4bit(weight: torch.Tensor, bias: nn.Parameter | None, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    module = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                               compress_statistics=True, quant_type="nf4", device="meta")
    module.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                      module=module).to(weight.device)
    module.bias = bias
    keep_unpacked(module)
    return module


def dequantize(module: nn.Module) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a 4-bit `module`, in its compute dtype."""
    if isinstance(module, NF4Linear):
        return module.weight.get_original_weight()
    import bitsandbytes.functional as bnbf

    param = module.weight
    if getattr(param.quant_state, "packing_format_for_cpu", False):  # bnb's eval-time CPU repacking
        param.data, param.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(param.data, param.quant_state)
    return bnbf.dequantize_4bit(param.data, param.quant_state).to(_compute_dtype(module))


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + bias`` with the 4-bit weight, computed in the module's compute dtype, returned in x's."""
    if not isinstance(module, NF4Linear):
        return module(x)
    dtype = module.compute_dtype
    out = _torchao_nf4()[1](x.to(dtype), module.weight)
    if module.bias is not None:
        out = out + module.bias.to(dtype)
    return out.to(x.dtype)


def dequantize_module(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """`module` as a dense ``nn.Linear`` (in `dense_dtype` unless `dtype`; the bias object is kept): what
    merging a LoRA layer does to its 4-bit base."""
    weight = dequantize(module)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    dense.weight = nn.Parameter(weight, requires_grad=False)
    dense.bias = module.bias
    dense.from_conv1d = getattr(module, "from_conv1d", False)
    return dense.to(dtype or dense_dtype(module))


def original_class(dense: nn.Module) -> nn.Module:
    """A layer `dequantize_module` made from a GPT-2 ``Conv1D`` as a ``Conv1D`` again (weight stored
    ``[in, out]``, same bias object), so that an unloaded model saves and loads as its transformers class;
    any other layer as it is."""
    if not getattr(dense, "from_conv1d", False):
        return dense
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        layer = Conv1D(dense.out_features, dense.in_features)
    layer.weight = nn.Parameter(dense.weight.detach().t().contiguous(), requires_grad=dense.weight.requires_grad)
    layer.bias = dense.bias
    return layer


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the dense weight a 4-bit `module` was quantized from: that of the activations it takes and
    returns, so a dense layer in it fits the model, whatever the compute dtype (an fp32 model computing its
    4-bit layers in bf16 stays fp32). A layer transformers loaded in 4-bit: the dtype bitsandbytes quantized
    (kept aside by its CPU repacking, which sets bf16)."""
    recorded = getattr(module, "dense_dtype", None)
    if recorded is not None:
        return recorded
    if isinstance(module, NF4Linear):
        return module.compute_dtype
    state = module.weight.quant_state
    return state.original_dtype if getattr(state, "packing_format_for_cpu", False) else state.dtype


def quantize_model(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Quantize `config`'s targets of `model` to NF4 without adding an adapter, so that an adapter trained
    with QLoRA can then be loaded with `load_adapter`. Returns the paths quantized."""
    from .inject import find_targets

    targets = find_targets(model, config)
    quantize_targets(model, targets, config)
    return targets


def unload_quantized(model: nn.Module, requantize: bool = False) -> dict[str, float]:
    """`inject.unload` for a QLoRA model: each 4-bit base is dequantized to fp32, the adapter merged into it
    exactly, and the result exported in the layer's `dense_dtype` and original class (``nn.Linear`` or GPT-2's
    ``Conv1D``: the model saves and loads as its transformers class), or as 4-bit again with `requantize`.

    Returns, per adapted 4-bit layer, the relative error of the exported weight against the unmerged model's
    effective weight ``W = dequantize(W0) + delta`` (DoRA: its merged form): ``||W_out - W||_F / ||W||_F``,
    the rounding to that dtype, or the NF4 error of re-quantizing ``W``.
    """
    from .inject import _replace, lora_layers, unload

    plan = {}
    for path, layer in lora_layers(model):
        if is_quantized(layer.base_layer):
            base = layer.base_layer
            plan[path] = (backend_of(base), _compute_dtype(base), dense_dtype(base))
            layer.base_layer = dequantize_module(layer.base_layer, torch.float32)
    unload(model)
    errors = {}
    for path, (backend, compute_dtype, dtype) in plan.items():
        dense = model.get_submodule(path)
        exact = _out_in(dense).clone()
        out = quantize(dense, backend, compute_dtype) if requantize else dense.to(dtype)
        got = dequantize(out) if requantize else _out_in(out)
        errors[path] = float((got.float() - exact).norm() / exact.norm().clamp_min(1e-30))
        _replace(model, path, out)
    return errors


def _out_in(layer: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (which stores ``[in, out]``)."""
    weight = layer.weight.detach()
    return weight if isinstance(layer, nn.Linear) else weight.t()


def keep_unpacked(module: nn.Module) -> None:
    """Switch off bitsandbytes' eval-time CPU repacking of a 4-bit weight (see the module doc)."""
    if _is_bnb(module):
        module.support_avx512bf16_for_cpu = False


def backend_of(module: nn.Module) -> str:
    return "torchao" if isinstance(module, NF4Linear) else "bnb"


def weight_nbytes(module: nn.Module) -> int:
    """Bytes held by the weight of `module` (a 4-bit one: packed data plus its quantization state)."""
    if isinstance(module, NF4Linear):
        nf4 = module.weight
        return sum(getattr(nf4, name).nbytes for name in nf4.__tensor_flatten__()[0])
    if _is_bnb(module):
        state = module.weight.quant_state.as_dict(packed=True)
        return module.weight.data.nbytes + sum(t.nbytes for t in state.values() if isinstance(t, torch.Tensor))
    return module.weight.nbytes


def quantize_targets(model: nn.Module, targets: Iterable[str], config: LoRAConfig) -> None:
    """Replace each target of `model` (in place) by its NF4 version (``config.quant_backend``,
    ``config.compute_dtype``). Layers already in 4-bit (e.g. loaded with ``BitsAndBytesConfig``) are kept.
    All-or-nothing: every target is checked before the first is replaced (quantizing rounds irreversibly)."""
    from .inject import _replace

    backend = resolve_backend(config.quant_backend)
    dtype = getattr(torch, config.compute_dtype)
    to_quantize = []
    for path in targets:
        module = model.get_submodule(path)
        if is_quantized(module) or hasattr(module, "base_layer"):
            continue
        problem = _unquantizable(module, backend)
        if problem:
            raise ConfigError(f"cannot quantize {path!r} with {backend}: {problem}")
        to_quantize.append(path)
    for path in to_quantize:  # paths, not modules: each dense layer is freed as soon as it is replaced
        _replace(model, path, quantize(model.get_submodule(path), backend, dtype))


def _torchao_nf4():
    """torchao's ``(to_nf4, linear_nf4)``; their module moved in torchao 0.18."""
    try:
        from torchao.quantization import to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
    except ImportError:  # torchao < 0.18
        from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
    return to_nf4, linear_nf4


def _to_nf4(weight: torch.Tensor) -> torch.Tensor:
    # Second-level blocks of 256 absmaxes, or the largest power of two dividing their count (tiny layers).
    blocks, scaler_block = weight.numel() // _BLOCK, _SCALER_BLOCK
    while blocks % scaler_block:
        scaler_block //= 2
    return _torchao_nf4()[0](weight, _BLOCK, scaler_block)


def _unquantizable(module: nn.Module, backend: str) -> str | None:
    """Why `quantize` cannot take `module` with `backend`, and what to do instead; None when it can."""
    if not isinstance(module, nn.Linear) and type(module).__name__ != "Conv1D":
        return (f"it is a {type(module).__name__} and NF4 applies to linear layers only; exclude it from "
                f"target_modules or set quantize=None")
    if backend == "torchao" and module.weight.numel() % _BLOCK:
        return (f"torchao NF4 needs a weight size divisible by {_BLOCK}, got {tuple(module.weight.shape)}; exclude "
                f"it (exclude_modules) or use quant_backend='bnb', which has no such limit")
    return None


def _is_bnb(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _compute_dtype(module: nn.Module) -> torch.dtype:
    if isinstance(module, NF4Linear):
        return module.compute_dtype
    return module.compute_dtype or module.weight.quant_state.dtype

