"""Adapter arithmetic: one new LoRA adapter from several trained on the same base.

Input ``i`` adapts module ``m`` by ``dW_i = s_i B_i A_i`` (A_i ``[r_i, in]``, B_i ``[out, r_i]``, ``s_i`` its
``alpha / r`` or rsLoRA scaling). The result always stores scaling 1 (``lora_alpha = r``, no rsLoRA) with each
input's ``w_i * s_i`` folded into B, so it loads anywhere PEFT's format loads. For each module:

``cat`` (exact):     A = [A_1; A_2; ...],  B = [w_1 s_1 B_1, w_2 s_2 B_2, ...],  rank sum_i r_i,
                     so B A = sum_i w_i dW_i exactly.
``svd`` (rank r):    the best rank-r approximation of dW = sum_i w_i dW_i (Eckart-Young). With B, A from
                     ``cat``, thin QRs B = Q_B R_B and A^T = Q_A R_A give dW = Q_B (R_B R_A^T) Q_A^T, so only the
                     small core [R, R] is decomposed, never a dense [out, in] matrix. Factors are balanced,
                     B = U_r S_r^1/2 and A = S_r^1/2 V_r^T; the discarded energy sum_{k>r} sigma_k^2 / sum_k sigma_k^2
                     is the squared relative Frobenius error, reported per module and overall. A module
                     whose combined rank (sum_i r_i, or its smaller dimension) is below r keeps it: exact.
``linear`` (same r): A = sum_i w_i A_i, B = sum_i w_i s_i B_i, the weighted average of the factors. This is
                     NOT the weighted sum of deltas: B A = sum_i sum_j w_i w_j s_i B_i A_j, whose cross terms
                     only mean something when the adapters share A's basis (e.g. fine-tuned from one init).
                     Averaging copies of one adapter with weights summing to 1 gives that adapter back.

Inputs must adapt the same modules of the same base (same paths and shapes); DoRA adapters and adapters that
carry modules_to_save or biases are refused (those are replacements, not low-rank deltas). The full base weight
PEFT saves beside a targeted embedding layer is the base itself: carried over, the inputs agreeing on it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, LoRAConfig
from .inject import adapter_configs
from .io import (
    META,
    PREFIX,
    AdapterError,
    AdapterInfo,
    adapter_state_dict,
    architecture,
    fingerprint,
    module_keys,
    read_tensors,
    validate_adapter,
    write_adapter,
)

METHODS = ("linear", "cat", "svd")
_BASE_WEIGHT = ".base_layer.weight"


@dataclass
class AdapterState:
    """An adapter in memory: its config and tensors under PEFT's keys, as `io` reads and writes them."""

    config: LoRAConfig
    tensors: dict[str, torch.Tensor]
    fingerprint: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"

    @classmethod
    def load(cls, directory: str | os.PathLike) -> AdapterState:
        """Read a PEFT-format adapter folder (validated, safetensors only)."""
        info = validate_adapter(directory)
        arch = info.metadata.get(META + "architecture")
        return cls(info.config, read_tensors(directory), info.metadata.get(META + "fingerprint"),
                   {"architecture": arch} if arch else {}, source=str(directory))

    @classmethod
    def from_model(cls, model: nn.Module, adapter_name: str = "default") -> AdapterState:
        """A copy of adapter `adapter_name` as injected into `model`."""
        tensors = {k: v.clone() for k, v in adapter_state_dict(model, adapter_name).items()}
        arch = architecture(model)
        return cls(adapter_configs(model)[adapter_name], tensors, fingerprint(model, adapter_name),
                   {"architecture": arch} if arch else {}, source=f"<model adapter {adapter_name!r}>")

    def factor_keys(self) -> dict[str, tuple[str, str]]:
        """``{module path: (key of A, key of B)}`` (``lora_A``/``lora_B``, or the embedding pair)."""
        return {path: (kinds.get("lora_A") or kinds["lora_embedding_A"], kinds.get("lora_B") or kinds["lora_embedding_B"])
                for path, kinds in module_keys(self.tensors).items()}

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{module path: (A, B, scaling)}`` with A ``[r, in...]`` and B ``[out, r, ...]`` as stored."""
        return {path: (self.tensors[a], self.tensors[b], self.config.scaling(path))
                for path, (a, b) in self.factor_keys().items()}

    def delta(self, path: str) -> torch.Tensor:
        """``s B A`` of module `path` as a matrix ``[out, in * kernel]`` (float64): the update in A/B layout."""
        a, b, s = self.factors()[path]
        return s * _matrix_b(b) @ _matrix_a(a)

    def save(self, directory: str | os.PathLike, card: str | None = None) -> Path:
        """Write it in PEFT's format (`io.write_adapter`); returns the folder."""
        return write_adapter(directory, self.tensors, self.config, self.fingerprint, self.metadata, card)


