"""`LoRACallback`: LoRA fine-tuning of an unchanged LightningModule. Lightning hooks only; the math lives in
`inject`, the file format in `io`, the counts in `summary`.

Why these hooks (see docs in ``shared/design/lightning-hooks.md``): `Callback.setup` is the only callback hook
that runs before the checkpoint restore, the DDP wrap and `configure_optimizers`, so injection happens there.
Injecting later fails silently (the optimizer holds no LoRA parameter and ``B`` stays exactly 0, or DDP never
all-reduces the new parameters), which `on_fit_start` turns into an error.

Checkpoints keep only the trainable tensors (and the few buffers training changes: normalization layers'
running statistics): with ``r`` small they are ``3 x trainable x 4`` bytes (weights plus Adam's two moments)
instead of the whole model. Resuming needs the missing frozen keys ignored while the LoRA keys stay strict: a
picklable ``load_state_dict`` post-hook does exactly that.
"""

from __future__ import annotations

import dataclasses
import io as _bytes_io
import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .config import ConfigError, LoRAConfig, checked_config
from .inject import (
    adapter_configs,
    extra_buffers,
    extra_trainable,
    inject,
    lora_layers,
    resolve_config,
    same_adapter,
)
from .io import WRAPPER_SEGMENTS, architecture, atomic_write, fingerprint, remove_stale_temps, save_adapter
from .quant import is_quantized
from .summary import LoRASummary, summarize

#: Where the primitive-only record of the LoRA config and base fingerprint lives in a `.ckpt`.
RECORD_KEY = "lightning_lora"
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(LoRAConfig)} - {"fan_in_fan_out"}
_FSDP_WRAPPERS = WRAPPER_SEGMENTS - {"_orig_mod"}


