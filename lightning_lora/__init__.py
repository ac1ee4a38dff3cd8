"""lightning-lora: LoRA fine-tuning as a PyTorch Lightning callback, with adapters in PEFT's format."""

__version__ = "0.1.0"

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
from .summary import LoRASummary, summarize

__all__ = [
    "AdapterError", "AdapterInfo", "ConfigError", "LoRAConfig", "LoRAConv", "LoRAEmbedding", "LoRALayer",
    "LoRALinear", "LoRASummary", "delete_adapter", "disable_adapters", "inject", "load_adapter", "lora_layers",
    "lora_linear", "merge", "save_adapter", "set_adapter", "summarize", "unload", "unmerge", "validate_adapter",
]