@dataclass
class CombinedAdapter(AdapterState):
    """The result of `combine`: an adapter plus, for ``svd``, the energy fraction its truncation discarded
    per module (``discarded_energy``) and over all modules (``total_discarded_energy``); 0 for exact methods."""

    discarded_energy: dict[str, float] = field(default_factory=dict)
    total_discarded_energy: float = 0.0


AdapterLike = str | os.PathLike | AdapterInfo | AdapterState


def as_adapter_state(adapter: AdapterLike) -> AdapterState:
    """An `AdapterState` from a folder path, an `AdapterInfo` (its folder) or an `AdapterState` (as is)."""
    if isinstance(adapter, AdapterState):
        return adapter
    if not isinstance(adapter, (str, os.PathLike, AdapterInfo)):
        raise TypeError(f"an adapter is a folder, an AdapterInfo or an AdapterState, got {type(adapter).__name__}"
                        + (": for a model's adapter pass AdapterState.from_model(model, adapter_name)"
                           if isinstance(adapter, nn.Module) else ""))
    return AdapterState.load(adapter.path if isinstance(adapter, AdapterInfo) else adapter)


def combine(
    adapters: Sequence[AdapterLike],
    weights: Sequence[float],
    method: str = "cat",
    r: int | None = None,
) -> CombinedAdapter:
    """One adapter from `adapters` (folders, `AdapterInfo` or `AdapterState`, all on the same base), each
    weighted by the matching entry of `weights`; see the module docstring for each method's exact math.

    The default, ``cat``, is the one method that is exact for any ranks. `r` (``svd`` only) is the output
    rank, default the largest input rank. Raises ConfigError for bad arguments and AdapterError for
    adapters that cannot be combined, naming the adapter or module.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    states = [as_adapter_state(a) for a in adapters]
    weights = _check_weights(weights, len(states))
    if r is not None and method != "svd":
        raise ConfigError(f"r applies to method='svd' only; method={method!r} fixes the rank itself")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ConfigError(f"r must be a positive integer, got {r!r}")
    factors, keys = _check_compatible(states), states[0].factor_keys()
    tensors, ranks, energy = _base_weights(states), {}, {}
    discarded = total = 0.0
    for path, per_input in factors.items():
        a_key, b_key = keys[path]
        a_shape, b_shape = per_input[0][0].shape[1:], per_input[0][1].shape[2:]
        if method == "linear":
            a, b = _linear(path, per_input, weights)
        else:
            a, b = _cat(per_input, weights)
            if method == "svd":
                a, b, sigma = _truncate(a, b, r or max(f[0].shape[0] for f in per_input))
                kept, all_ = sigma[: a.shape[0]].square().sum().item(), sigma.square().sum().item()
                energy[path] = (all_ - kept) / all_ if all_ > 0 else 0.0
                discarded, total = discarded + all_ - kept, total + all_
        dtype = torch.promote_types(per_input[0][0].dtype, torch.float32)
        rank = a.shape[0]
        tensors[a_key] = a.reshape(rank, *a_shape).to(dtype).contiguous()
        tensors[b_key] = b.reshape(b.shape[0], rank, *b_shape).to(dtype).contiguous()
        ranks[path] = rank
    config = _output_config(states, ranks)
    total_energy = discarded / total if total > 0 else 0.0
    metadata = {"combine": json.dumps({"method": method, "weights": weights, "r": r,
                                       "sources": [s.source for s in states]}),
                "discarded_energy": f"{total_energy:.6g}"}
    # same paths and shapes (checked above) make the same layer fingerprint: carry it over, and the class the
    # inputs were trained on when they agree (the card's usage snippet and `merge` read it)
    fingerprints = {s.fingerprint for s in states} - {None}
    architectures = {s.metadata.get("architecture") for s in states}
    if len(architectures) == 1 and None not in architectures:
        metadata["architecture"] = architectures.pop()
    return CombinedAdapter(config, tensors, next(iter(fingerprints), None), metadata,
                           source=f"<{method} combination>", discarded_energy=energy,
                           total_discarded_energy=total_energy)


def _matrix_a(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1).double()


def _matrix_b(b: torch.Tensor) -> torch.Tensor:
    return b.reshape(b.shape[0], b.shape[1]).double()


def _cat(per_input, weights) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([_matrix_a(a) for a, _, _ in per_input], dim=0)
    b = torch.cat([w * s * _matrix_b(b) for w, (_, b, s) in zip(weights, per_input)], dim=1)
    return a, b


def _linear(path: str, per_input, weights) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = [a.shape[0] for a, _, _ in per_input]
    if len(set(ranks)) > 1:
        raise AdapterError(f"method='linear' averages the factors and needs the same rank everywhere, but module "
                           f"{path!r} has ranks {ranks}; use method='cat' (exact) or 'svd'")
    a = sum(w * _matrix_a(a) for w, (a, _, _) in zip(weights, per_input))
    b = sum(w * s * _matrix_b(b) for w, (_, b, s) in zip(weights, per_input))
    return a, b


def _truncate(a: torch.Tensor, b: torch.Tensor, r: int):
    """Rank-r factors of ``b @ a`` through QRs of the thin factors and the SVD of the small core (fewer when
    ``b @ a`` has rank below r: then they are exact)."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.t())
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.t())
    r = min(r, sigma.numel())
    root = sigma[:r].sqrt()
    return (root[:, None] * vh[:r]) @ q_a.t(), (q_b @ u[:, :r]) * root, sigma


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    if n == 0:
        raise ConfigError("combine needs at least one adapter")
    weights = list(weights)
    if len(weights) != n:
        raise ConfigError(f"got {len(weights)} weights for {n} adapters; give one weight per adapter")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    return [float(w) for w in weights]


