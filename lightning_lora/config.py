"""`LoRAConfig`: what to adapt and how, validated on construction, and its mapping to PEFT's
`adapter_config.json` (the only config format we write, so PEFT, transformers and vLLM read it unchanged; vLLM
takes neither modules_to_save nor DoRA)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

#: Default targets per `model.config.model_type`, used when `target_modules` is None: PEFT's table
#: (`peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`) for transformers' model types, plus
#: phi3, distilbert and vit (whose attention is query/value before transformers 5, q_proj/v_proj since).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "codegen": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "mpt": ["Wqkv"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "vit": ["query", "value", "q_proj", "v_proj"],
}

#: The adapter_config.json keys we write: PEFT's own, nothing else (older PEFT raises on unknown keys).
_PEFT_KEYS = (
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "lora_alpha",
    "lora_dropout", "target_modules", "exclude_modules", "bias", "modules_to_save", "fan_in_fan_out",
    "use_rslora", "use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform",
    "layers_pattern",
)
#: PEFT options that change what a trained adapter computes and that we do not implement: refused on load.
_UNSUPPORTED = (
    "layer_replication", "use_qalora", "lora_bias", "target_parameters",
    "trainable_token_indices", "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config",
    "monteclora_config",
)
#: The heads PEFT's task classes add to modules_to_save, whether the model has them or not (peft_model.py:
#: PeftModelForSequenceClassification, ...).
PEFT_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian"}
#: PEFT's init_lora_weights values that leave the base weights alone: trained, such adapters are plain LoRA.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
#: ... and those that rewrite the base weights at initialisation (PiSSA's "pissa_niter_<n>" included).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
Bias = Literal["none", "all", "lora_only"]
Init = Literal["kaiming", "gaussian"]
Quantize = Literal["nf4"]


class ConfigError(ValueError):
    """A LoRA configuration that cannot work; the message names the field and how to fix it."""


@dataclass
class LoRAConfig:
    """Which layers to adapt and with what low-rank update.

    The adapted layer computes ``h = W0 x + s * B A x`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``), A random and B zero so that training starts exactly at the base model.

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator (> 0).
        dropout: dropout probability on the LoRA branch's input, in [0, 1).
        target_modules: which modules to wrap. A list of names, each matching a module path exactly or as a
            dotted suffix (``"c_attn"`` matches ``transformer.h.0.attn.c_attn``); a string, matched against
            whole paths with ``re.fullmatch``; ``"all-linear"`` for every linear layer except the output head
            (and ``nn.MultiheadAttention``'s ``out_proj``, which its forward reads but never calls);
            None to take the default for ``model.config.model_type``.
        exclude_modules: names or a regex, matched like ``target_modules``, removed from the targets.
        layers_to_transform: only the layers with these indices (an int or a list) among the modules a list of
            `target_modules` names (PEFT's rule, not with a regex or ``"all-linear"``). A module's layer index is
            the number after the first ``<name>.`` followed by digits in its path (``model.layers.3.self_attn``
            is layer 3), or after one of `layers_pattern`.
        layers_pattern: the name(s) of the module list that holds the layers (``"layers"``, ``"h"``), for
            `layers_to_transform` when the first numbered segment of a path is not the layer index.
        bias: which biases train: ``"none"``, ``"all"``, or ``"lora_only"`` (those of adapted layers).
        modules_to_save: names of whole modules kept trainable and saved with the adapter (e.g. a new
            classifier head); a module is selected when its path ends with a name (PEFT's rule: plain string
            suffix, so ``"classifier"`` also selects ``pre_classifier``).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023).
        use_dora: weight-decomposed LoRA (Liu et al. 2024): a trainable magnitude per output feature.
        init: ``"kaiming"`` (A kaiming-uniform, as the paper's code) or ``"gaussian"`` (A ~ N(0, 1/r)).
        rank_pattern: per-module rank overrides, ``{name or regex: r}``; the first key that matches the end of
            a module's path at a dot (as a regex: ``"q_proj"``, ``"self_attn.(q|v)_proj"``) applies (PEFT's rule).
        alpha_pattern: per-module alpha overrides, likewise.
        fan_in_fan_out: the base weights are stored ``[in, out]`` (GPT-2's Conv1D); set automatically.
        quantize: ``"nf4"`` quantizes the frozen base weights of adapted layers (QLoRA).
        quant_backend: ``"bnb"`` (bitsandbytes) or ``"torchao"``; None takes the first installed. Not a PEFT key.
        compute_dtype: dtype of the 4-bit base's matmul: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
            Not a PEFT key.
        base_model: the base model's id or path, written as ``base_model_name_or_path``.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), optional.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    bias: Bias = "none"
    modules_to_save: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: Init = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    quantize: Quantize | None = None
    quant_backend: Literal["bnb", "torchao"] | None = None
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    base_model: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        self._check_layers()
        if self.modules_to_save is not None:  # a list of names; one bare name is taken as a list of one
            names = [self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save
            self.modules_to_save = _names_or_regex("modules_to_save", names)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init not in _INIT_TO_PEFT:
            raise ConfigError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.quantize not in (None, "nf4"):
            raise ConfigError(f"quantize must be None or 'nf4', got {self.quantize!r}")
        if self.quant_backend not in (None, "bnb", "torchao"):
            raise ConfigError(f"quant_backend must be None, 'bnb' or 'torchao', got {self.quant_backend!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"compute_dtype must be 'float32', 'bfloat16' or 'float16', got {self.compute_dtype!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
                raise ConfigError(f"{name} must map module names to numbers, got {pattern!r}")
        for key, value in self.rank_pattern.items():
            _check_regex(f"rank_pattern key {key!r}", key)
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_regex(f"alpha_pattern key {key!r}", key)
            _check_alpha(f"alpha_pattern[{key!r}]", value)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    def _check_layers(self) -> None:
        layers, pattern = self.layers_to_transform, self.layers_pattern
        indices = _as_list(layers)
        if layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise ConfigError(f"layers_to_transform must be a layer index >= 0 or a list of them, got {layers!r}")
        names = _as_list(pattern)
        if pattern is not None and not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"layers_pattern must be a module name or a list of them, got {pattern!r}")
        for name in names if pattern is not None else ():  # PEFT reads them as regexes too
            _check_regex(f"layers_pattern {name!r}", name)
        if pattern and layers is None:
            raise ConfigError("layers_pattern only says where the layer index is: set layers_to_transform too")
        if layers is not None and isinstance(self.target_modules, str):
            raise ConfigError(f"layers_to_transform needs target_modules as a list of names, not "
                              f"{self.target_modules!r} (PEFT's rule); a regex can name the layers itself, "
                              f"e.g. r'.*\\.layers\\.(0|1)\\..*q_proj'")

    def in_layers(self, path: str) -> bool:
        """Whether module `path` is in `layers_to_transform` (always, without it): PEFT's rule
        (`check_target_module_exists`), the index being the first numbered path segment after a name, or after
        one of `layers_pattern`."""
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if layers is None or layers == []:
            return True
        if pattern:
            found = next(filter(None, (re.match(rf"(?:^|.*?\.){name}\.(\d+)\.", path) for name in _as_list(pattern))),
                         None)
        else:
            found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
        return found is not None and int(found[1]) in _as_list(layers)

    def rank_for(self, path: str) -> int:
        """The rank for the module at `path`: a `rank_pattern` entry if one matches, else `r`."""
        return _pattern_lookup(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        """The alpha for the module at `path`: an `alpha_pattern` entry if one matches, else `alpha`."""
        return float(_pattern_lookup(self.alpha_pattern, path, self.alpha))

    def scaling(self, path: str) -> float:
        """``alpha / r`` for the module at `path` (``alpha / sqrt(r)`` with rsLoRA)."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    def replace(self, **changes: Any) -> LoRAConfig:
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Primitives only (lists, dicts, numbers, strings): safe for checkpoints and YAML."""
        return dataclasses.asdict(self)

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT's `adapter_config.json` content: PEFT's keys only."""
        targets = self.target_modules
        out = {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model,
            "revision": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "bias": self.bias,
            "modules_to_save": self.modules_to_save,
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": _INIT_TO_PEFT[self.init],
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
        }
        assert set(out) == set(_PEFT_KEYS)
        return out

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Read PEFT's `adapter_config.json` content; raises ConfigError for anything we cannot honour."""
        if not isinstance(data, dict):
            raise ConfigError(f"adapter_config.json must hold a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type != "LORA":
            raise ConfigError(f"peft_type must be 'LORA', got {peft_type!r}: only LoRA adapters are supported")
        init = data.get("init_lora_weights", True)
        _check_init(init)
        for key in ("base_model_name_or_path", "task_type", "revision"):
            if not isinstance(data.get(key), (str, type(None))):
                raise ConfigError(f"{key} must be a string or null, got {data[key]!r}")
        unsupported = {k: data[k] for k in _UNSUPPORTED if data.get(k) not in (None, False, [], {})}
        if unsupported:
            raise ConfigError(f"unsupported PEFT options in adapter_config.json: {unsupported} (they change what "
                              f"the adapter computes, and lightning-lora implements plain LoRA, rsLoRA and DoRA)")
        return cls(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern") or None,
            bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save"),
            use_rslora=_flag(data, "use_rslora"),
            use_dora=_flag(data, "use_dora"),
            init="gaussian" if init == "gaussian" else "kaiming",
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            fan_in_fan_out=_flag(data, "fan_in_fan_out"),
            base_model=data.get("base_model_name_or_path"),
            task_type=data.get("task_type"),
        )


def checked_config(config: LoRAConfig | None) -> LoRAConfig:
    """`config`, or the default config for None; ConfigError for anything else (an adapter name or a dict
    passed where the config goes)."""
    if config is None:
        return LoRAConfig()
    if not isinstance(config, LoRAConfig):
        raise ConfigError(
            f"config must be a LoRAConfig or None, got {type(config).__name__} {config!r}: pass LoRAConfig(...) (or "
            f"its fields as keyword arguments, e.g. r=8), and an adapter's name as adapter_name=..."
        )
    return config


def matches(spec: list[str] | str | None, path: str) -> bool:
    """Whether module `path` is selected by `spec` (``target_modules``, ``exclude_modules``): a list of exact
    paths or dotted suffixes, or a regex string matched against the whole path. PEFT's rule."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def is_saved_module(modules_to_save: list[str] | None, path: str) -> bool:
    """Whether module `path` is one of `modules_to_save`. PEFT's rule, which differs from `matches`: the path
    ends with the name as a plain string, so ``"classifier"`` also selects DistilBERT's ``pre_classifier``;
    an adapter saved under another rule would not load in PEFT."""
    return bool(path) and any(path.endswith(name) for name in modules_to_save or ())


def _check_init(init: Any) -> None:
    """Refuse an adapter whose ``init_lora_weights`` means it is not plain LoRA on the unchanged base.

    The start alone does not matter once A and B are trained: False (both random), PEFT's "eva" (data-driven)
    and "orthogonal" (B A = 0) adapters are plain LoRA. PiSSA, OLoRA, CorDA and LoftQ also rewrite the base
    weights at initialisation, so their A and B are only right on that rewritten base."""
    if init in _PLAIN_INITS:
        return
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise ConfigError(
            f"init_lora_weights={init!r}: PEFT changed the base weights when it initialised this adapter, so it is "
            f"wrong on the original base; save it from PEFT converted to plain LoRA (save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=<the initial adapter>), for PiSSA, OLoRA and CorDA) and load that"
        )
    raise ConfigError(f"init_lora_weights={init!r} is not supported; supported: {list(_PLAIN_INITS)}")


def _flag(data: dict[str, Any], key: str) -> bool:
    """A true/false field of adapter_config.json; anything else (e.g. the string "false") is refused."""
    value = data.get(key)
    if not isinstance(value, (bool, type(None))):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return bool(value)


def _pattern_lookup(pattern: dict[str, Any], path: str, default: Any) -> Any:
    # PEFT's rule (`peft.utils.other.get_pattern_key`): the first key that, as a regex, matches a dotted
    # suffix of the path: "q_proj", "self_attn.(q|v)_proj" and whole paths alike.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer (e.g. 8), got {value!r}")
    if value > 65536:
        raise ConfigError(f"{name}={value} is implausibly large for a low-rank adapter (at most 65536)")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number (e.g. 16), got {value!r}")


def _as_list(value: Any) -> list:
    """`value` as PEFT allows it spelled, one item or a list of them, as a list."""
    return value if isinstance(value, list) else [value]


def _check_regex(what: str, value: str) -> None:
    """ConfigError unless `value` (`what`, matched as a regex against module paths) compiles."""
    try:
        re.compile(value)
    except re.error as err:
        raise ConfigError(f"{what} is not a valid regular expression: {err}") from None


def _names_or_regex(name: str, value: Any) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == "all-linear":  # PEFT's test is case-insensitive
            return "all-linear"
        if re.sub(r"[\s_]+", "-", value.strip().lower()) == "all-linear":
            raise ConfigError(f"{name}={value!r} is not a keyword (it would be a regex matching nothing): write 'all-linear'")
        _check_regex(f"{name}={value!r}", value)
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        if not value:
            raise ConfigError(f"{name} is an empty list; name at least one module or leave it None")
        return sorted(set(value)) if isinstance(value, set) else list(value)
    raise ConfigError(f"{name} must be a list of module names, a regex string or 'all-linear', got {value!r}")
