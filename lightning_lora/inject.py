"""Putting LoRA into a model and taking it out: target resolution, wrapping, freezing, named adapters,
merge / unmerge / unload. The one place that decides which modules are targets.

The model is changed in place (no wrapper class around it), so a LightningModule, DDP and `torch.compile`
see an ordinary module tree. What was injected is recorded in ``model._lora_configs`` (name -> config).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import quant
from .config import (
    DEFAULT_TARGETS,
    PEFT_HEADS,
    ConfigError,
    LoRAConfig,
    checked_config,
    is_saved_module,
    matches,
)
from .layers import LoRALayer, LoRALinear, lora_class_for
from .summary import LoRASummary, summarize

_REGISTRY = "_lora_configs"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(path, layer)`` for every LoRA layer in `model`."""
    for path, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield path, module


def adapter_configs(model: nn.Module) -> dict[str, LoRAConfig]:
    """The adapters injected into `model`, name -> config (resolved targets), in injection order."""
    return getattr(model, _REGISTRY, {})


def resolve_config(model: nn.Module, config: LoRAConfig) -> LoRAConfig:
    """`config` with ``target_modules`` filled in from the model type's defaults when it is None."""
    if config.target_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"no default target_modules for model type {model_type!r}; set target_modules, e.g. to one of "
            f"{_candidate_names(model)[:12]} or 'all-linear'"
        )
    return config.replace(target_modules=list(DEFAULT_TARGETS[model_type]))


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Paths of the modules `config` adapts, in module order. Raises ConfigError, listing the model's
    candidate names, when nothing matches or a match cannot be adapted."""
    config = resolve_config(model, config)
    spec = config.target_modules
    all_linear = spec == "all-linear"
    head = output_head(model) if all_linear else None
    inside_lora = [p + "." for p, _ in lora_layers(model)]
    paths = [p for p, _ in model.named_modules()]
    saved = [p for p in paths if is_saved_module(config.modules_to_save, p)]
    # a typo guard; PEFT's task classes add head names whether the model has them or not (BART's head is another)
    unmatched = [n for n in config.modules_to_save or () if not any(is_saved_module([n], p) for p in paths)
                 and n not in PEFT_HEADS.get(config.task_type, ())]
    if unmatched:
        raise ConfigError(
            f"modules_to_save names {unmatched} match no module of {type(model).__name__} (a module is saved when "
            f"its path ends with a name); module names: {_leaf_names(model)[:40]}"
        )
    # modules_to_save are trained and saved whole, so nothing inside them is wrapped (as PEFT)
    skip = inside_lora + [p + "." for p in saved]
    bypassed = _bypassed_layers(model)
    targets, dropped = [], []  # dropped: matched, but excluded or part of modules_to_save
    for path, module in model.named_modules():
        if not path or any(path.startswith(p) for p in inside_lora):
            continue
        if all_linear:
            if module is head or path in bypassed or (lora_class_for(module) is not LoRALinear
                                                      and not isinstance(module, LoRALinear)):
                continue
        elif not matches(spec, path) or not config.in_layers(path):
            continue
        if path in saved or any(path.startswith(p) for p in skip) or matches(config.exclude_modules, path):
            dropped.append(path)
            continue
        if path in bypassed:
            raise ConfigError(
                f"target {path!r} is the out_proj of an nn.MultiheadAttention, which reads its weight without "
                f"calling it: LoRA there would never run (no gradients, and merging would change the output); "
                f"exclude it (exclude_modules)"
            )
        if not isinstance(module, LoRALayer) and lora_class_for(module) is None:
            inner = _candidate_names(module)[:8]
            raise ConfigError(
                f"target {path!r} is a {type(module).__name__}, which LoRA cannot wrap (supported: Linear, "
                f"Conv1D, Embedding, Conv1d/2d/3d with groups=1 and padding_mode='zeros'); exclude it "
                f"(exclude_modules)" + (f" or name its linear sub-layers instead, e.g. {inner}" if inner else "")
            )
        targets.append(path)
    if not targets and dropped:
        raise ConfigError(
            f"target_modules={spec!r} matches {len(dropped)} modules (e.g. {dropped[0]!r}), but exclude_modules="
            f"{config.exclude_modules!r} and modules_to_save={config.modules_to_save!r} (trained whole, never wrapped) "
            f"leave none of them to adapt; narrow those"
        )
    if not targets:
        raise ConfigError(
            f"target_modules={spec!r} matches no module of {type(model).__name__}; candidate names: "
            f"{_candidate_names(model)}{_regex_hint(model, spec)}"
        )
    return targets


def _bypassed_layers(model: nn.Module) -> set[str]:
    """Paths of linear layers whose parent uses their weight without calling them, so that a LoRA wrapper would
    never run: ``nn.MultiheadAttention``'s ``out_proj`` (its weight goes to ``F.multi_head_attention_forward``)."""
    return {f"{path}.out_proj".lstrip(".") for path, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention)}


