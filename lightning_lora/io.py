"""Adapters on disk in exactly PEFT's format, read and written safely.

A folder holds ``adapter_config.json`` (PEFT's keys only) and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` etc.; an adapter not named ``default`` lives in a subfolder
of that name. Our own metadata (library version, base model, a fingerprint of the targeted base layers'
names and shapes, training figures) travels in the safetensors header metadata under ``lightning_lora.*``.

Loading is all-or-nothing: the files are checked against the model (keys, shapes, dtypes, finite values,
fingerprint) before the model is touched. NaN or Inf values are refused, not warned about: such an adapter
diverged in training and would silently turn every output into NaN. Only safetensors are read: never a
pickle. Every file is written through a temporary file in the same folder and renamed over the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import quant
from .config import PEFT_HEADS, ConfigError, LoRAConfig, is_saved_module, matches
from .inject import (
    adapter_config,
    adapter_configs,
    extra_buffers,
    extra_trainable,
    find_targets,
    inject,
    lora_layers,
    output_head,
    resolve_config,
    same_adapter,
    set_adapter,
)
from .layers import LoRALayer, lora_class_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
PREFIX = "base_model.model."
META = "lightning_lora."
#: Module-path segments that wrappers insert (torch.compile, FSDP, activation checkpointing): not part of a key.
WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
#: LoRA parameter kinds and their saved suffix: PEFT's A/B are nn.Linear modules (hence ``.weight``).
_KIND_SUFFIX = {
    "lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
    "lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B",
    "lora_magnitude_vector": "lora_magnitude_vector",
}
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8}  # I64: counters (BatchNorm's num_batches_tracked)
_MAX_HEADER = 100 * 1024 * 1024
_MAX_CONFIG = 1024 * 1024


class AdapterError(ValueError):
    """An adapter that cannot be read or does not fit the model; the message names the file or key."""


@dataclass
class AdapterInfo:
    """What `validate_adapter` learned about an adapter folder without loading a model."""

    path: Path
    config: LoRAConfig
    base_model: str | None
    num_params: int  # trainable values: not the full base weights PEFT may store, nor normalization statistics
    size_bytes: int
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)


# -- writing -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`, on failure
    removed. Readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp creates 0600; adapters and checkpoints are meant to be shared
        with _naming(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError raised inside names `path`, not the temporary file beside it that the failing call was given:
    "Is a directory: out/phi.png" rather than "Is a directory: out/.phi.png.x1y2z3.tmp"."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None


@contextlib.contextmanager
def _folder_lock(directory: Path, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock on the folder itself (``flock`` on its descriptor: no lock file is left behind):
    saves take it exclusively, so that two saves to one folder cannot leave the weights of one beside the config
    of the other; loads take it shared, so that they read the files of one save. Without ``flock`` (Windows), a
    readable folder or a file system that locks (some NFS mounts answer ENOLCK), no lock."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_write` left in `directory` when its process was killed mid-write
    (SIGKILL runs no cleanup; the target itself is intact). Call it before writing there again; returns
    what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if re.fullmatch(r"\..+\.[a-z0-9_]{8}\.tmp", p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def adapter_dir(directory: str | os.PathLike, adapter_name: str = "default") -> Path:
    """PEFT's layout: the default adapter in `directory`, any other in ``directory/<adapter_name>``."""
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys: A, B (and DoRA magnitudes), plus modules_to_save (parameters
    and buffers, as PEFT saves them) and biases."""
    config = adapter_config(model, adapter_name)
    out = {}
    for path, layer in lora_layers(model):
        for kind, params in layer.named_children():
            if kind in _KIND_SUFFIX and adapter_name in params:
                out[_key(f"{path}.{_KIND_SUFFIX[kind]}")] = params[adapter_name]
    for name, tensor in _extras(model, config).items():
        out[_key(name)] = tensor
    return {k: v.detach() for k, v in out.items()}


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    base_model: str | None = None,
    metadata: dict[str, str] | None = None,
    card: str | None = None,
) -> Path:
    """Write adapter `adapter_name` of `model` in PEFT's format; returns the folder written.

    `base_model` (default: the config's, else ``model.config._name_or_path``) goes in the config;
    `metadata` (string values) goes in the safetensors header as ``lightning_lora.<key>``; `card`, if given,
    is written as README.md. Each file is replaced atomically, weights first.
    """
    config = adapter_config(model, adapter_name)
    base_model = base_model or config.base_model or _name_or_path(model)
    config = config.replace(base_model=base_model, task_type=task_type(model, config.modules_to_save, config.task_type))
    if config.target_modules == "all-linear":  # write the matched paths (as PEFT does): every reader finds the same
        # layers, where a leaf name could also select a Sequential or a conv of that name
        paths = {_strip(path) for path, layer in lora_layers(model) if adapter_name in layer.lora_a}
        config = config.replace(target_modules=sorted(paths))
    tensors = adapter_state_dict(model, adapter_name)
    arch = architecture(model)
    metadata = {**({"architecture": arch} if arch else {}), **(metadata or {})}
    return write_adapter(adapter_dir(directory, adapter_name), tensors, config, fingerprint(model, adapter_name),
                         metadata, card)


def write_adapter(
    directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: LoRAConfig,
    layer_fingerprint: str | None = None,
    metadata: dict[str, str] | None = None,
    card: str | None = None,
) -> Path:
    """Write `tensors` (PEFT's keys) and `config` as a PEFT-format adapter in `directory`, without a model
    (`save_adapter` and `combine` both end here). Each file is replaced atomically, weights first."""
    out = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {"format": "pt", META + "version": _version()}
    if layer_fingerprint:
        header[META + "fingerprint"] = layer_fingerprint
    if config.base_model:
        header[META + "base_model"] = config.base_model
    header.update({META + k: str(v) for k, v in (metadata or {}).items()})
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        with atomic_write(out / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        # top-level keys sorted as PEFT writes them; pattern keys keep their order, which decides which one applies
        write_text(out / CONFIG_NAME, json.dumps(dict(sorted(config.to_peft_dict().items())), indent=2) + "\n")
        if card is not None:
            write_text(out / CARD_NAME, card)
    return out


def fingerprint(model: nn.Module, adapter_name: str = "default") -> str:
    """sha256 over the adapted layers' paths and base shapes: equal for the same architecture and targets."""
    return _fingerprint((p, layer) for p, layer in lora_layers(model) if adapter_name in layer.lora_a)


# -- reading -----------------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> LoRAConfig:
    """Parse ``adapter_config.json`` in `directory` into a LoRAConfig; AdapterError if it is bad."""
    path = adapter_file(Path(directory), CONFIG_NAME)
    if path.stat().st_size > _MAX_CONFIG:
        raise AdapterError(f"{path} is {path.stat().st_size} bytes; an adapter config is a few hundred")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LoRAConfig.from_peft_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise AdapterError(f"{path} is nested too deeply to be an adapter config") from None
    except (ConfigError, TypeError) as err:
        raise AdapterError(f"{path}: {err}") from None


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The safetensors header of `path` (tensor entries, metadata), checked against the file's size so that
    a truncated file or one whose header lies about offsets is refused before any tensor is read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterError(f"{path} is truncated: {size} bytes, not even a safetensors header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise AdapterError(f"{path}: header length {n} does not fit a {size}-byte file (truncated or corrupt)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AdapterError(f"{path}: the safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: the safetensors header is not a JSON object (corrupt file)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError(f"{path}: the header's __metadata__ must be a JSON object of strings (corrupt file)")
    spans = []
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise AdapterError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise AdapterError(f"{path}: tensor {key!r} has dtype {dtype}; adapters hold float tensors only "
                               f"(int64 for buffers of modules_to_save)")
        if not isinstance(shape, list) or not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) \
                or begin > end:
            raise AdapterError(f"{path}: tensor {key!r} has an invalid shape or offsets")
        if (end - begin) != math.prod(shape) * _DTYPES[dtype]:
            raise AdapterError(f"{path}: tensor {key!r}: offsets span {end - begin} bytes, shape needs "
                               f"{math.prod(shape) * _DTYPES[dtype]} (corrupt file)")
        spans.append((begin, end))
    if spans and max(e for _, e in spans) != size - 8 - n:
        raise AdapterError(f"{path}: data section is {size - 8 - n} bytes but the header describes "
                           f"{max(e for _, e in spans)} (truncated or corrupt file)")
    spans.sort()
    if spans and (spans[0][0] != 0 or any(b != e_prev for (_, e_prev), (b, _) in itertools.pairwise(spans))):
        raise AdapterError(f"{path}: tensors overlap or leave gaps in the data section (corrupt file)")
    return header, {str(k): str(v) for k, v in metadata.items()}


def validate_adapter(directory: str | os.PathLike) -> AdapterInfo:
    """Check an adapter folder without a model: config, safetensors header, key names and r against the
    config. Returns what it found; raises AdapterError naming the problem."""
    directory = Path(directory)
    with _folder_lock(directory, shared=True):  # not while a save replaces the files
        return _validate(directory)


def _validate(directory: Path) -> AdapterInfo:
    if not directory.is_dir():
        hint = "" if directory.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+(@\S+)?", str(directory)) else (
            f" (a Hub repo id? download it first: hub.pull({str(directory)!r}) or `lora-hub pull {directory}`)")
        raise AdapterError(f"{directory} is not a folder holding an adapter{hint}")
    named = sorted(p.name for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
    if named and not (directory / CONFIG_NAME).exists():
        raise AdapterError(f"{directory} has no {CONFIG_NAME} but holds the named adapters {named} (PEFT saves an "
                           f"adapter not named 'default' in <dir>/<name>): use {directory / named[0]}, or "
                           f"load_adapter(model, dir, adapter_name={named[0]!r})")
    config = read_config(directory)
    weights = _weights_path(directory)
    header, metadata = read_header(weights)
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    for key in shapes:
        if not key.startswith(PREFIX):
            raise AdapterError(f"{weights}: key {key!r} lacks PEFT's {PREFIX!r} prefix{_hint(key)}")
    lora_keys = module_keys(shapes)
    modules = {path: {kind: shapes[key] for kind, key in kinds.items()} for path, kinds in lora_keys.items()}
    integer = [key for kinds in lora_keys.values() for key in kinds.values() if header[key]["dtype"] == "I64"]
    if integer:
        raise AdapterError(f"{weights}: LoRA tensor {integer[0]!r} has dtype I64; LoRA factors are float tensors")
    if not modules:
        raise AdapterError(f"{weights} holds no LoRA tensors (no lora_A / lora_B keys)")
    for path, kinds in modules.items():
        a, b = (kinds.get("lora_A") or kinds.get("lora_embedding_A"), kinds.get("lora_B") or kinds.get("lora_embedding_B"))
        if any(kind != "lora_magnitude_vector" and len(shape) < 2 for kind, shape in kinds.items()):
            raise AdapterError(f"{weights}: module {path!r}: a LoRA factor of shape {[list(s) for s in kinds.values()]}"
                               f" is not a matrix (corrupt file)")
        if a is None or b is None:
            raise AdapterError(f"{weights}: module {path!r} has only one of its two LoRA factors{_hint(path)}")
        r = config.rank_for(path)
        if a[0] != r or b[1] != r:
            raise AdapterError(f"{weights}: module {path!r} has rank {a[0]}x{b[1]} but adapter_config.json says r={r}")
        if not _selects(config, path):
            raise AdapterError(f"{weights}: module {path!r} has LoRA tensors but adapter_config.json's target_modules "
                               f"{config.target_modules!r} (with its exclude_modules / layers_to_transform) does not "
                               f"select it: the two files do not belong together")
        if config.use_dora != ("lora_magnitude_vector" in kinds):
            raise AdapterError(f"{weights}: module {path!r} {'lacks' if config.use_dora else 'has'} a DoRA magnitude "
                               f"(lora_magnitude_vector) but adapter_config.json says use_dora={config.use_dora}")
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    return AdapterInfo(
        path=directory,
        config=config,
        base_model=config.base_model or metadata.get(META + "base_model"),
        num_params=sum(math.prod(s) for k, s in shapes.items() if not _NOT_TRAINED.search(k)),
        size_bytes=size,
        shapes=shapes,
        metadata=metadata,
    )


def _selects(config: LoRAConfig, path: str) -> bool:
    """Whether `config`'s target rule picks module `path`, as far as the path tells without the model: a
    default (None) or ``"all-linear"`` depends on the model's layers, so they pass."""
    if config.target_modules is None or config.target_modules == "all-linear":
        return True
    return (matches(config.target_modules, path) and config.in_layers(path)
            and not matches(config.exclude_modules, path))


def module_keys(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """PEFT's LoRA keys grouped by module path: ``{path: {"lora_A": key, "lora_B": key, ...}}`` (kinds as
    the layers name them: ``lora_A``/``lora_B``, ``lora_embedding_A``/``_B``, ``lora_magnitude_vector``).
    Other keys (modules_to_save, biases) are left out."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        for kind, suffix in _KIND_SUFFIX.items():
            if key.startswith(PREFIX) and key.endswith("." + suffix):
                modules.setdefault(key[len(PREFIX):-len(suffix) - 1], {})[kind] = key
    return modules


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the adapter in `directory` under PEFT's keys (safetensors only, all finite)."""
    return _load_tensors(_weights_path(Path(directory)))


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> LoRAConfig:
    """Load a PEFT-format adapter into `model` as `adapter_name` (injecting it if needed) and activate it.

    All-or-nothing: every key, shape, dtype and value is checked against the model before it changes, and
    any missing, unexpected or mis-shaped key, a different base (fingerprint), a non-finite value or a
    corrupt file raises AdapterError naming it, with the model untouched. The adapted layers keep the train /
    eval mode of the layers they wrap.

    As in PEFT, the full base weight of a targeted embedding layer or output head (``<path>.base_layer.weight``,
    which PEFT's default ``save_embedding_layers="auto"`` saves beside the LoRA tensors) is loaded into that
    base layer.
    """
    directory = Path(directory)
    if adapter_name != "default" and (directory / adapter_name / CONFIG_NAME).is_file():
        directory = directory / adapter_name
    if any(layer.merged_adapters for _, layer in lora_layers(model)):  # new values would not match the merged delta
        raise AdapterError(f"the model has merged adapters; unmerge(model) before loading {directory}")
    with _folder_lock(directory, shared=True):  # the config and the weights of one save
        info = _validate(directory)
        tensors = _load_tensors(_weights_path(directory))
    try:
        config = resolve_config(model, info.config)
        expected = _expected_shapes(model, config)
        paths = find_targets(model, config)
        embedding_bases = _embedding_bases(model, paths)
    except ConfigError as err:
        raise AdapterError(f"{directory / CONFIG_NAME} does not fit this model: {err}") from None
    existing = adapter_configs(model).get(adapter_name)
    if existing is not None and not same_adapter(model, existing, config):
        raise AdapterError(f"the model already has an adapter {adapter_name!r} with another config; choose another "
                           f"adapter_name or delete_adapter it first")
    if existing is not None:
        expected = {k: tuple(v.shape) for k, v in adapter_state_dict(model, adapter_name).items()}
    _check_keys(directory, expected, info.shapes, embedding_bases)
    if existing is None:
        want = info.metadata.get(META + "fingerprint")
        if want and want != _fingerprint((p, _probe(model, p)) for p in find_targets(model, config)):
            raise AdapterError(f"{directory} was trained on a different base model (layer fingerprint differs)")
    if existing is None:
        modes = {path: model.get_submodule(path).training for path in paths}
        try:  # its checks run before it changes anything
            inject(model, config, adapter_name)
        except ConfigError as err:
            raise AdapterError(f"{directory} cannot be loaded into this model: {err}") from None
        for path, training in modes.items():  # new modules are in training mode: in an eval-mode model (as
            model.get_submodule(path).train(training)  # from_pretrained returns it) the adapter's dropout would run
    targets = adapter_state_dict(model, adapter_name) | {k: m.weight for k, m in embedding_bases.items()}
    with torch.no_grad():
        for key, tensor in tensors.items():
            targets[key].copy_(tensor)
    set_adapter(model, adapter_name)  # inject activates a new adapter; an existing one may not be the active one
    return config


#: Keys of tensors an adapter file may carry that training did not produce: the full base weight PEFT saves with
#: a targeted embedding layer, the running statistics of a normalization layer in modules_to_save.
_NOT_TRAINED = re.compile(r"\.(base_layer\.weight|running_mean|running_var|num_batches_tracked)$")
#: PEFT's task type for a transformers head class, by class-name suffix: loaders pick the head from it.
_TASK_BY_SUFFIX = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
                   "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                   "ForSeq2SeqLM": "SEQ_2_SEQ_LM"}


def task_type(model: nn.Module, modules_to_save: list[str] | None, requested: str | None = None) -> str | None:
    """PEFT's ``task_type`` for a transformers model: `requested` (the config's), else the one its class names
    (``"SEQ_CLS"`` for ``BertForSequenceClassification``), None for a bare encoder or a model that is not from
    transformers.

    Also None when `modules_to_save` leaves out the task's head: PEFT's model class for that task adds the head
    to ``modules_to_save`` and then cannot load an adapter without its weights, while the plain ``PeftModel``
    that None selects keeps the base model's head."""
    name = type(model).__name__
    task = requested or next((task for suffix, task in _TASK_BY_SUFFIX.items() if name.endswith(suffix)), None)
    heads = [p for p, _ in model.named_modules() if is_saved_module(PEFT_HEADS.get(task), p)]
    return None if any(not is_saved_module(modules_to_save, p) for p in heads) else task


# -- helpers -----------------------------------------------------------------------------------------------
def _key(param_name: str) -> str:
    return PREFIX + _strip(param_name)


def _strip(path: str) -> str:
    """Drop the wrapper segments that `torch.compile`, FSDP and activation checkpointing add to module paths."""
    return ".".join(p for p in path.split(".") if p not in WRAPPER_SEGMENTS)


def _hint(key: str) -> str:
    if ".default." in key or key.endswith(".default"):
        return " (it contains PEFT's in-memory adapter name '.default.'; save with PeftModel.save_pretrained)"
    return ""


def adapter_file(directory: Path, name: str) -> Path:
    """File `name` of the adapter folder `directory`; AdapterError if it is missing or is a symlink pointing
    outside the folder (or, for a cache snapshot, outside its repo's blobs)."""
    path = directory / name
    if not path.exists():
        raise AdapterError(f"{directory} has no {name}")
    if path.is_symlink() and not any(path.resolve().is_relative_to(ok) for ok in _symlink_roots(directory)):
        raise AdapterError(f"{path} is a symlink pointing outside the adapter folder; refusing to follow it")
    return path


def _symlink_roots(directory: Path) -> list[Path]:
    """Where an adapter file's symlink may point: into the folder, or, for a folder in a Hugging Face cache
    snapshot (``<repo>/snapshots/<commit>/``, or a subfolder of it such as PEFT's ``<name>/`` for an adapter not
    named default), into that repo's ``<repo>/blobs/``."""
    directory = directory.resolve()
    roots = [directory]
    snapshot = next((d for d in (directory, *directory.parents) if d.parent.name == "snapshots"), None)
    if snapshot is not None:
        roots.append(snapshot.parent.parent / "blobs")
    return roots


def _weights_path(directory: Path) -> Path:
    if not (directory / WEIGHTS_NAME).exists() and (directory / "adapter_model.bin").exists():
        raise AdapterError(
            f"{directory} holds adapter_model.bin, a pickle, which can run arbitrary code when loaded; convert it "
            f"to {WEIGHTS_NAME} in a trusted environment (PeftModel.save_pretrained(..., safe_serialization=True))"
        )
    return adapter_file(directory, WEIGHTS_NAME)


def _probe(model: nn.Module, path: str) -> LoRALayer:
    module = model.get_submodule(path)
    return module if isinstance(module, LoRALayer) else lora_class_for(module)(module)


def _expected_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[int, ...]]:
    """The keys and shapes injecting `config` would create, computed without changing `model`."""
    out = {}
    targets = find_targets(model, config)
    for path in targets:
        layer = _probe(model, path)
        shape_a, shape_b = layer._shapes(config.rank_for(path))
        out[_key(f"{path}.{_KIND_SUFFIX[layer.A_NAME]}")] = shape_a
        out[_key(f"{path}.{_KIND_SUFFIX[layer.B_NAME]}")] = shape_b
        if config.use_dora:  # DoRA's magnitude: one entry per output feature
            out[_key(f"{path}.lora_magnitude_vector")] = shape_b[:1]
    # modules_to_save and bias parameters keep their paths, under base_layer once their module is wrapped.
    targets = set(targets)
    extra = {n: tuple(t.shape) for n, t in _extras(model, config).items()}
    if config.bias == "lora_only":
        extra.update({f"{t}.bias": tuple(b.shape) for t in targets
                      if (b := model.get_submodule(t)._parameters.get("bias")) is not None})
    for name, shape in extra.items():
        owner, _, leaf = name.rpartition(".")
        out[_key(f"{owner}.base_layer.{leaf}" if owner in targets else name)] = shape
    return out


def _extras(model: nn.Module, config: LoRAConfig) -> dict[str, torch.Tensor]:
    """What an adapter saves beside A and B, by name: modules_to_save (parameters and buffers) and biases."""
    return {**extra_trainable(model, config), **extra_buffers(model, config)}


def _embedding_bases(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """The base layers whose full weight PEFT may save beside an adapter with these `targets`, by that weight's
    key: each targeted Embedding and the targeted output head (``<path>.base_layer.weight``), and the input and
    output embeddings when not targeted (``<path>.weight``: PEFT saves them after a vocabulary resize)."""
    head = output_head(model)
    out = {}
    for path in targets:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, LoRALayer) else module
        if isinstance(base, nn.Embedding) or module is head:
            out[_key(f"{path}.base_layer.weight")] = base
    embeddings = {id(m) for m in (_input_embeddings(model), head) if m is not None}
    for path, module in model.named_modules():
        if id(module) in embeddings and path not in targets:
            out[_key(f"{path}.weight")] = module
    return out


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embedding layer (transformers' ``get_input_embeddings``) if it has a weight PEFT could
    save, else None: vision and speech models return a patch-embedding block (ViT) or raise (``CLIPModel``)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        module = get() if callable(get) else None
    except NotImplementedError:
        return None
    return module if isinstance(getattr(module, "weight", None), torch.Tensor) else None


def _fingerprint(layers: Iterator[tuple[str, LoRALayer]]) -> str:
    entries = []
    for path, layer in layers:
        shape_a, shape_b = layer._shapes(1)
        entries.append((_strip(path), list(shape_a[1:]), shape_b[0]))
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def _check_keys(
    directory: Path, expected: dict[str, tuple], found: dict[str, tuple], embedding_bases: dict[str, nn.Module]
) -> None:
    """`found` (key -> shape) must hold exactly the `expected` keys and shapes, and may hold the full weights of
    `embedding_bases` in their shapes; those are checked first, so that a resized vocabulary gets its own advice."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(embedding_bases))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                         f"{_hint(unexpected[0])}")
        raise AdapterError(f"{directory / WEIGHTS_NAME} does not fit this model: {'; '.join(parts)}"
                           f"{_prefix_hint(missing, unexpected)}")
    for key in sorted(embedding_bases.keys() & found.keys()):
        base, shape = embedding_bases[key], list(found[key])
        if quant.is_quantized(base):
            raise AdapterError(f"{directory / WEIGHTS_NAME}: {key} is a full base weight (PEFT saves it with a "
                               f"targeted embedding layer), which cannot be loaded into this 4-bit base layer; load "
                               f"the adapter into a full-precision base")
        if shape != list(base.weight.shape):
            raise AdapterError(f"{directory / WEIGHTS_NAME}: {key} has shape {shape}, the model's base weight "
                               f"{list(base.weight.shape)}; if the adapter was trained on a resized vocabulary, call "
                               f"model.resize_token_embeddings({shape[0]}) on the base first")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise AdapterError(f"{directory / WEIGHTS_NAME}: {key} has shape {list(found[key])}, the model "
                               f"needs {list(shape)} (an adapter for another base or rank?)")


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Advice when the adapter's keys and the model's differ only by a leading module path: the adapter was saved
    from a model holding this one (``BertForSequenceClassification.bert``, a LightningModule's ``self.model``),
    or from a part of it."""
    if not missing or not unexpected:
        return ""
    need, have = missing[0][len(PREFIX):], unexpected[0][len(PREFIX):]
    for outer, inner, keys, other in ((have, need, missing, unexpected), (need, have, unexpected, missing)):
        extra = outer[:-len(inner)] if outer.endswith("." + inner) else None
        if extra and {PREFIX + extra + k[len(PREFIX):] for k in keys} == set(other):
            if other is unexpected:
                return (f". Every adapter key has an extra leading {extra!r}: it was saved from a model that holds "
                        f"this one as {extra[:-1]!r} (e.g. a task model around the encoder, or a LightningModule "
                        f"exported without model_attr); load it into that model")
            return (f". Every model key has an extra leading {extra!r}: the adapter was saved from the part of this "
                    f"model at {extra[:-1]!r}; load it into that part")
    return ""


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{path} is not a readable safetensors file: {err}") from None
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: tensor {key} holds NaN or Inf values; refusing to load a diverged adapter")
    return tensors


def architecture(model: nn.Module) -> str | None:
    """The transformers class of `model` (``"BertModel"``, ``"LlamaForCausalLM"``): what loads the base for this
    adapter when its task type names no auto class. None for a model that is not from transformers."""
    return type(model).__name__ if type(model).__module__.startswith("transformers.") else None


def _name_or_path(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _version() -> str:
    from . import __version__

    return __version__
