"""Trainable-parameter counts of an adapted model, and their rich table."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import LoRALayer


@dataclass
class LoRASummary:
    """Parameter counts after injection.

    ``by_type`` maps each adapted base-layer type (``Linear``, ``Conv1D``, ...) to ``(layers, trainable,
    total)``; parameters that train outside LoRA layers (``modules_to_save``, biases) are under ``"other"``.
    """

    trainable: int
    total: int
    by_type: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def metrics(self) -> dict[str, float]:
        """Figures for loggers: ``lora/trainable_params``, ``lora/total_params``, ``lora/trainable_ratio``."""
        return {
            "lora/trainable_params": self.trainable,
            "lora/total_params": self.total,
            "lora/trainable_ratio": self.ratio,
        }

    def table(self, title: str = "LoRA: trainable parameters"):
        """A `rich.table.Table`, one row per adapted module type, then the total."""
        from rich.table import Table

        table = Table(title=title)
        for name, justify in (("module type", "left"), ("layers", "right"), ("trainable", "right"),
                              ("total", "right"), ("%", "right")):
            table.add_column(name, justify=justify)
        for kind, (layers, trainable, total) in self.by_type.items():
            table.add_row(kind, str(layers), f"{trainable:,}", f"{total:,}", _pct(trainable, total))
        table.add_section()
        table.add_row("all parameters", "", f"{self.trainable:,}", f"{self.total:,}",
                      _pct(self.trainable, self.total), style="bold")
        return table

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} / {self.total:,} ({100 * self.ratio:.2f} %)"


def summarize(model: nn.Module) -> LoRASummary:
    """Count `model`'s parameters (shared ones once), grouped by adapted layer type."""
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoRALayer):
            row = by_type[type(module.base_layer).__name__]
            row[0] += 1
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    row[1] += _count(p) if p.requires_grad else 0
                    row[2] += _count(p)
    trainable = total = 0
    other = 0
    for p in model.parameters():
        total += _count(p)
        if p.requires_grad:
            trainable += _count(p)
            if id(p) not in seen:
                other += _count(p)
    result = {k: tuple(v) for k, v in by_type.items()}
    if other:
        result["other (modules_to_save, biases)"] = (0, other, other)
    return LoRASummary(trainable, total, result)


def _count(p: torch.Tensor) -> int:
    """Logical element count: bitsandbytes' 4-bit weights are packed two to a byte, their shape in
    ``quant_state``."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}" if whole else "-"