def inject(
    model: nn.Module, config: LoRAConfig | None = None, adapter_name: str = "default", **fields
) -> LoRASummary:
    """Wrap `config`'s targets of `model` in LoRA layers (in place), make adapter `adapter_name` the active
    and only trainable one, and freeze everything else except ``modules_to_save`` and the ``bias`` mode.

    Pass a `LoRAConfig`, its fields as keyword arguments, or both (fields override). Injecting the same
    adapter again is a no-op; the same name with another config raises. Returns the parameter summary.
    """
    config = checked_config(config)
    config = resolve_config(model, config.replace(**fields) if fields else config)
    _check_name(adapter_name)
    registry = adapter_configs(model)
    if adapter_name in registry:
        if not same_adapter(model, registry[adapter_name], config):
            raise ConfigError(
                f"adapter {adapter_name!r} is already injected with a different config; delete_adapter it first "
                f"or choose another adapter_name"
            )
        return summarize(model)
    _check_beside(registry, config, adapter_name)
    targets = find_targets(model, config)
    _check_saved_not_tied(model, config)
    if config.target_modules == "all-linear":
        _warn_stacked_weights(model)
    meta = [path for path in targets if any(p.is_meta for p in model.get_submodule(path).parameters())]
    if meta:
        raise ConfigError(
            f"{meta[0]!r}{f' (and {len(meta) - 1} more)' if len(meta) > 1 else ''} has its weights on the meta "
            f"device: LoRA's A and B would be made there uninitialised, and materialising the model (to_empty + "
            f"reset_parameters) does not initialise them (B = 0 at the start); inject once the base weights are "
            f"real (materialised or loaded)"
        )
    if any(isinstance(m, LoRALayer) and m.merged_adapters for _, m in lora_layers(model)):
        raise RuntimeError("the model has merged adapters; unmerge(model) before injecting another adapter")
    if config.use_dora:
        _check_dora_targets(model, targets)
    if config.quantize:
        from .quant import quantize_targets  # optional backends, imported only when asked for

        quantize_targets(model, targets, config)
    fan_in_fan_out = False
    for path in targets:
        layer = _wrap(model, path)
        layer.add_adapter(adapter_name, config.rank_for(path), config.scaling(path), config.dropout, config.init,
                          use_dora=config.use_dora)
        fan_in_fan_out |= getattr(layer, "fan_in_fan_out", False)
    config = config.replace(fan_in_fan_out=fan_in_fan_out)
    if not hasattr(model, _REGISTRY):
        model._lora_configs = {}
    model._lora_configs[adapter_name] = config
    set_adapter(model, adapter_name)
    return summarize(model)


