"""lightning-lora: LoRA fine-tuning as a PyTorch Lightning callback, with adapters in PEFT's format."""

__version__ = "0.1.0"

from .analysis import amplification_factors, compare_subspaces, subspace_similarity
from .card import render_card
from .combine import AdapterState, CombinedAdapter, combine
from .config import ConfigError, LoRAConfig
from .inject import (
    delete_adapter,
    disable_adapters,
    inject,
    lora_layers,
    merge,
    set_adapter,
    unload,
    unmerge,
)
from .io import AdapterError, AdapterInfo, load_adapter, save_adapter, validate_adapter
from .layers import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear, lora_linear
from .quant import quantize_model, unload_quantized
from .summary import LoRASummary, summarize

__all__ = [
    "AdapterError",
    "AdapterInfo",
    "AdapterState",
    "CombinedAdapter",
    "ConfigError",
    "LoRACallback",
    "LoRAConfig",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRASummary",
    "amplification_factors",
    "combine",
    "compare_subspaces",
    "delete_adapter",
    "disable_adapters",
    "inject",
    "load_adapter",
    "load_lora_checkpoint",
    "lora_layers",
    "lora_linear",
    "merge",
    "quantize_model",
    "render_card",
    "save_adapter",
    "set_adapter",
    "subspace_similarity",
    "summarize",
    "unload",
    "unload_quantized",
    "unmerge",
    "validate_adapter",
]


def __getattr__(name: str):
    # The Lightning callback imports lightning: load it on first use, so the engine and the hub stay light.
    if name in ("LoRACallback", "load_lora_checkpoint"):
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'lightning_lora' has no attribute {name!r}")