def _check_compatible(states: list[AdapterState]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Per module, each input's (A, B, scaling); raises unless all inputs adapt the same layers alike."""
    first = states[0]
    for state in states:
        if state.config.use_dora:
            raise AdapterError(f"{state.source} is a DoRA adapter: its magnitude vector rescales W0 + dW column by "
                               f"column, so DoRA updates do not add; combine plain LoRA adapters only")
        lora = {k for kinds in module_keys(state.tensors).values() for k in kinds.values()}
        other = sorted(set(state.tensors) - lora - set(_base_weight_keys(state)))
        if other:
            raise AdapterError(f"{state.source} carries non-LoRA tensors {other[:3]} (modules_to_save or biases), "
                               f"which replace weights rather than add to them; they cannot be combined")
    bases = {s.config.base_model for s in states} - {None}
    if len(bases) > 1:
        raise AdapterError(f"the adapters were trained on different base models {sorted(bases)}; combine needs one base")
    all_factors = [s.factors() for s in states]
    for state, factors in zip(states[1:], all_factors[1:]):
        if set(factors) != set(all_factors[0]):
            only_first = sorted(set(all_factors[0]) - set(factors))
            only_this = sorted(set(factors) - set(all_factors[0]))
            raise AdapterError(f"{first.source} and {state.source} target different modules (only in the first: "
                               f"{only_first[:3]}, only in the second: {only_this[:3]}); combine needs the same targets")
    out = {}
    for path in all_factors[0]:
        per_input = [f[path] for f in all_factors]
        shapes = {(tuple(a.shape[1:]), b.shape[0], tuple(b.shape[2:])) for a, b, _ in per_input}
        if len(shapes) > 1:
            raise AdapterError(f"module {path!r} has different input/output shapes across the adapters "
                               f"({sorted(shapes)}): they were trained on different base models")
        out[path] = per_input
    return out


def _base_weight_keys(state: AdapterState) -> list[str]:
    """Keys of the full base weights PEFT saves beside the factors of a targeted embedding layer or output head
    (``<path>.base_layer.weight``, its default ``save_embedding_layers="auto"``)."""
    return [key for key in state.tensors if key.endswith(_BASE_WEIGHT)
            and key[len(PREFIX):-len(_BASE_WEIGHT)] in state.factor_keys()]


def _base_weights(states: list[AdapterState]) -> dict[str, torch.Tensor]:
    """The base weights the inputs carry (`_base_weight_keys`), for the result to carry too: the base itself, not
    an update, so inputs that carry one must agree on it."""
    out = {}
    for state in states:
        for key in _base_weight_keys(state):
            tensor = state.tensors[key]
            if key in out and not torch.equal(out[key], tensor):
                raise AdapterError(f"{state.source} carries another {key} than an earlier input (a different base, "
                                   f"or a resized vocabulary); combine needs one base")
            out[key] = tensor
    return out


def _output_config(states: list[AdapterState], ranks: dict[str, int]) -> LoRAConfig:
    """The first input's config with the new ranks and scaling 1 everywhere (``alpha = r`` per module)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {_whole_path(path): k for path, k in ranks.items() if k != r}
    base = next((s.config.base_model for s in states if s.config.base_model), None)
    return states[0].config.replace(r=r, alpha=float(r), use_rslora=False, rank_pattern=pattern,
                                    alpha_pattern={p: float(k) for p, k in pattern.items()}, base_model=base)


def _whole_path(path: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key for module `path` alone. PEFT reads a key as a regex for a
    dotted suffix of the path (`config._pattern_lookup`), so the bare path ``fc`` would also set ``enc.fc``;
    ``^`` anchors it at the start of the path."""
    return "^" + re.escape(path)