def _warn_stacked_weights(model: nn.Module) -> None:
    """Say which weights ``"all-linear"`` leaves frozen because they are not layers: mixture-of-experts models
    (transformers 5's Mixtral, Qwen-MoE, ...) hold every expert's projection in one stacked 3-D parameter
    ``[experts, out, in]``, which PEFT adapts through ``target_parameters`` and lightning-lora does not."""
    skip = [p + "." for p, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, LoRALayer))]
    stacked = [n for n, p in model.named_parameters()
               if p.dim() == 3 and p.shape[0] > 1 and not any(n.startswith(s) for s in skip)]
    if stacked:
        warnings.warn(
            f"all-linear adapts linear layers only; {len(stacked)} stacked 3-D weights stay frozen and untrained "
            f"({', '.join(stacked[:3])}{', ...' if len(stacked) > 3 else ''}: a mixture of experts' projections, "
            f"which PEFT reaches with target_parameters, not supported here)", stacklevel=3,
        )


def same_adapter(model: nn.Module, a: LoRAConfig, b: LoRAConfig) -> bool:
    """Whether configs `a` and `b` adapt `model` alike: the same layers with the same rank and scale, and the same
    DoRA, dropout, bias and modules_to_save. How they spell it (``"all-linear"`` or the matched names, pattern
    keys), the base model's name, the task type and how the base is stored (4-bit, ``fan_in_fan_out``) may differ."""
    targets = find_targets(model, a)
    if targets != find_targets(model, b):
        return False
    same = (a.use_dora, a.dropout, a.bias, a.modules_to_save or []) == (b.use_dora, b.dropout, b.bias,
                                                                         b.modules_to_save or [])
    return same and all((a.rank_for(p), a.scaling(p)) == (b.rank_for(p), b.scaling(p)) for p in targets)


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the active adapter: used in forward and the only one that trains. Raises while an
    adapter is merged (the merged one would stay in the weights)."""
    config = adapter_config(model, adapter_name)
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise RuntimeError("adapters are merged into the base weights; unmerge(model) before switching adapters")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.active_adapters = [adapter_name] if adapter_name in layer.lora_a else []
        if adapter_name in layer.lora_a:
            for param in layer.adapter_params(adapter_name):
                param.requires_grad_(True)
    for param in extra_trainable(model, config).values():
        param.requires_grad_(True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block, `model` computes the base model's output (the adapters are bypassed). Exception:
    ``modules_to_save`` and the biases that ``bias="all"`` / ``"lora_only"`` trains train in place (no copy is
    kept, as PEFT's biases), so inside the block they keep their trained values.
    Blocks nest: leaving an inner one keeps the outer one's adapters off. The switch belongs to the model, not
    to the thread (as PEFT's ``disable_adapter``): other threads running `model` meanwhile get the base output too."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        raise RuntimeError("adapters are merged into the base weights; unmerge(model) before disabling them")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before):
            layer.disabled = disabled


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name`; layers left with no adapter are replaced by their base layer. If it was
    the active adapter, the most recently injected remaining one becomes active."""
    adapter_config(model, adapter_name)
    was_active = any(adapter_name in layer.active_adapters for _, layer in lora_layers(model))
    for path, layer in list(lora_layers(model)):
        if adapter_name in layer.lora_a:
            layer.delete_adapter(adapter_name)
            if not layer.lora_a:
                _replace(model, path, layer.base_layer)
    del model._lora_configs[adapter_name]
    remaining = list(model._lora_configs)
    if remaining and was_active:
        set_adapter(model, remaining[-1])