class LoRACallback(Callback):
    """Inject LoRA into the model at `setup`, train only the adapter, checkpoint and export only the adapter.

    Args:
        config: a `LoRAConfig`; its fields may also be given (or overridden) one by one as keyword arguments,
            which is how LightningCLI's YAML sets them (see `LoRAConfig` for their meaning).
        adapter_dir: if set, every checkpoint save and the end of training write the adapter in PEFT's format
            to ``<adapter_dir>/last``, and to ``<adapter_dir>/best`` when ModelCheckpoint's best changes
            (atomically, global rank 0 only, with a model card; not in a ``fast_dev_run``). With a WeightAveraging
            callback (EMA, SWA) listed after this one, the averaged weights, as its checkpoints hold them.
        model_attr: the attribute of the LightningModule holding the model to adapt (e.g. ``"model"`` for a
            transformers model in ``self.model``, whose ``config.model_type`` then picks default targets, and
            whose PEFT export then loads into that transformers class), or a dotted path to it
            (``"backbone.encoder"``). Default: the whole LightningModule. Parameters outside it are frozen too.
        noop_check_steps: after this many optimizer steps, warn if every adapter still computes exactly zero;
            0 or None turns the check off.

    Checkpoints written during `fit` hold only the trainable tensors, the buffers of ``modules_to_save`` and
    the running statistics of normalization layers (BatchNorm's change in training even when frozen), plus
    ``checkpoint["lightning_lora"]`` (config and base fingerprint); `trainer.fit(ckpt_path=...)` resumes from
    them exactly, and `load_lora_checkpoint` loads them outside a Trainer. The PEFT export carries only the
    adapter and ``modules_to_save``: `fit` warns about normalization layers with running statistics outside
    ``modules_to_save``.

    Strategies, each tested in 2 processes on CPU (gloo): single device, DDP, FSDP and FSDP2 (FSDPStrategy through
    a test-only subclass that lifts Lightning's GPU requirement; GPUs are not verified yet).

    - ``FSDPStrategy`` with its defaults ``use_orig_params=True, state_dict_type="full"``, with or without an
      ``auto_wrap_policy`` and activation checkpointing: injection happens before wrapping, the ratio is counted
      before sharding, checkpoints hold only the LoRA tensors (unwrapped names; Adam's state for them only) and
      resume exactly, and every export gathers the whole LoRA tensors (all ranks join; rank 0 writes).
    - ``ModelParallelStrategy(save_distributed_checkpoint=False)`` (FSDP2): call ``lora_callback.apply(self)`` in
      ``configure_model`` before ``fully_shard`` (sharding first is refused: LoRA would escape sharding). The
      callback sets ``strict_loading=False`` on the module (that strategy loads key by key, past the hook that
      ignores frozen keys) and checks the LoRA keys of ``ckpt_path`` itself. Exports gather only the LoRA tensors.
    - Refused with a clear error: ``use_orig_params=False`` (one flat parameter cannot mix trainable and frozen
      tensors), a ``quantize`` base under ``FSDPStrategy`` (nor packed 4-bit and float tensors; DDP and FSDP2 with
      bitsandbytes train it), ``state_dict_type="sharded"`` and ``save_distributed_checkpoint=True`` (resuming
      loads every key, frozen ones included, through torch.distributed.checkpoint: Lightning #20274).
    - Costs: Lightning builds every full checkpoint by gathering the whole model on rank 0 (on CPU) before the
      callback drops the frozen tensors; FSDPStrategy's exports do the same, and it allocates gradients for
      whole flat parameters, frozen base included (torch warns about it). FSDP2's exports gather only the LoRA
      tensors, and its gradients are LoRA-sized.
    """

    def __init__(
        self,
        config: LoRAConfig | None = None,
        *,
        r: int | None = None,
        alpha: float | None = None,
        dropout: float | None = None,
        target_modules: list[str] | str | None = None,
        exclude_modules: list[str] | str | None = None,
        layers_to_transform: int | list[int] | None = None,
        layers_pattern: str | list[str] | None = None,
        bias: Literal["none", "all", "lora_only"] | None = None,
        modules_to_save: list[str] | None = None,
        use_rslora: bool | None = None,
        use_dora: bool | None = None,
        init: Literal["kaiming", "gaussian"] | None = None,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        quantize: Literal["nf4"] | None = None,
        quant_backend: Literal["bnb", "torchao"] | None = None,
        compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        base_model: str | None = None,
        task_type: str | None = None,
        adapter_dir: str | Path | None = None,
        model_attr: str | None = None,
        noop_check_steps: int | None = 10,
    ) -> None:
        fields = {k: v for k, v in locals().items() if k in _CONFIG_FIELDS and v is not None}
        self.config = checked_config(config).replace(**fields)
        # "~" expanded, as Lightning does for default_root_dir and ModelCheckpoint's dirpath (YAML configs use it)
        self.adapter_dir = Path(adapter_dir).expanduser() if adapter_dir is not None else None
        if self.adapter_dir is not None and self.adapter_dir.exists() and not self.adapter_dir.is_dir():
            raise ConfigError(f"adapter_dir={str(adapter_dir)!r} is a file; name a folder (created if missing)")
        self.model_attr = model_attr
        if noop_check_steps is not None and noop_check_steps < 0:
            raise ConfigError(f"noop_check_steps={noop_check_steps}: must be a number of optimizer steps >= 0 "
                              f"(0 or None turns the no-op check off)")
        self.noop_check_steps = noop_check_steps
        self.summary: LoRASummary | None = None
        self._noop_checked = False
        # "last": global step, "best": ModelCheckpoint's (monitor, path, score) of the last export
        self._exported: dict[str, Any] = {}
        self._step_epoch: int | None = None  # the epoch of the last training step (Lightning's, from 0)
        self._training = False  # from on_train_start to the next setup: the checkpoints saved then are exported

    # -- public --------------------------------------------------------------------------------------------
    def apply(self, module: nn.Module) -> LoRASummary:
        """Inject the adapter into `module` (a LightningModule, or any module holding `model_attr`) now, freeze
        everything else, and make `module.load_state_dict` accept adapter-only state dicts. Idempotent.

        `setup` calls it; call it yourself before `fit` with ``ddp_spawn`` or FSDP2, and before loading
        weights outside a Trainer."""
        target = self._target(module)
        inner = _transformers_child(module) if self.model_attr is None else None
        if inner and self.config.target_modules is None and not hasattr(module, "config"):
            raise ConfigError(
                f"target_modules is not set, and {type(module).__name__} has no model type to pick defaults from: it "
                f"holds a transformers model in `self.{inner}`; set LoRACallback(model_attr={inner!r}) to adapt that "
                f"model with its type's default targets (and export an adapter that loads onto it)"
            )
        _check_existing_adapter(target, self.config)
        inject(target, self.config)
        if not any(isinstance(h, _IgnoreFrozenMissing) for h in module._load_state_dict_post_hooks.values()):
            # first time for this module (its adapter may have been loaded before: load_adapter freezes only the
            # model it loads into)
            trainable = {id(p) for p in target.parameters() if p.requires_grad}
            for param in module.parameters():
                param.requires_grad_(id(param) in trainable)
            hook = _IgnoreFrozenMissing()
            module._register_load_state_dict_pre_hook(hook.remember_prefix)  # public only from torch 2.5
            module.register_load_state_dict_post_hook(hook)
        self.summary = summarize(module)
        return self.summary

    def resolved_config(self, module: nn.Module) -> LoRAConfig:
        """The config as injected: targets filled in from the model type, ``fan_in_fan_out`` detected."""
        return adapter_configs(self._target(module))["default"]

    # -- Lightning hooks -----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if sum(isinstance(cb, LoRACallback) for cb in trainer.callbacks) > 1:
            raise ConfigError(
                "one LoRACallback per Trainer: each freezes everything but its own adapter, so a second one would "
                "freeze the first's; adapt several models with one callback (model_attr=None, target_modules "
                "naming layers in each, e.g. ['enc.0', 'dec.0'])"
            )
        self._training = False
        _check_fsdp_settings(trainer.strategy, self.config)
        if stage == "fit":
            _check_averaging_order(trainer, self)
            self._check_spawned_copy(trainer, pl_module)
        if isinstance(trainer.strategy, ModelParallelStrategy):
            # It loads a full checkpoint parameter by parameter, past the post-hook that lets frozen keys be
            # missing: let it skip them; `_before_module_load` then checks the LoRA keys, before any step.
            pl_module.strict_loading = False
        _chain(pl_module, "on_save_checkpoint", self, "_after_module_save")
        _chain(pl_module, "on_load_checkpoint", self, "_before_module_load")
        if is_overridden("configure_model", pl_module):
            _chain(pl_module, "configure_model", self, "_after_configure_model")  # the model is built there
        else:
            self._prepare(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _unchain(pl_module, "configure_model")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_sharded_injection(pl_module)
        _check_optimizers(trainer, pl_module)
        _enable_input_grads_for_checkpointing(pl_module)
        if _fsdp_root(trainer) is None or self.summary is None:  # FSDP's parameters are shards by now
            self.summary = summarize(pl_module)
        summary, config = self.summary, self.resolved_config(pl_module)
        if trainer.is_global_zero:
            from rich.console import Console

            Console().print(summary.table())
            for folder in self._write_dirs(trainer):
                remove_stale_temps(folder)
        for logger in trainer.loggers:
            logger.log_hyperparams({**_lightning_hparams(trainer), **summary.metrics(), "lora/r": config.r,
                                    "lora/alpha": config.alpha})
        _warn_unexported_statistics(self._target(pl_module), config)
        if self.model_attr is None:
            _warn_wrapped_transformers_model(pl_module)
        self._noop_checked, self._step_epoch, self._exported = False, None, {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every checkpoint restore is done by now. A best that ModelCheckpoint restored (or kept from an earlier
        # fit) was exported when its file was written, or belongs to weights this run no longer holds: export
        # `best` only when it changes from here on.
        self._exported["best"] = _best_checkpoint(trainer)
        self._training = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx == 0:  # after every callback's on_train_epoch_start, where BaseFinetuning callbacks unfreeze
            _check_only_adapter_trains(self._target(pl_module), self.resolved_config(pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._step_epoch = trainer.current_epoch  # by on_train_end Lightning has counted that epoch as done
        if self._noop_checked or not self.noop_check_steps or trainer.global_step < self.noop_check_steps:
            return
        self._noop_checked = True
        layers = [layer for _, layer in lora_layers(self._target(pl_module))]
        if layers and _all_zero_updates(trainer, layers):
            rank_zero_warn(
                f"LoRA is a no-op: after {trainer.global_step} optimizer steps every adapter update is still exactly "
                f"zero (lora_B or lora_embedding_A all zeros). The optimizer is probably not stepping the LoRA "
                f"parameters (built before injection, learning rate 0, or gradients not reaching them: with "
                f"gradient checkpointing use use_reentrant=False)."
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        target, config = self._target(pl_module), self.resolved_config(pl_module)
        checkpoint["state_dict"] = _adapter_only(pl_module, target, config, checkpoint["state_dict"])
        _drop_module_hyperparameters(checkpoint)
        checkpoint[RECORD_KEY] = {
            "config": config.to_dict(),
            "fingerprint": fingerprint(target),
            "model_attr": self.model_attr,
        }
        if self.adapter_dir is not None and self._training:
            # Not the snapshot that Lightning's Tuner (lr_find, scale_batch_size) saves before its trial steps and
            # restores after them: the weights it holds were not trained, and must not replace an exported adapter.
            self._export_checkpoint(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.adapter_dir is not None and self._exported.get("last") != trainer.global_step:
            self._export(trainer, pl_module, "last", _current_metric(trainer))
            self._exported["last"] = trainer.global_step

    # -- internals -----------------------------------------------------------------------------------------
    def _target(self, module: nn.Module) -> nn.Module:
        if self.model_attr is None:
            return module
        target: Any = module
        path = type(module).__name__
        for part in self.model_attr.split("."):
            if not hasattr(target, part):
                raise ConfigError(f"model_attr={self.model_attr!r}: {path} has no attribute {part!r}; fix "
                                  f"model_attr, or build the model in __init__ or configure_model")
            target, path = getattr(target, part), f"{path}.{part}"
        if not isinstance(target, nn.Module):
            raise ConfigError(
                f"model_attr={self.model_attr!r}: {path} is {type(target).__name__}, not a module; build it in "
                f"__init__ or configure_model, or fix model_attr"
            )
        return target

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _check_spawned_copy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to inject into a spawned copy (ddp_spawn, ddp_fork) of a model the user's module holds: Lightning
        hands back to it only the keys it had before fit, so the adapter would vanish without a word. Whether or
        not `configure_model` is overridden: a model built in ``__init__`` comes back the same way."""
        if not isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            return
        try:
            target = self._target(pl_module)
        except ConfigError:  # built in configure_model, in the new processes only
            return
        if not adapter_configs(target):
            raise ConfigError(
                f"strategy {type(trainer.strategy).__name__} with start method "
                f"{trainer.strategy.launcher._start_method!r} trains copies of the module in new processes "
                f"and hands back only the tensors the module had before fit, so an adapter injected there "
                f"would be lost: call lora_callback.apply(module) before trainer.fit, or use strategy='ddp'"
            )

    def _after_configure_model(self, pl_module: pl.LightningModule) -> None:
        self._prepare(pl_module.trainer, pl_module)

    def _after_module_save(self, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Lightning skips Callback.on_save_checkpoint for weights-only saves (ModelCheckpoint(save_weights_only=
        # True), trainer.save_checkpoint(weights_only=True)); the module's hook always runs, after the callbacks'.
        # A callback after this one may have put a whole model back (EMAWeightAveraging writes its averaged copy):
        # cut it down again; StochasticWeightAveraging keeps its whole averaged copy in its own state.
        if RECORD_KEY not in checkpoint:
            self.on_save_checkpoint(pl_module.trainer, pl_module, checkpoint)
        target, config = self._target(pl_module), self.resolved_config(pl_module)
        checkpoint["state_dict"] = _adapter_only(pl_module, target, config, checkpoint["state_dict"])
        for state in checkpoint.get("callbacks", {}).values():
            if isinstance(state, dict) and isinstance(state.get("average_model_state"), dict):
                state["average_model_state"] = _adapter_only(pl_module, target, config, state["average_model_state"])

    def _before_module_load(self, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # The module's on_load_checkpoint runs right before its load_state_dict (the callbacks' only after it),
        # so a checkpoint of another config or base is refused here with a clear message.
        if RECORD_KEY in checkpoint:
            where = getattr(pl_module._trainer, "ckpt_path", None) or "the checkpoint"
            _check_record(_checked_record(checkpoint[RECORD_KEY], where), self.resolved_config(pl_module),
                          fingerprint(self._target(pl_module)), where)
            if isinstance(pl_module.trainer.strategy, ModelParallelStrategy) and "state_dict" not in checkpoint:
                _check_lora_keys(where, pl_module)  # it has loaded (not strictly) and dropped the state dict

    def _export_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due: list[tuple[str, tuple[str, float] | None]] = []
        if self._exported.get("last") != trainer.global_step:  # top-k and save_last saves share a step
            due.append(("last", _current_metric(trainer)))
            self._exported["last"] = trainer.global_step
        best = _best_checkpoint(trainer)
        if best is not None and self._exported.get("best") != best:
            due.append(("best", (best[0], best[2])))
            self._exported["best"] = best
        if _is_sharded(trainer, self._target(pl_module)):  # every rank must join each gather: rank 0 decides
            due = trainer.strategy.broadcast(due)
        for name, metric in due:
            self._export(trainer, pl_module, name, metric)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str,
                metric: tuple[str, float] | None) -> None:
        """Write the adapter on global rank 0. Called on every rank: sharded tensors are gathered first. Never in a
        ``fast_dev_run``, for which Lightning writes no checkpoint or log either: a debug run must not replace a
        trained adapter."""
        if trainer.fast_dev_run:
            return
        with _whole_parameters(trainer, self._target(pl_module)):
            if trainer.is_global_zero:
                self._write_export(trainer, _averaged_module(trainer) or pl_module, name, metric)

    def _write_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str,
                      metric: tuple[str, float] | None) -> None:
        from .card import render_card

        target = self._target(pl_module)
        summary = self.summary or summarize(pl_module)
        config = self.resolved_config(pl_module)
        base_model = config.base_model or getattr(getattr(target, "config", None), "_name_or_path", None) or None
        figures: dict[str, Any] = {
            "trainable_params": summary.trainable, "total_params": summary.total,
            "trainable_ratio": summary.ratio, "global_step": trainer.global_step,
            "epoch": trainer.current_epoch if self._step_epoch is None else self._step_epoch,
        }
        if metric is not None:
            figures[metric[0]] = metric[1]
        card = render_card(config.replace(base_model=base_model), metrics=figures, extra=_versions_markdown(),
                           architecture=architecture(target))
        save_adapter(target, self.adapter_dir / name, base_model=base_model, metadata=figures, card=card)

    def _write_dirs(self, trainer: pl.Trainer) -> list[Path]:
        dirs = [self.adapter_dir / "last", self.adapter_dir / "best"] if self.adapter_dir is not None else []
        return dirs + [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
                       if isinstance(cb, ModelCheckpoint) and cb.dirpath]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but local files go through `io.atomic_write` (temporary file beside the
    target, fsync, rename): a crash mid-save leaves the previous file, never a truncated one. (Lightning's own
    writer stages in the system temp folder and moves, which is a copy across file systems.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)


def load_lora_checkpoint(module: nn.Module | type[pl.LightningModule], ckpt_path: str | Path,
                         **kwargs: Any) -> nn.Module:
    """`LightningModule.load_from_checkpoint` for LoRACallback's adapter-only checkpoints.

    `module` is either a built module holding the base model (as for training; a LightningModule's
    `configure_model` runs first, as in ``load_from_checkpoint``), or a LightningModule class, then built with
    ``load_from_checkpoint(ckpt_path, **kwargs)`` from its saved hyperparameters. The saved
    LoRA config is injected and the saved tensors (trainable ones, running statistics) loaded, strictly: a
    missing or extra LoRA key, another shape or another base model raises. Returns the module::

        model = load_lora_checkpoint(MyModule, "checkpoints/epoch=2-step=300.ckpt")
    """
    data = Path(ckpt_path).expanduser().read_bytes()  # read once: a LightningModule class is built from them too
    checkpoint, record = _lora_checkpoint(data, ckpt_path, module)
    if isinstance(module, type):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found keys that are")  # the LoRA keys, loaded below
            module = module.load_from_checkpoint(_bytes_io.BytesIO(data), strict=False, **kwargs)
    elif isinstance(module, pl.LightningModule) and is_overridden("configure_model", module):
        module.configure_model()  # the model may exist only once it ran (idempotent, as Lightning requires)
    config = {k: v for k, v in record["config"].items() if k in _CONFIG_FIELDS}
    callback = LoRACallback(LoRAConfig(**config), model_attr=record["model_attr"])
    callback.apply(module)
    _check_record(record, callback.resolved_config(module), fingerprint(callback._target(module)), ckpt_path)
    module.load_state_dict(_keys_as_in(module, checkpoint["state_dict"]), strict=True)
    return module


# -- helpers -----------------------------------------------------------------------------------------------
def _lora_checkpoint(data: bytes, ckpt_path: Any, module: Any) -> tuple[dict, dict]:
    """The checkpoint in `data` and its LoRACallback record, both checked for shape before anything uses them:
    ConfigError naming `ckpt_path` for a file that is not one. A file needing more than ``weights_only`` (a
    pickle of arbitrary objects) is refused, never unpickled: it can run code."""
    try:
        checkpoint = torch.load(_bytes_io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise ConfigError(f"{ckpt_path} is not a checkpoint of tensors and plain data, as LoRACallback writes: "
                          f"torch.load(weights_only=True) refused it{f' (it holds a {needs[1]})' if needs else ''}. "
                          f"It is corrupt or was written by something else; loading it with weights_only=False runs "
                          f"any code it holds, so do that only for a file from a trusted source") from err
    record = checkpoint.get(RECORD_KEY) if isinstance(checkpoint, dict) else None
    if record is None:
        raise ConfigError(f"{ckpt_path} holds no {RECORD_KEY!r} record: it was not written by LoRACallback; "
                          f"use {getattr(module, '__name__', 'the module')}.load_from_checkpoint instead")
    record = _checked_record(record, ckpt_path)
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConfigError(f"{ckpt_path}: its state_dict is not a dict of tensors: the file is corrupt or was not "
                          f"written by LoRACallback")
    return checkpoint, record


def _checked_record(record: Any, ckpt_path: Any) -> dict[str, Any]:
    """`record`, a checkpoint's RECORD_KEY entry, if it has the shape LoRACallback writes; else ConfigError."""
    if not (isinstance(record, dict) and isinstance(record.get("config"), dict) and "model_attr" in record
            and isinstance(record["model_attr"], (str, type(None)))):
        raise ConfigError(f"{ckpt_path}: its {RECORD_KEY!r} record (config, model_attr) is malformed: the file "
                          f"is corrupt or was not written by LoRACallback")
    return record


class _IgnoreFrozenMissing:
    """``load_state_dict`` post-hook: an adapter-only state dict lacks the frozen tensors, so their names are
    dropped from ``missing_keys``; a missing trainable (LoRA) key still fails a strict load. A class, not a
    closure, so the module stays picklable.

    Loaded as part of a larger module (``outer.load_state_dict``), the module's hook sees the whole load's missing
    keys, named from the outer module: its pre-hook half records the prefix the module is loaded under, so that
    only this module's frozen keys are dropped, not its LoRA keys or other modules' keys. Prefix and keys are
    compared without wrapper segments: FSDP loads the module under ``_fsdp_wrapped_module.`` but reports the
    missing keys without it."""

    prefix = ""

    def remember_prefix(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.prefix = _clean(prefix)

    def __call__(self, module: nn.Module, incompatible: Any) -> None:
        trainable, prefix = _trainable_names(module), self.prefix
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                        if not _clean(k).startswith(prefix) or _clean(k)[len(prefix):] in trainable]


class _Chain:
    """Replaces ``module.<hook>`` on the instance: runs the original, then ``callback.<after>(module, *args)``
    while the module's Trainer holds that callback (a later Trainer without it sees a plain LightningModule).
    Picklable (no closure); ``__wrapped__`` keeps Lightning's `is_overridden` answering as before."""

    def __init__(self, original: Any, callback: LoRACallback, after: str) -> None:
        self.__wrapped__ = original
        self.callback = callback
        self.after = after

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.__wrapped__(*args, **kwargs)
        module = self.__wrapped__.__self__
        if module._trainer is not None and self.callback in module._trainer.callbacks:
            getattr(self.callback, self.after)(module, *args, **kwargs)
        return out


def _chain(module: nn.Module, hook: str, callback: LoRACallback, after: str) -> None:
    current = module.__dict__.get(hook)
    if isinstance(current, _Chain):
        current.callback = callback  # a later Trainer's callback takes over
        return
    module.__dict__[hook] = _Chain(getattr(module, hook), callback, after)


def _unchain(module: nn.Module, hook: str) -> None:
    if isinstance(module.__dict__.get(hook), _Chain):
        del module.__dict__[hook]


def _keys_as_in(module: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` with its keys spelled as `module`'s own, as to `torch.compile`'s ``_orig_mod`` segments: a
    checkpoint written while a submodule was compiled (``self.model = torch.compile(model)``) loads into the plain
    module, and the other way round."""
    own = {_uncompiled(k): k for k in module.state_dict()}
    return {own.get(_uncompiled(k), k): v for k, v in state_dict.items()}


def _uncompiled(name: str) -> str:
    return ".".join(p for p in name.split(".") if p != "_orig_mod")


def _trainable_names(module: nn.Module) -> set[str]:
    return {_clean(n) for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


def _clean(name: str) -> str:
    """A parameter name as state dicts spell it: without FSDP's (auto-wrap) and activation checkpointing's
    wrapper segments. (`torch.compile`'s ``_orig_mod`` stays: the compiled module's state dict keeps it.)"""
    return ".".join(p for p in name.split(".") if p not in _FSDP_WRAPPERS)


def _adapter_only(module: nn.Module, target: nn.Module, config: LoRAConfig,
                  state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` cut down to the trainable tensors plus the buffers that training changes and resuming or
    loading needs: those of modules_to_save and normalization layers' running statistics (updated in training
    mode even when frozen). Other frozen buffers are constant and stay out. The adapter's own tensors are kept even
    while frozen (a BaseFinetuning callback that trains the head first, LoRA from a later epoch): A starts random,
    so resuming or loading needs it."""
    params = _adapter_param_ids(target, config)
    buffers = {id(b) for b in extra_buffers(target, config).values()}
    buffers |= {id(b) for m in module.modules() if _tracks_statistics(m) for b in m.buffers(recurse=False)}
    keep = _trainable_names(module) | {_clean(n) for n, p in module.named_parameters(remove_duplicate=False)
                                       if id(p) in params}
    keep |= {_clean(n) for n, b in module.named_buffers(remove_duplicate=False) if id(b) in buffers}
    return {k: v for k, v in state_dict.items() if _clean(k) in keep}


def _drop_module_hyperparameters(checkpoint: dict[str, Any]) -> None:
    """Leave out the hyperparameters that are modules (``self.save_hyperparameters()`` in an ``__init__`` taking
    the model, which Lightning only warns about): pickled whole, they put the full base model back into the
    adapter-only checkpoint, and `torch.load(weights_only=True)` (resume, `load_lora_checkpoint`) cannot read it.
    Loading the module from its class then needs them again: ``load_lora_checkpoint(MyModule, ckpt, model=...)``."""
    for key in (pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY, pl.LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY):
        hparams = checkpoint.get(key)
        if isinstance(hparams, dict) and any(isinstance(v, nn.Module) for v in hparams.values()):
            checkpoint[key] = {k: v for k, v in hparams.items() if not isinstance(v, nn.Module)}


def _tracks_statistics(module: nn.Module) -> bool:
    return isinstance(module, _NormBase) and module.track_running_stats


def _warn_unexported_statistics(target: nn.Module, config: LoRAConfig) -> None:
    """Warn about normalization layers whose running statistics the PEFT export cannot carry: PEFT saves only
    the adapter and modules_to_save, so such an export runs with the base model's statistics."""
    saved = {id(b) for b in extra_buffers(target, config).values()}
    names = [_clean(path) for path, m in target.named_modules()
             if _tracks_statistics(m) and any(id(b) not in saved for b in m.buffers(recurse=False))]
    if names:
        rank_zero_warn(
            f"LoRA: {len(names)} normalization layer(s) outside modules_to_save track running statistics "
            f"({names[:8]}{' ...' if len(names) > 8 else ''}). Training updates them although they are frozen; "
            f"the adapter-only checkpoints keep them, but the PEFT export cannot, so an exported adapter would "
            f"run with the base model's statistics: add them to modules_to_save."
        )


def _warn_wrapped_transformers_model(pl_module: pl.LightningModule) -> None:
    """Without `model_attr` the export's keys start at the LightningModule (``base_model.model.model.model...``
    for a transformers model in ``self.model``): PEFT and transformers, loading it onto that model, would find
    none of its keys and run the bare base."""
    name = _transformers_child(pl_module)
    if name is not None:
        rank_zero_warn(f"LoRA: the LightningModule holds a transformers model in `self.{name}`; set "
                       f"LoRACallback(model_attr={name!r}) so that the PEFT export loads onto that model (without it "
                       f"the export's keys start at the LightningModule and PEFT or transformers would load none)")


def _lightning_hparams(trainer: pl.Trainer) -> dict[str, Any]:
    """The hyperparameters Lightning logs right after `on_fit_start` (the module's and the datamodule's, as its
    `_log_hyperparams` merges them). LoRA's figures go out together with them: TensorBoard's HParams view keeps the
    first set a run logs, so the figures alone would hide the user's hyperparameters there."""
    module, data = trainer.lightning_module, trainer.datamodule
    merged = {**(module.hparams_initial if module._log_hyperparams else {}),
              **(data.hparams_initial if data is not None and data._log_hyperparams else {})}
    return {k: v for k, v in merged.items() if k != "_class_path"}


def _transformers_child(module: nn.Module) -> str | None:
    """The attribute of `module` holding a transformers model (``self.model``), if any."""
    return next((n for n, m in module.named_children() if hasattr(m, "config") and hasattr(m, "save_pretrained")), None)


def _fsdp_root(trainer: pl.Trainer) -> nn.Module | None:
    """The strategy's model when FSDP (1) shards it, else None. Its parameters are then flat 1-D shards:
    counting, reading or exporting them needs the pre-wrap summary or a gather."""
    model = trainer.strategy.model
    if model is None or not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return model if FSDP.fsdp_modules(model) else None


def _is_dtensor(param: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def _is_sharded(trainer: pl.Trainer, target: nn.Module) -> bool:
    """Whether the LoRA tensors are split across ranks (FSDP, or FSDP2's DTensors), so reading them is a
    collective."""
    return _fsdp_root(trainer) is not None or any(_is_dtensor(p) for p in target.parameters() if p.requires_grad)


@contextmanager
def _whole_parameters(trainer: pl.Trainer, target: nn.Module) -> Iterator[None]:
    """Inside, global rank 0's `target` holds whole trainable tensors. A collective when they are sharded:
    every rank must enter. FSDP (1): `summon_full_params`, on rank 0 only and offloaded to CPU on accelerators,
    as Lightning's own full checkpoints do (offloading CPU tensors "to CPU" crashes torch's FSDP, so not there).
    FSDP2: each trainable DTensor is gathered (`full_tensor`, LoRA-sized) and swapped in, then put back."""
    root = _fsdp_root(trainer)
    if root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        offload = trainer.strategy.root_device.type != "cpu"
        with FSDP.summon_full_params(root, writeback=False, rank0_only=True, offload_to_cpu=offload):
            yield
        return
    sharded = [(module, name, param) for module in target.modules() for name, param in module._parameters.items()
               if param is not None and param.requires_grad and _is_dtensor(param)]
    whole = [param.full_tensor() for _, _, param in sharded]
    try:
        for (module, name, _), tensor in zip(sharded, whole):
            module._parameters[name] = nn.Parameter(tensor, requires_grad=True)
        yield
    finally:
        for module, name, param in sharded:
            module._parameters[name] = param


def _check_fsdp_settings(strategy: Any, config: LoRAConfig) -> None:
    """Refuse, before any work, FSDP settings under which LoRA cannot train or resume."""
    if isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint:
        raise ConfigError(
            "ModelParallelStrategy(save_distributed_checkpoint=True) cannot resume from LoRACallback's adapter-only "
            "checkpoints: torch.distributed.checkpoint loads every model key, frozen ones included. Use "
            "ModelParallelStrategy(save_distributed_checkpoint=False): the checkpoint holds only the LoRA tensors"
        )
    if not isinstance(strategy, FSDPStrategy):
        return
    if not strategy.kwargs.get("use_orig_params", False):
        raise ConfigError(
            "FSDPStrategy(use_orig_params=False) cannot train LoRA: a flat parameter needs one requires_grad for "
            "all its tensors, and LoRA's A/B sit beside their frozen base weight. Use "
            "FSDPStrategy(use_orig_params=True) (Lightning's default)"
        )
    if config.quantize is not None:  # else torch fails inside the wrap ("Must flatten tensors with uniform dtype")
        raise ConfigError(
            f"FSDPStrategy cannot train LoRA on a quantize={config.quantize!r} base: a flat parameter holds one dtype, "
            f"and the 4-bit base weights are packed (uint8, or torchao's NF4Tensor) beside float tensors. Use "
            f"strategy='ddp', or ModelParallelStrategy (FSDP2) with quant_backend='bnb'"
        )
    if strategy._state_dict_type != "full":
        raise ConfigError(
            "FSDPStrategy(state_dict_type='sharded') cannot resume from LoRACallback's adapter-only checkpoints: "
            "Lightning loads every model key through torch.distributed.checkpoint, frozen ones included "
            "(Lightning-AI/pytorch-lightning#20274). Use FSDPStrategy(state_dict_type='full'): the checkpoint "
            "holds only the LoRA tensors anyway"
        )


def _check_averaging_order(trainer: pl.Trainer, callback: LoRACallback) -> None:
    """Lightning's WeightAveraging (EMA, SWA) copies the module in its own `setup`: listed before LoRACallback, it
    copies the model without the adapter, and its first update fails on mismatched shapes, or its average misses
    the LoRA weights."""
    early = _weight_averaging(trainer.callbacks[:trainer.callbacks.index(callback)])
    if early is not None:
        raise ConfigError(f"{type(early).__name__} is listed before LoRACallback in Trainer(callbacks=[...]): it "
                          f"copies the model in its setup, before LoRA is injected, so its average would lack the "
                          f"adapter; list LoRACallback first")


def _check_existing_adapter(target: nn.Module, config: LoRAConfig) -> None:
    """Refuse to train an adapter the model already holds (``load_adapter`` before fit) under another config
    (`inject` would raise, advising an adapter name the callback does not take), or as QLoRA on a full-precision
    base (`inject` would keep the base as it is, in silence)."""
    existing = adapter_configs(target).get("default")
    if existing is None:
        return
    wanted = resolve_config(target, config)
    if not same_adapter(target, existing, wanted):
        diff = _differences(existing.to_dict(), wanted.to_dict(), "in the model", "in LoRACallback")
        raise ConfigError(
            f"the model already holds adapter 'default' (loaded with load_adapter?) with another config "
            f"({diff}); to continue training it, give LoRACallback its config "
            f"(LoRACallback(validate_adapter(folder).config, ...)), or delete_adapter(model, 'default') to train a "
            f"new one"
        )
    if wanted.quantize and not all(is_quantized(layer.base_layer) for _, layer in lora_layers(target)):
        raise ConfigError(
            f"LoRACallback(quantize={wanted.quantize!r}), but the model's adapter 'default' (loaded with "
            f"load_adapter?) sits on full-precision base layers, which cannot be quantized under it: call "
            f"quantize_model(model, config) before load_adapter, or leave quantize out to train on the full base"
        )


def _differences(old: dict[str, Any], new: dict[str, Any], old_label: str, new_label: str) -> str:
    """The fields on which two `LoRAConfig.to_dict`s differ, for error messages (not the base model's name, nor
    ``fan_in_fan_out``, which injection detects)."""
    return "; ".join(f"{k}: {old.get(k)!r} {old_label}, {new[k]!r} {new_label}" for k in sorted(new)
                     if k not in ("base_model", "fan_in_fan_out") and old.get(k, new[k]) != new[k])


def _check_record(record: dict[str, Any], config: LoRAConfig, base_fingerprint: str, ckpt_path: Any) -> None:
    diff = _differences(record.get("config", {}), config.to_dict(), "in the checkpoint", "now")
    if diff:
        raise ConfigError(f"{ckpt_path} was written with another LoRA config ({diff}); resume with the "
                          f"same LoRACallback settings, or start a new run without ckpt_path")
    if record.get("fingerprint") != base_fingerprint:
        raise ConfigError(f"{ckpt_path} was trained on another base model: the adapted layers' names or shapes "
                          f"differ from this model's; load the base it was trained on")


def _averaged_module(trainer: pl.Trainer) -> nn.Module | None:
    """The averaged copy of the module that a WeightAveraging callback (EMA, SWA) keeps during fit, else None.
    Its checkpoints hold that copy's weights as the model's (the live ones go to ``current_model_state``) and it
    copies them into the module when training ends, so the exports must carry them too. (Lightning keeps the copy
    in the private ``_average_model``, an ``AveragedModel`` whose ``module`` holds the injected adapter.)"""
    average = getattr(_weight_averaging(trainer.callbacks), "_average_model", None)
    return average.module if average is not None else None


def _weight_averaging(callbacks: list[Callback]) -> Callback | None:
    """The first of Lightning's WeightAveraging callbacks (EMA, SWA; Lightning >= 2.6) among `callbacks`."""
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:
        return None
    return next((cb for cb in callbacks if isinstance(cb, WeightAveraging)), None)


def _check_sharded_injection(pl_module: nn.Module) -> None:
    """FSDP2 shards the parameters that exist when `fully_shard` runs: LoRA injected later stays a plain tensor
    on every rank whose gradients are never synchronized, so the ranks would silently drift apart."""
    params = list(pl_module.named_parameters())
    if not any(_is_dtensor(p) for _, p in params):
        return
    plain = [n for n, p in params if p.requires_grad and not _is_dtensor(p)]
    if plain:
        raise ConfigError(
            f"{len(plain)} LoRA parameters are not sharded (e.g. {plain[0]!r}) while the model is (FSDP2): LoRA "
            f"was injected after fully_shard. Call LoRACallback.apply(self) in configure_model before fully_shard"
        )


def _check_lora_keys(ckpt_path: str | Path, pl_module: nn.Module) -> None:
    """Raise if the checkpoint at `ckpt_path` lacks a LoRA tensor of `pl_module` (a non-strict load would
    silently keep the fresh initialization)."""
    saved = torch.load(Path(ckpt_path), map_location="cpu", mmap=True, weights_only=True).get("state_dict", {})
    missing = sorted(_trainable_names(pl_module) - {_clean(k) for k in saved})
    if missing:
        raise ConfigError(f"{ckpt_path} lacks {len(missing)} of the LoRA tensors (e.g. {missing[0]!r}): it was "
                          f"written with other target modules, or edited; resume from a checkpoint of this run")


def _check_optimizers(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise if a trainable parameter is in no optimizer (the optimizer was built before injection, so LoRA
    would silently stay at zero); warn about frozen parameters in an optimizer."""
    if not trainer.optimizers:
        return
    in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    params = list(pl_module.named_parameters())
    frozen = [n for n, p in params if not p.requires_grad and id(p) in in_optimizer]
    if frozen:
        rank_zero_warn(f"{len(frozen)} frozen parameters are in an optimizer (e.g. {frozen[0]!r}); they never "
                       f"train. Pass only [p for p in self.parameters() if p.requires_grad].")
    missing = [n for n, p in params if p.requires_grad and id(p) not in in_optimizer]
    if missing:
        raise RuntimeError(
            f"{len(missing)} LoRA parameters are in no optimizer (e.g. {missing[0]!r}): the optimizer was built "
            f"before LoRACallback injected them (in __init__?). Build it in configure_optimizers from "
            f"[p for p in self.parameters() if p.requires_grad]."
        )


def _check_only_adapter_trains(target: nn.Module, config: LoRAConfig) -> None:
    """Raise if a parameter of the adapted model outside the adapter trains: something unfroze the base after
    injection (a BaseFinetuning callback such as BackboneFinetuning unfreezes whole modules at some epoch). The
    checkpoints would keep those weights, but the PEFT export carries only the adapter and modules_to_save, so it
    would silently lack them. (Parameters outside `model_attr` are not the export's to carry.)"""
    adapter = _adapter_param_ids(target, config)
    outside = [_clean(n) for n, p in target.named_parameters() if p.requires_grad and id(p) not in adapter]
    if outside:
        raise ConfigError(
            f"{len(outside)} parameters outside the LoRA adapter are trainable (e.g. {outside[0]!r}): something "
            f"unfroze them after LoRACallback froze the base (BackboneFinetuning or another BaseFinetuning "
            f"callback?). The exported adapter carries only LoRA and modules_to_save, so it would lack them: keep "
            f"the base frozen, or list the modules to train whole in modules_to_save"
        )


def _adapter_param_ids(target: nn.Module, config: LoRAConfig) -> set[int]:
    """The ids of the adapter's own parameters (A, B, DoRA magnitudes, modules_to_save, trained biases), whether
    or not they require grad right now."""
    ids = {id(p) for _, layer in lora_layers(target) for name in layer.lora_a for p in layer.adapter_params(name)}
    return ids | {id(p) for p in extra_trainable(target, config).values()}


def _enable_input_grads_for_checkpointing(pl_module: nn.Module) -> None:
    """The frozen-input trap: with reentrant gradient checkpointing, a checkpointed block whose inputs do not
    require grad gets no gradient at all, and a frozen base means no input does. Make the embeddings' output
    require grad (transformers' `enable_input_require_grads`) on every checkpointing transformers model."""
    done: list[str] = []
    for path, module in pl_module.named_modules():
        if any(path.startswith(p) for p in done) or not _is_checkpointing(module):
            continue
        if hasattr(module, "enable_input_require_grads"):
            if not getattr(module, "_require_grads_hooks", None):
                module.enable_input_require_grads()
                rank_zero_info(f"LoRA: gradient checkpointing on {type(module).__name__}: input grads enabled")
            done.append(path + "." if path else "")


def _is_checkpointing(module: nn.Module) -> bool:
    # transformers >= 5 renamed is_gradient_checkpointing (which now warns) to is_activation_checkpointing.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(module), name, None), property):
            return bool(getattr(module, name))
    return False


def _all_zero_updates(trainer: pl.Trainer, layers: list[nn.Module]) -> bool:
    """Whether every layer's update ``B A`` is exactly zero (all its B, or all its A, zero). The sums of
    absolute values are added across ranks (a collective): under FSDP each rank holds only a shard."""
    def abs_sum(params: nn.ParameterDict) -> torch.Tensor:
        local = [p.to_local() if _is_dtensor(p) else p for p in params.values()]
        return torch.stack([p.detach().abs().float().sum() for p in local]).sum()

    sums = torch.stack([torch.stack([abs_sum(layer.lora_a), abs_sum(layer.lora_b)]) for layer in layers])
    sums = trainer.strategy.reduce(sums, reduce_op="sum")
    return bool((sums == 0).any(dim=1).all())


def _best_checkpoint(trainer: pl.Trainer) -> tuple[str, str, float] | None:
    """The first monitoring ModelCheckpoint's best as (monitor, path, score); None while it has none, or while its
    score is unknown (resuming into another folder, Lightning restores only `best_model_path`)."""
    best = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)
    if best is None or not best.best_model_path or best.best_model_score is None:
        return None
    return best.monitor, best.best_model_path, float(best.best_model_score)


def _current_metric(trainer: pl.Trainer) -> tuple[str, float] | None:
    monitor = next((cb.monitor for cb in trainer.checkpoint_callbacks
                    if isinstance(cb, ModelCheckpoint) and cb.monitor), None)
    value = trainer.callback_metrics.get(monitor) if monitor else None
    return (monitor, float(value)) if value is not None else None


def _versions_markdown() -> str:
    import lightning
    import transformers

    from . import __version__

    rows = [("lightning-lora", __version__), ("torch", torch.__version__), ("lightning", lightning.__version__),
            ("transformers", transformers.__version__)]
    return "## Framework versions\n\n" + "\n".join(f"- {name} {version}" for name, version in rows) + "\n"
