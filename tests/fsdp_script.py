"""2-process FSDP runs (CPU, gloo) of LoRACallback, launched by tests/test_fsdp.py in a subprocess (Lightning
re-executes this script for rank 1, which a pytest process cannot do).

    python tests/fsdp_script.py ROOT fsdp    # FSDPStrategy: a 2-epoch run, and one resumed from its epoch 0
    python tests/fsdp_script.py ROOT fsdp2   # the same with ModelParallelStrategy (FSDP2's fully_shard), then two
                                             # runs to refuse: sharding before injecting, a ckpt lacking a LoRA key

FSDP wraps every GPT-2 block in its own unit (FULL_SHARD, use_orig_params) with activation checkpointing, so
parameter names carry FSDP's and checkpointing's wrapper segments; FSDP2 shards every block and the model, the
documented way (`LoRACallback.apply` before `fully_shard` in ``configure_model``). After each run every rank
gathers the LoRA tensors and computes logits through the sharded model; rank 0 saves them to ROOT/report.

Lightning refuses FSDPStrategy without a GPU, and two things differ on CPU only; the script adapts Lightning's
strategy for them, never the callback: FSDP needs ``device_id=cpu`` (Lightning passes the CUDA index, None here:
`CPUFSDPStrategy`), and torch's FSDP crashes (SIGSEGV) offloading full state dicts "to CPU" from CPU, which
Lightning always asks for (`_full_state_dict_on_cpu` replaces its context). ModelParallelStrategy runs unchanged.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lit_models import CausalLM, token_loader, trainer_kwargs
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.tensor import DTensor

#: c_attn's LoRA tensors land in rank 0's shard of each block, c_fc's in rank 1's: the export must gather.
TARGETS = ["c_attn", "c_fc"]


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU: a subclass (Lightning's GPU check tests ``type(...) is FSDPStrategy``)
    that wraps with ``device_id=cpu``. Auto-wrap policy and the rest are applied by the parent."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        policy = self.kwargs.pop("auto_wrap_policy", None)
        model = FSDP(model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                     auto_wrap_policy=policy, **self.kwargs)
        return super()._setup_model(model)


def _full_state_dict_on_cpu(module: nn.Module, world_size: int,
                            rank0_only: bool = True) -> AbstractContextManager:
    """Lightning's full state dict context without ``offload_to_cpu``, which crashes when already on CPU."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


class ShardedLM(CausalLM):
    """FSDP2 the documented way: `configure_model` injects LoRA (``self.lora.apply``) before `fully_shard`."""

    def configure_model(self) -> None:
        if isinstance(self.model, FSDPModule):  # already built (a second fit)
            return
        if self.lora is not None:
            self.lora.apply(self)
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def run(root: Path, kind: str, name: str, max_epochs: int, ckpt_path: str | None = None,
        apply_first: bool = True) -> ModelCheckpoint:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from lightning_lora import LoRACallback
    from lightning_lora.callback import _clean

    L.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=root / name / "ckpt", save_top_k=-1, monitor="val_loss")
    callback = LoRACallback(r=4, alpha=8, target_modules=TARGETS, model_attr="model",
                            adapter_dir=root / name / "adapter")
    if kind == "fsdp":
        module = CausalLM(scheduler=True)
        strategy = CPUFSDPStrategy(auto_wrap_policy={GPT2Block}, activation_checkpointing_policy={GPT2Block},
                                   timeout=timedelta(seconds=60))
    else:
        module = ShardedLM(scheduler=True)
        module.lora = callback if apply_first else None
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False, timeout=timedelta(seconds=60))
    trainer = L.Trainer(**trainer_kwargs(root, devices=2, strategy=strategy, callbacks=[callback, checkpoint],
                                         max_epochs=max_epochs))
    trainer.fit(module, ckpt_path=ckpt_path)

    model = trainer.strategy.model
    model.eval()
    with torch.no_grad():
        logits = model(token_loader().dataset[:2])  # a collective: every rank runs it
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    shards = {n: (p.to_local() if isinstance(p, DTensor) else p).numel() for n, p in trainable}
    if kind == "fsdp":
        with FSDP.summon_full_params(model, writeback=False):
            weights = {_clean(n): p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    else:
        weights = {n: p.full_tensor().detach() for n, p in trainable}
    summary = callback.summary
    report = {"weights": weights, "logits": logits, "global_step": trainer.global_step, "shards": shards,
              "trainable": summary.trainable, "total": summary.total,
              "best": Path(checkpoint.best_model_path).name}
    torch.save(report, root / "report" / f"{kind}-{name}-rank{trainer.global_rank}.pt")
    return checkpoint


def refused(root: Path, tag: str, **kwargs) -> None:
    """A run LoRACallback must refuse (ConfigError) on every rank; each rank writes the message to ROOT/report."""
    from lightning_lora import ConfigError

    try:
        run(root, "fsdp2", tag, 1, **kwargs)
    except ConfigError as error:
        rank = os.environ.get("LOCAL_RANK", "0")  # set by Lightning's launcher for rank 1 only
        (root / "report" / f"{tag}-rank{rank}.txt").write_text(str(error))


if __name__ == "__main__":
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    lightning_fsdp._get_full_state_dict_context = _full_state_dict_on_cpu
    ROOT, KIND = Path(sys.argv[1]), sys.argv[2]
    if KIND not in ("fsdp", "fsdp2"):
        raise SystemExit(f"unknown kind {KIND!r}: use 'fsdp' or 'fsdp2'")
    (ROOT / "report").mkdir(parents=True, exist_ok=True)
    first = ROOT / "whole" / "ckpt" / "epoch=0-step=2.ckpt"
    run(ROOT, KIND, "whole", 2)
    run(ROOT, KIND, "resumed", 2, ckpt_path=str(first))
    if KIND == "fsdp2":
        refused(ROOT, "late", apply_first=False)  # fully_shard before LoRACallback.apply
        edited = torch.load(first, weights_only=True)
        edited["state_dict"].popitem()  # a LoRA tensor missing: the non-strict load must not hide it
        path = ROOT / f"edited-rank{os.environ.get('LOCAL_RANK', '0')}.ckpt"
        torch.save(edited, path)
        refused(ROOT, "edited", ckpt_path=str(path))
    if torch.distributed.is_initialized():  # join gloo's threads before exit: left to the interpreter's shutdown
        torch.distributed.destroy_process_group()  # they can abort the process ("terminate called ...")