def merge(model: nn.Module) -> None:
    """Fold the active adapter into the base weights, in place; forward then costs what the base costs.
    Raises if it is already merged (merging twice would add the update twice)."""
    _check_enabled(model)
    _check_not_shared(model)
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights (exact up to floating-point rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def unload(model: nn.Module) -> nn.Module:
    """The plain model: the active adapter merged into the base weights and every LoRA layer replaced by its
    original module, so it runs exactly as fast as the base. Changes `model` in place and returns it."""
    _check_enabled(model)
    _check_not_shared(model)
    for path, layer in list(lora_layers(model)):
        if not layer.merged_adapters:
            layer.merge()
        _replace(model, path, quant.original_class(layer.base_layer))
    if hasattr(model, _REGISTRY):
        del model._lora_configs
    return model


def extra_trainable(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Parameter]:
    """Parameters that train beside A and B, by name: ``modules_to_save`` and the ``bias`` mode's biases."""
    lora_paths = {path for path, _ in lora_layers(model)}
    out = {}
    for path, module in model.named_modules():
        prefix = path + "." if path else ""
        if is_saved_module(config.modules_to_save, path):
            out.update({prefix + n: p for n, p in module.named_parameters()})
        bias = module._parameters.get("bias")
        if bias is None:
            continue
        owner = path.removesuffix(".base_layer")
        if config.bias == "all" or (config.bias == "lora_only" and owner != path and owner in lora_paths):
            out[prefix + "bias"] = bias
    return out


def extra_buffers(model: nn.Module, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The persistent buffers of ``modules_to_save`` by name (a BatchNorm's running statistics): PEFT saves
    those modules' whole state_dict, so the adapter carries them beside their parameters."""
    out = {}
    for path, module in model.named_modules():
        if is_saved_module(config.modules_to_save, path):
            for sub_path, sub in module.named_modules(prefix=path):
                out.update({f"{sub_path}.{n}": b for n, b in sub._buffers.items()
                            if b is not None and n not in sub._non_persistent_buffers_set})
    return out


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter of `model`, by the parameter's id (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    return owners


def _check_saved_not_tied(model: nn.Module, config: LoRAConfig) -> None:
    """Refuse a module to save whose weight another module shares (GPT-2's ``lm_head`` and ``wte``): training it
    changes both, but the adapter would carry it under one name only, so PEFT would load it wrong."""
    if not config.modules_to_save:
        return
    owners = _owners(model)
    for path, module in model.named_modules():
        if not is_saved_module(config.modules_to_save, path):
            continue
        for name, param in module.named_parameters():
            others = [o for o in owners[id(param)] if not o.startswith(path + ".")]
            if others:
                raise ConfigError(
                    f"modules_to_save {path!r}: {path}.{name} is the same tensor as {', '.join(others)} (tied "
                    f"weights); training it would change both while the adapter saves one, so PEFT and "
                    f"transformers would load it wrong. Leave {path!r} out, or untie the weights first"
                )


def _check_enabled(model: nn.Module) -> None:
    """Refuse to fold adapters into the weights inside a `disable_adapters` block: the block would then compute
    the adapted output where it promises the base model's (PEFT's disabled forward unmerges instead)."""
    if any(layer.disabled for _, layer in lora_layers(model)):
        raise RuntimeError("adapters are disabled (inside a disable_adapters block); merge or unload after the block")


def _check_not_shared(model: nn.Module) -> None:
    """Refuse to fold an update into a weight another module shares (tied embeddings): it would change both."""
    owners = _owners(model)
    for path, layer in lora_layers(model):
        names = owners.get(id(layer.weight), [])
        if len(names) > 1 and layer.active_adapters and not layer.merged_adapters:
            raise RuntimeError(
                f"{path}.base_layer.weight is shared with {', '.join(n for n in names if not n.startswith(path + '.'))}"
                f" (tied weights); merging would change both. Keep the adapter unmerged, or untie the weights first"
            )


def _wrap(model: nn.Module, path: str) -> LoRALayer:
    module = model.get_submodule(path)
    if isinstance(module, LoRALayer):
        return module
    layer = lora_class_for(module)(module)
    _avoid_fused_encoder(model, path, layer)
    _replace(model, path, layer)
    return layer


def _avoid_fused_encoder(model: nn.Module, path: str, layer: LoRALayer) -> None:
    """Keep torch's fused encoder kernels from skipping `layer`, to be put at `path`. In inference (eval mode,
    frozen weights) ``nn.TransformerEncoderLayer`` runs one kernel that reads ``linear1.weight`` and
    ``linear2.weight`` without calling the modules, so their adapters would silently do nothing. A forward
    pre-hook on a submodule is one of torch's conditions against that path (it goes with the wrapper at
    `unload`, when the merged weights suit the kernel again); ``nn.TransformerEncoder`` would also turn padded
    batches into nested tensors for that kernel, which ``use_nested_tensor=False`` stops."""
    parts = path.split(".")
    ancestors = [model, *(model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts)))]
    if isinstance(ancestors[-1], nn.TransformerEncoderLayer):
        layer.register_forward_pre_hook(_no_op)
    for module in ancestors:
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def _no_op(module: nn.Module, args: tuple) -> None:
    """The forward pre-hook of `_avoid_fused_encoder` (module-level, so the model still pickles)."""


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def adapter_config(model: nn.Module, adapter_name: str) -> LoRAConfig:
    """The config of adapter `adapter_name` of `model`; KeyError naming the adapters it has, if any."""
    registry = adapter_configs(model)
    if adapter_name not in registry:
        has = f"has {list(registry)}" if registry else "has none: inject(model, config) or load_adapter(model, dir) first"
        raise KeyError(f"no adapter named {adapter_name!r}; the model {has}")
    return registry[adapter_name]


def _check_beside(registry: dict[str, LoRAConfig], config: LoRAConfig, adapter_name: str) -> None:
    """Refuse a second named adapter when either side trains modules_to_save or biases: those live in the model
    itself, shared by every adapter, so one adapter's would silently overwrite the other's."""
    own = [name for name, c in registry.items() if c.modules_to_save or c.bias != "none"]
    if registry and (config.modules_to_save or config.bias != "none" or own):
        holder = f"adapter {own[0]!r}" if own else f"adapter {adapter_name!r}"
        raise ConfigError(
            f"cannot add adapter {adapter_name!r} beside {list(registry)}: {holder} trains modules_to_save or "
            f"biases, which are the model's own modules and would be shared by every named adapter; use a "
            f"separate copy of the model per adapter, or bias='none' and no modules_to_save"
        )


def _check_dora_targets(model: nn.Module, targets: list[str]) -> None:
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, LoRALinear) and lora_class_for(module) is not LoRALinear:
            raise ConfigError(f"use_dora=True supports Linear and Conv1D targets only, but {path!r} is a "
                              f"{type(module).__name__}; exclude it (exclude_modules) or set use_dora=False")


def _check_name(adapter_name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}", adapter_name or ""):
        raise ConfigError(
            f"adapter_name {adapter_name!r} must be 1-64 letters, digits, '_' or '-' (it names a folder and a key)"
        )


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (transformers' ``get_output_embeddings``), or None."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _leaf_names(model: nn.Module) -> list[str]:
    """Distinct last segments of `model`'s module paths, for error messages."""
    return sorted({p.rsplit(".", 1)[-1] for p, _ in model.named_modules() if p})


def _candidate_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the modules LoRA can wrap, for error messages."""
    bypassed = _bypassed_layers(model)
    names = {p.rsplit(".", 1)[-1] for p, m in model.named_modules()
             if p and p not in bypassed and lora_class_for(m) is not None}
    return sorted(names)


def _regex_hint(model: nn.Module, spec: list[str] | str) -> str:
    """Advice for a string meant as a module name: a string is a regex over whole paths, so it matches nothing."""
    if not isinstance(spec, str) or not any(re.fullmatch(spec, name) for name in _leaf_names(model)):
        return ""
    return (f" (a string is a regular expression matched against whole module paths, as in PEFT: to match by "
            f"name, pass a list, target_modules=[{spec!r}], or the regex {'.*' + spec!r})")

