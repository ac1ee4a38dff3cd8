"""Model cards (README.md) for adapters, in the Hugging Face Hub's format: YAML front matter the Hub indexes
(``library_name: peft``, ``base_model``, the ``lora`` and ``base_model:adapter:<id>`` tags), then markdown: the
LoRA config, training metrics, the versions table and how to load it.

The card is a pure function of what it is given, so the callback (on export) and the hub (on push) render the
same card; it never sees a token. YAML values are written as JSON scalars, which YAML reads unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .config import LoRAConfig
from .io import META, AdapterInfo

#: Header metadata that describes the file, not the training run.
_NOT_METRICS = {"version", "fingerprint", "base_model", "architecture"}
#: The transformers auto class that loads a base model for each PEFT task type (the card's usage snippet, the
#: hub's merge).
AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel",
}
_VERSION_COLUMNS = ("version", "commit", "date", "message")


def render_card(
    adapter: AdapterInfo | LoRAConfig,
    base_model: str | None = None,
    *,
    repo_id: str | None = None,
    metrics: Mapping[str, object] | None = None,
    versions: Sequence[Mapping[str, str]] | None = None,
    extra: str | None = None,
    architecture: str | None = None,
) -> str:
    """The README.md text for an adapter.

    Args:
        adapter: `validate_adapter`'s result (config, parameter count, header metadata) or just a config.
        base_model: the base model's id; default: the adapter's.
        repo_id: where the adapter is published (title and usage snippet); default: a generic title.
        metrics: training figures, name -> value; default: the ``lightning_lora.*`` training figures in the
            safetensors header (everything but version, fingerprint and base model).
        versions: rows for the versions table, newest first, each with keys among
            ``version, commit, date, message`` (missing keys render empty).
        extra: free markdown appended at the end.
        architecture: the base model's transformers class, for the usage snippet when the task type names no
            auto class (a bare encoder); default: the adapter's, from its header. Without either the snippet
            shows only `lora-hub pull`.
    """
    info = adapter if isinstance(adapter, AdapterInfo) else None
    config = info.config if info else adapter
    base_model = base_model or config.base_model or (info.base_model if info else None)
    if metrics is None and info is not None:
        metrics = {k[len(META):]: v for k, v in info.metadata.items()
                   if k.startswith(META) and k[len(META):] not in _NOT_METRICS}
    hub_base = base_model if _is_repo_id(base_model) else None
    tags = ["lora", "peft", "lightning-lora"] + ([f"base_model:adapter:{hub_base}"] if hub_base else [])
    front = ["---", "library_name: peft"]
    if hub_base:
        front.append(f"base_model: {json.dumps(hub_base)}")
    front += ["tags:", *(f"- {json.dumps(t)}" for t in tags), "---", ""]
    body = [f"# {repo_id or 'LoRA adapter'}", "",
            f"A LoRA adapter{f' for `{base_model}`' if base_model else ''}, in PEFT's format (lightning-lora).", ""]
    body += _table("LoRA config", ("setting", "value"), _config_rows(config, info))
    if metrics:
        body += _table("Training metrics", ("metric", "value"), [(k, _fmt(v)) for k, v in sorted(metrics.items())])
    if versions:
        body += _table("Versions", _VERSION_COLUMNS, [[row.get(c, "") for c in _VERSION_COLUMNS] for row in versions])
    architecture = architecture or (info.metadata.get(META + "architecture") if info else None)
    body += _usage(config, base_model, repo_id, versions, AUTO_CLASS.get(config.task_type or "") or architecture)
    if extra:
        body += [extra.rstrip(), ""]
    return "\n".join(front + body).rstrip() + "\n"


def _is_repo_id(name: str | None) -> bool:
    """Whether `name` can be a Hub model id. A base loaded from disk has its folder as ``_name_or_path``, and
    the Hub refuses a card whose ``base_model`` metadata is a local path (its YAML check fails the commit), so
    such a base is named in the text only."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return bool(name)


def _config_rows(config: LoRAConfig, info: AdapterInfo | None) -> list[tuple[str, str]]:
    targets = config.target_modules
    rows = [
        ("r", str(config.r)),
        ("alpha", _fmt(config.alpha)),
        ("dropout", _fmt(config.dropout)),
        ("target_modules", ", ".join(targets) if isinstance(targets, list) else str(targets)),
        ("bias", config.bias),
    ]
    optional = {
        "modules_to_save": ", ".join(config.modules_to_save or []), "use_rslora": config.use_rslora,
        "use_dora": config.use_dora, "quantize": config.quantize, "quant_backend": config.quant_backend,
        "rank_pattern": config.rank_pattern, "alpha_pattern": config.alpha_pattern, "task_type": config.task_type,
    }
    rows += [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in optional.items() if v]
    if info is not None:
        rows += [("trainable parameters", f"{info.num_params:,}"), ("adapter size", f"{info.size_bytes:,} bytes")]
    return rows


def _usage(config: LoRAConfig, base_model: str | None, repo_id: str | None,
           versions: Sequence[Mapping[str, str]] | None, model_class: str | None) -> list[str]:
    if not (base_model and repo_id):
        return []
    latest = versions[0].get("version") if versions else None
    revision = f', revision="v{latest}"' if latest else ""
    pull = f"`lora-hub pull {repo_id}{'@^' + latest if latest else ''}`"
    if model_class is None:  # a guessed class would load a base the adapter's keys miss: PEFT runs it as a no-op
        return ["## Usage", "", f"{pull}, then load it onto the model it was trained on.", ""]
    return [
        "## Usage", "", "```python",
        "from peft import PeftModel",
        f"from transformers import {model_class}", "",
        f"base = {model_class}.from_pretrained({json.dumps(base_model)})",
        f"model = PeftModel.from_pretrained(base, {json.dumps(repo_id)}{revision})",
        "```", "",
        f"or {pull}.", "",
    ]


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
