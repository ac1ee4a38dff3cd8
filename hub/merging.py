"""The torch half of `hub.merge`: load a transformers base, apply the adapter with our engine, fold it in, save.

Merging computes ``W = W0 + s * B A`` once per adapted layer (`lightning_lora.unload`), so the saved model is an
ordinary transformers model that runs exactly as fast as the base. The fold happens in float32 and the probe
compares the merged model with the unmerged adapter on the model's own dummy inputs; only then is the model
cast to the requested dtype and written, into a temporary folder renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning_lora import load_adapter, unload
from lightning_lora.card import AUTO_CLASS
from lightning_lora.config import ConfigError
from lightning_lora.io import META, AdapterError, AdapterInfo

from .errors import HubError, InvalidAdapter

#: Files that travel from the base folder to the merged one unchanged (tokenizers, processors).
_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                    "*.model", "preprocessor_config.json", "chat_template*")


def merge_into(adapter_dir: Path, info: AdapterInfo, base_dir: Path, out_dir: Path,
               dtype: str | None) -> tuple[Path, float, str]:
    """Merge and save; returns (out_dir, max output difference, saved dtype name)."""
    import torch

    check_out_dir(out_dir)
    target = dtype_of(dtype)
    model, config = _load_base(base_dir, info)
    if target is None:
        saved = getattr(config, "dtype", None) or torch.float32
        target = getattr(torch, saved) if isinstance(saved, str) else saved
    try:
        load_adapter(model, adapter_dir)
    except (AdapterError, ConfigError) as err:
        raise InvalidAdapter(f"invalid adapter: {adapter_dir} does not fit the base model in {base_dir}: "
                             f"{_one_line(err)}") from None
    probe = model.dummy_inputs
    with torch.no_grad():
        before = _main_output(model(**probe))
        try:
            unload(model)
        except RuntimeError as err:
            raise HubError(f"cannot fold the adapter into the base model in {base_dir}: {_one_line(err)}") from None
        max_diff = (before - _main_output(model(**probe))).abs().max().item()
    model.to(target)
    # An existing (empty) folder is filled, not replaced: renaming over `--out .` or a mount point fails, and
    # would leave a shell standing in it in a deleted folder.
    into = out_dir.is_dir()
    tmp = out_dir / f".merging-{os.getpid()}" if into else out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        for pattern in _TOKENIZER_FILES:
            for path in base_dir.glob(pattern):
                if path.is_file():
                    shutil.copyfile(path, tmp / path.name)
        if into:
            for path in tmp.iterdir():
                os.replace(path, out_dir / path.name)
        else:
            os.replace(tmp, out_dir)
    except OSError as err:
        raise HubError(f"cannot write the merged model to {out_dir}: {err.strerror or _one_line(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, max_diff, str(target).removeprefix("torch.")


def check_out_dir(out_dir: Path) -> None:
    """HubError unless `out_dir` is new or an empty folder: what a verb writes never mixes with other files."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is not empty" if out_dir.is_dir() else "is a file"
        raise HubError(f"{out_dir} already exists and {what}; choose another --out or delete it")


def _load_base(base_dir: Path, info: AdapterInfo):
    """The base model in float32 (safetensors weights only: a pickle checkpoint is never unpickled) and its
    config; HubError naming the folder otherwise."""
    import torch
    import transformers
    from safetensors import SafetensorError

    try:
        config = transformers.AutoConfig.from_pretrained(base_dir)
        # The adapter's task (else the class it was trained on) decides the head: a base folder may name another.
        arch = (getattr(config, "architectures", None) or [None])[0]
        trained_on = AUTO_CLASS.get(info.config.task_type or "") or info.metadata.get(META + "architecture")
        cls = getattr(transformers, trained_on or arch or "", None) or transformers.AutoModel
        model = cls.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True).eval()
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a truncated or corrupt weights file
        if not any(base_dir.glob("*.safetensors")) and any(base_dir.glob("*.bin")):
            raise HubError(f"the base model in {base_dir} has only pickle weights (*.bin), which lora-hub never "
                           f"loads: convert it to safetensors (load it where you trust it and save_pretrained it again)"
                           ) from None
        raise HubError(f"cannot load the base model from {base_dir}: {_one_line(err)}") from None
    return model, config


def _one_line(err: Exception) -> str:
    return " ".join(str(err).strip().splitlines()[:1]) or type(err).__name__


def dtype_of(name: str | None):
    """The torch dtype a ``--dtype`` names (None: None); HubError for any other than the three a model is saved in."""
    import torch

    if name is None:
        return None
    value = getattr(torch, name, None) if name in ("float32", "float16", "bfloat16") else None
    if value is None:
        raise HubError(f"dtype {name!r} is not supported for a merged model: use float32, float16 or bfloat16")
    return value


def _main_output(out):
    return (out.logits if hasattr(out, "logits") else out[0]).float()
