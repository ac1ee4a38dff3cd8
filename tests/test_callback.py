"""LoRACallback on real Lightning Trainers (CPU, tiny models): training, adapter-only checkpoints, exact
resume, PEFT export, the optimizer guard, logging, idempotence, weights-only saves, gradient checkpointing,
the best export across resumes, normalization statistics, and the module left plain for other Trainers."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import tiny_gpt2
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lit_models import CausalLM, Classifier, token_loader, trainer_kwargs
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from lightning_lora import (
    ConfigError,
    LoRACallback,
    LoRAConfig,
    load_adapter,
    load_lora_checkpoint,
    lora_layers,
    unload,
)
from lightning_lora.callback import RECORD_KEY
from lightning_lora.io import adapter_state_dict

peft = pytest.importorskip("peft")
BATCH = token_loader(batches=1, seed=9).dataset[:2]


def fit(module, tmp_path, callbacks, ckpt_path=None, **overrides) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=callbacks, **overrides))
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def base_unchanged(adapted: torch.nn.Module, fresh: torch.nn.Module) -> None:
    """Every frozen tensor of `fresh` is bit-identical in `adapted`, found under its LoRA-wrapped name."""
    now = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    before = fresh.state_dict()
    assert set(now) == set(before)
    trained = {n for n, p in adapted.named_parameters() if p.requires_grad}
    for key, value in before.items():
        if key not in trained:
            assert torch.equal(now[key], value), f"base tensor {key} changed"


def all_b_nonzero(module) -> bool:
    layers = [layer for _, layer in lora_layers(module)]
    return bool(layers) and all(b.abs().sum() > 0 for layer in layers for b in layer.lora_b.values())


def test_gpt2_adapter_only_checkpoint_and_peft_export(tmp_path):
    module = CausalLM(n_embd=64)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    callback = LoRACallback(r=4, alpha=8, model_attr="model", adapter_dir=tmp_path / "adapter")
    fit(module, tmp_path, [callback, ckpt], max_epochs=2)

    base_unchanged(module.model, tiny_gpt2(0, n_embd=64))
    assert all_b_nonzero(module)
    lora_names = set(trainable(module))
    assert len(lora_names) == 4 and all("lora_" in n for n in lora_names)

    checkpoint = torch.load(ckpt.best_model_path, weights_only=True)
    assert set(checkpoint["state_dict"]) == lora_names  # no base tensor at all
    assert checkpoint[RECORD_KEY]["config"]["r"] == 4 and checkpoint[RECORD_KEY]["model_attr"] == "model"
    buffer = io.BytesIO()  # what Lightning writes without the callback's pruning: the whole state_dict
    torch.save({**checkpoint, "state_dict": module.state_dict()}, buffer)
    size = (tmp_path / "ckpt" / "last.ckpt").stat().st_size
    assert size / buffer.tell() < 0.25, (size, buffer.tell())

    module.eval()
    with torch.no_grad():
        ours = module(BATCH)
    for name in ("last", "best"):
        folder = tmp_path / "adapter" / name
        peft_model = peft.PeftModel.from_pretrained(tiny_gpt2(0, n_embd=64), str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(input_ids=BATCH).logits, ours, atol=1e-5, rtol=1e-5)
    with safe_open(str(tmp_path / "adapter" / "best" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert float(meta["lightning_lora.val_loss"]) == pytest.approx(float(ckpt.best_model_score))
    card = (tmp_path / "adapter" / "last" / "README.md").read_text()
    assert "library_name: peft" in card and "trainable_ratio" in card and "val_loss" in card
    assert "lightning 2." in card and "torch " in card
    assert not list((tmp_path / "adapter").rglob("*.tmp")) and not list((tmp_path / "ckpt").rglob("*.tmp"))


def test_plain_module_whole_lightning_module(tmp_path):
    module = Classifier()
    fresh = Classifier()
    callback = LoRACallback(r=4, alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"],
                            adapter_dir=tmp_path / "adapter")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    fit(module, tmp_path, [callback, ckpt], max_epochs=2)

    base_unchanged(module, fresh)
    assert all_b_nonzero(module) and not torch.equal(module.net.head.weight, fresh.net.head.weight)
    checkpoint = torch.load(ckpt.best_model_path, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(trainable(module))
    assert {k for k in checkpoint["state_dict"] if "lora_" not in k} == {"net.head.weight", "net.head.bias"}

    x = torch.randn(3, 16)
    module.eval()
    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter" / "last")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), module(x), atol=1e-6, rtol=1e-6)


def test_resume_is_bit_exact(tmp_path):
    def run(root, max_epochs, ckpt_path=None):
        module = CausalLM(scheduler=True)
        checkpoint = ModelCheckpoint(dirpath=root, save_top_k=-1)
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(**trainer_kwargs(root, callbacks=[LoRACallback(r=4, alpha=8, model_attr="model"),
                                                              checkpoint],
                                             max_epochs=max_epochs, accumulate_grad_batches=2))
        trainer.fit(module, ckpt_path=ckpt_path)
        return module, trainer, checkpoint

    whole, whole_trainer, _ = run(tmp_path / "whole", 2)
    _, _, first = run(tmp_path / "part", 1)
    resumed, resumed_trainer, _ = run(tmp_path / "resumed", 2, ckpt_path=first.best_model_path)

    assert resumed_trainer.global_step == whole_trainer.global_step == 4
    assert resumed_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
    expected, got = trainable(whole), trainable(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    base_unchanged(resumed.model, tiny_gpt2(0))


def test_resume_with_other_config_or_base_fails_clearly(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    fit(CausalLM(), tmp_path, [LoRACallback(r=4, model_attr="model"), ckpt])
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[LoRACallback(r=8, model_attr="model")], max_epochs=2))
    with pytest.raises(ConfigError, match=r"another LoRA config \(r: 4 in the checkpoint, 8 now\)"):
        trainer.fit(CausalLM(), ckpt_path=ckpt.best_model_path)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[LoRACallback(r=4, model_attr="model")], max_epochs=2))
    with pytest.raises(ConfigError, match="trained on another base model"):
        trainer.fit(CausalLM(n_embd=64), ckpt_path=ckpt.best_model_path)
    with pytest.raises(ConfigError, match="trained on another base model"):
        load_lora_checkpoint(CausalLM(n_embd=64), ckpt.best_model_path)
    malformed = torch.load(ckpt.best_model_path, weights_only=True) | {"lightning_lora": [1]}
    torch.save(malformed, tmp_path / "malformed.ckpt")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[LoRACallback(r=4, model_attr="model")], max_epochs=2))
    with pytest.raises(ConfigError, match=r"malformed\.ckpt: its 'lightning_lora' record \(config, model_attr\) is malformed"):
        trainer.fit(CausalLM(), ckpt_path=tmp_path / "malformed.ckpt")


def test_load_lora_checkpoint_helper(tmp_path):
    module = CausalLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    fit(module, tmp_path, [LoRACallback(r=4, alpha=8, model_attr="model"), ckpt])
    module.eval()
    for loaded in (load_lora_checkpoint(CausalLM, ckpt.best_model_path), load_lora_checkpoint(CausalLM(),
                                                                                             ckpt.best_model_path)):
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(loaded(BATCH), module(BATCH))
    plain = torch.load(ckpt.best_model_path, weights_only=True)
    plain["state_dict"].popitem()  # a LoRA key missing: strict
    torch.save(plain, tmp_path / "broken.ckpt")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*lora_B"):
        load_lora_checkpoint(CausalLM(), tmp_path / "broken.ckpt")
    # hostile or corrupt files: a clear error naming the file, never a pickle load
    plain["state_dict"][next(iter(plain["state_dict"]))] = 3
    for name, content, message in (("record", plain | {"lightning_lora": [1]}, r"record .* is malformed"),
                                   ("state", plain, r"state_dict is not a dict of tensors"),
                                   ("pickle", plain | {"extra": EarlyOptimizer}, r"refused it \(it holds a .*EarlyOpt"),
                                   ("garbage", None, r"torch.load\(weights_only=True\) refused it")):
        path = tmp_path / f"{name}.ckpt"
        torch.save(content, path) if content is not None else path.write_bytes(b"not a checkpoint")
        with pytest.raises(ConfigError, match=rf"{name}\.ckpt.*{message}"):
            load_lora_checkpoint(CausalLM(), path)


class EarlyOptimizer(CausalLM):
    """The trap: the optimizer is built in __init__, before the callback injects LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer = torch.optim.Adam(self.parameters(), lr=0.01)

    def configure_optimizers(self):
        return self.optimizer


def test_optimizer_built_before_injection_raises(tmp_path):
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[LoRACallback(r=4, model_attr="model")]))
    with pytest.warns(UserWarning, match="frozen parameters are in an optimizer"), \
            pytest.raises(RuntimeError, match="LoRA parameters are in no optimizer.*configure_optimizers"):
        trainer.fit(EarlyOptimizer())


def test_logged_ratio_matches_independent_count(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    module = CausalLM()
    fit(module, tmp_path, [LoRACallback(r=4, alpha=8, model_attr="model")], logger=logger)
    hparams = yaml.safe_load((tmp_path / "logs" / "version_0" / "hparams.yaml").read_text())
    n_embd, layers, r = 32, 2, 4
    lora = layers * (r * n_embd + 3 * n_embd * r)  # c_attn: A [r, in], B [3 * in, r]
    total = sum(p.numel() for p in tiny_gpt2(0).parameters()) + lora
    assert hparams["lora/trainable_params"] == lora
    assert hparams["lora/total_params"] == total
    assert hparams["lora/trainable_ratio"] == pytest.approx(lora / total, rel=1e-12)
    assert hparams["lora/r"] == r and hparams["lora/alpha"] == 8.0


class FirstHyperparameters(Logger):
    """A logger that keeps only the first hyperparameters a run sends it, as TensorBoard's HParams view does."""

    name, version = "first", 0

    def __init__(self) -> None:
        super().__init__()
        self.hparams: dict | None = None

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        if self.hparams is None:
            self.hparams = dict(params)

    def log_metrics(self, metrics, step=None) -> None:
        pass


def test_logged_figures_do_not_hide_the_modules_hyperparameters(tmp_path):
    """LoRA's figures went out alone, before Lightning logs the module's hyperparameters: TensorBoard then showed
    lora/* and none of the user's (lr, ...)."""
    logger = FirstHyperparameters()
    fit(CausalLM(lr=0.01), tmp_path, [LoRACallback(r=4, model_attr="model")], logger=logger, max_steps=1)
    assert logger.hparams["lr"] == 0.01 and logger.hparams["lora/r"] == 4


def test_second_fit_and_validate_do_not_rewrap(tmp_path):
    module = CausalLM()
    callback = LoRACallback(r=4, model_attr="model")
    fit(module, tmp_path, [callback])
    after_first = trainable(module)
    layers = [p for p, _ in lora_layers(module)]
    L.Trainer(**trainer_kwargs(tmp_path, callbacks=[callback])).validate(module, token_loader(batches=1))
    fit(module, tmp_path, [callback])
    assert [p for p, _ in lora_layers(module)] == layers
    assert not any(".base_layer.lora_" in n or "base_layer.base_layer" in n for n, _ in module.named_parameters())
    assert trainable(module).keys() == after_first.keys()
    assert any(not torch.equal(v, after_first[k]) for k, v in trainable(module).items())
    assert "configure_model" not in module.__dict__


def test_weights_only_saves_stay_adapter_only(tmp_path):
    module = CausalLM()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    trainer = fit(module, tmp_path, [LoRACallback(r=4, model_attr="model", adapter_dir=tmp_path / "ad"), ckpt])
    names = set(trainable(module))
    for path in (ckpt.best_model_path, tmp_path / "after_fit.ckpt"):
        if path == tmp_path / "after_fit.ckpt":
            trainer.save_checkpoint(path, weights_only=True)
        checkpoint = torch.load(path, weights_only=True)
        assert set(checkpoint["state_dict"]) == names and RECORD_KEY in checkpoint
    assert (tmp_path / "ad" / "last" / "adapter_model.safetensors").is_file()


def test_gradient_checkpointing_frozen_input_trap_is_handled(tmp_path):
    # The trap is real: under reentrant checkpointing of a frozen model, no gradient reaches LoRA at all.
    bare = CausalLM(checkpointing=True)
    LoRACallback(r=4, model_attr="model").apply(bare)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not bare.model(input_ids=BATCH, labels=BATCH).loss.requires_grad

    module = CausalLM(checkpointing=True)
    fit(module, tmp_path, [LoRACallback(r=4, model_attr="model")])
    assert all_b_nonzero(module)


def test_noop_adapter_warns(tmp_path):
    module = CausalLM(lr=0.0)
    with pytest.warns(UserWarning, match="LoRA is a no-op: after 2 optimizer steps"):
        fit(module, tmp_path, [LoRACallback(r=4, model_attr="model", noop_check_steps=2)])


def test_torch_compiled_submodule(tmp_path):
    module = CausalLM()
    module.model = torch.compile(module.model, backend="eager")
    callback = LoRACallback(r=4, alpha=8, model_attr="model", adapter_dir=tmp_path / "ad")
    fit(module, tmp_path, [callback], max_steps=2)
    assert all_b_nonzero(module)
    peft_model = peft.PeftModel.from_pretrained(tiny_gpt2(0), str(tmp_path / "ad" / "last")).eval()
    plain = module.model._orig_mod.eval()  # the same modules, without recompiling for eval mode
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=BATCH).logits, plain(input_ids=BATCH).logits, atol=1e-5,
                                   rtol=1e-5)


def test_keyword_fields_cover_the_config():
    import dataclasses
    import inspect

    params = inspect.signature(LoRACallback).parameters
    missing = {f.name for f in dataclasses.fields(LoRAConfig)} - set(params) - {"fan_in_fan_out"}
    assert not missing, f"LoRACallback lacks keyword arguments for {missing} (LightningCLI cannot set them)"
    callback = LoRACallback(LoRAConfig(r=2, alpha=4), r=16, target_modules=["c_attn"])
    assert (callback.config.r, callback.config.alpha, callback.config.target_modules) == (16, 4.0, ["c_attn"])
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        LoRACallback(r=0)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_keeps_lora_in_fp32(tmp_path, precision):
    from lightning.pytorch.plugins import MixedPrecision

    # Lightning maps "16-mixed" on CPU to bf16; its plugin with a CPU GradScaler runs real fp16 autocast here.
    amp = {"precision": precision} if precision == "bf16-mixed" else {
        "plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    module = CausalLM()
    fit(module, tmp_path, [LoRACallback(r=4, model_attr="model", adapter_dir=tmp_path / "ad")], max_steps=3, **amp)
    assert all_b_nonzero(module)
    if precision == "16-mixed":  # the loss scaler's state travels in the adapter-only checkpoint
        (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
        saved = torch.load(ckpt, weights_only=True)
        assert saved["MixedPrecision"]["scale"] > 0 and all("lora_" in k for k in saved["state_dict"])
    assert {p.dtype for p in trainable(module).values()} == {torch.float32}
    with safe_open(str(tmp_path / "ad" / "last" / "adapter_model.safetensors"), "pt") as f:
        assert {t.dtype for t in map(f.get_tensor, f.keys())} == {torch.float32}


class BuiltInConfigureModel(CausalLM):
    """The model exists only after configure_model (as with FSDP / big models): injection must follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_gpt2(0).train()


def test_model_built_in_configure_model_and_module_stays_picklable(tmp_path):
    import pickle

    module = BuiltInConfigureModel()
    callback = LoRACallback(r=4, model_attr="model")
    fit(module, tmp_path, [callback], max_steps=2)
    assert len(list(lora_layers(module))) == 2 and all_b_nonzero(module)
    assert "configure_model" not in module.__dict__  # the wrapper is undone in teardown
    for source in (BuiltInConfigureModel, BuiltInConfigureModel()):  # an instance gets its configure_model run
        loaded = load_lora_checkpoint(source, next((tmp_path / "checkpoints").glob("*.ckpt"))).eval()
        with torch.no_grad():
            assert torch.equal(loaded(BATCH), module.eval()(BATCH))
    clone = pickle.loads(pickle.dumps(module))
    state = {k: v for k, v in module.state_dict().items() if "lora_" in k}
    clone.load_state_dict(state)  # frozen keys missing: accepted; LoRA keys: strict
    with pytest.raises(RuntimeError, match="Missing key"):
        clone.load_state_dict(dict(list(state.items())[1:]))


class WorseEachEpoch(CausalLM):
    """Its monitored metric is best after epoch 0 and worse after every later epoch."""

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_metric", torch.tensor(1.0 + self.current_epoch))


def assert_best_export(adapter_dir, checkpoint: ModelCheckpoint) -> None:
    """``adapter_dir/best`` holds exactly the LoRA tensors of ModelCheckpoint's best checkpoint, with its score."""
    best = load_lora_checkpoint(CausalLM(), checkpoint.best_model_path)
    expected = adapter_state_dict(best.model)
    exported = load_file(adapter_dir / "best" / "adapter_model.safetensors")
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    with safe_open(str(adapter_dir / "best" / "adapter_model.safetensors"), "pt") as f:
        score = float(f.metadata()[f"lightning_lora.{checkpoint.monitor}"])
    assert score == pytest.approx(float(checkpoint.best_model_score))


def test_best_export_is_kept_after_resume(tmp_path):
    def run(max_epochs, ckpt_path=None) -> ModelCheckpoint:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_metric", save_last=True)
        callback = LoRACallback(r=4, model_attr="model", adapter_dir=tmp_path / "adapter")
        fit(WorseEachEpoch(), tmp_path, [callback, checkpoint], ckpt_path=ckpt_path, max_epochs=max_epochs)
        return checkpoint

    run(1)
    resumed = run(3, ckpt_path=tmp_path / "ckpt" / "last.ckpt")  # epochs 1 and 2 are worse: best stays epoch 0
    assert resumed.best_model_score == 1.0 and "epoch=0" in resumed.best_model_path
    assert_best_export(tmp_path / "adapter", resumed)


def test_resume_into_another_checkpoint_folder(tmp_path):
    # A new logger version moves ModelCheckpoint's default folder: Lightning then restores its best_model_path
    # but not its best_model_score; a second, periodic ModelCheckpoint saves before the monitored one has a score.
    def run(max_epochs, ckpt_path=None) -> ModelCheckpoint:
        best = ModelCheckpoint(monitor="val_loss")
        periodic = ModelCheckpoint(every_n_train_steps=2, filename="periodic-{step}")
        callback = LoRACallback(r=4, model_attr="model", adapter_dir=tmp_path / "adapter")
        fit(CausalLM(), tmp_path, [callback, best, periodic], ckpt_path=ckpt_path, max_epochs=max_epochs,
            logger=CSVLogger(tmp_path))
        return best

    first = run(1)
    resumed = run(2, ckpt_path=first.best_model_path)
    assert resumed.dirpath != first.dirpath and resumed.best_model_path.startswith(resumed.dirpath)
    assert_best_export(tmp_path / "adapter", resumed)


def test_module_is_plain_for_other_trainers_after_fit(tmp_path):
    module = CausalLM()
    fit(module, tmp_path, [LoRACallback(r=4, model_attr="model", adapter_dir=tmp_path / "ad")], max_steps=2)
    assert len(list(lora_layers(module))) == 2  # the adapter stays in the model
    exported = (tmp_path / "ad" / "last" / "adapter_model.safetensors").read_bytes()

    plain = ModelCheckpoint(dirpath=tmp_path / "plain")  # another Trainer, without LoRACallback
    fit(module, tmp_path, [plain], max_steps=1)
    saved = torch.load(plain.best_model_path, weights_only=True)
    assert set(saved["state_dict"]) == set(module.state_dict()) and RECORD_KEY not in saved
    assert (tmp_path / "ad" / "last" / "adapter_model.safetensors").read_bytes() == exported

    unload(module.model)  # merged: a plain GPT-2 again, then fully fine-tuned
    for param in module.parameters():
        param.requires_grad_(True)
    merged = ModelCheckpoint(dirpath=tmp_path / "merged")
    fit(module, tmp_path, [merged], max_steps=1)
    assert set(torch.load(merged.best_model_path, weights_only=True)["state_dict"]) == set(module.state_dict())


class BatchNormNet(L.LightningModule):
    """Conv and Linear layers with BatchNorm, whose running statistics change in training even when frozen."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.05)

    def train_dataloader(self) -> DataLoader:
        x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 3 + 1
        return DataLoader(list(zip(x, (x[:, 0, 0, 0] > 1).long())), batch_size=4)


BN_TARGETS = ["net.0", "net.4", "net.7"]
IMAGES = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 3 + 1
STATS = ("running_mean", "running_var", "num_batches_tracked")


def test_norm_statistics_resume_exactly_and_load(tmp_path):
    def run(name, max_epochs, ckpt_path=None) -> tuple[BatchNormNet, ModelCheckpoint]:
        module, checkpoint = BatchNormNet(), ModelCheckpoint(dirpath=tmp_path / name)
        callback = LoRACallback(r=2, alpha=4, target_modules=BN_TARGETS, modules_to_save=["net.5"])
        fit(module, tmp_path, [callback, checkpoint], ckpt_path=ckpt_path, max_epochs=max_epochs)
        return module, checkpoint

    # net.1 is outside modules_to_save: the PEFT export cannot carry its statistics
    with pytest.warns(UserWarning, match=r"1 normalization layer\(s\) outside modules_to_save .*\['net\.1'\]"):
        whole, whole_ckpt = run("whole", 2)
    _, part = run("part", 1)
    resumed, _ = run("resumed", 2, ckpt_path=part.best_model_path)

    assert not torch.equal(whole.net[1].running_mean, BatchNormNet().net[1].running_mean)
    assert whole.net[1].num_batches_tracked == 8
    expected, got = whole.state_dict(), resumed.state_dict()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    saved = torch.load(whole_ckpt.best_model_path, weights_only=True)["state_dict"]
    assert set(saved) == set(trainable(whole)) | {f"net.{i}.{name}" for i in (1, 5) for name in STATS}
    loaded = load_lora_checkpoint(BatchNormNet(), whole_ckpt.best_model_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), whole.eval()(IMAGES))


def test_modules_to_save_export_carries_norm_statistics(tmp_path):
    module = BatchNormNet()
    callback = LoRACallback(r=2, alpha=4, target_modules=BN_TARGETS, modules_to_save=["net.1", "net.5"],
                            adapter_dir=tmp_path / "ad")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, tmp_path, [callback])
    assert not [w for w in caught if "normalization layer" in str(w.message)]
    exported = load_file(tmp_path / "ad" / "last" / "adapter_model.safetensors")
    for name in STATS:
        assert torch.equal(exported[f"base_model.model.net.1.{name}"], getattr(module.net[1], name))

    module.eval()
    ours = BatchNormNet()
    load_adapter(ours, tmp_path / "ad" / "last")
    peft_model = peft.PeftModel.from_pretrained(BatchNormNet(), str(tmp_path / "ad" / "last"))
    with torch.no_grad():
        expected = module(IMAGES)
        torch.testing.assert_close(ours.eval()(IMAGES), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(peft_model.eval()(IMAGES), expected, atol=1e-6, rtol=1e-6)


def test_noop_check_off_and_negative_refused(tmp_path):
    for steps in (0, None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(CausalLM(lr=0.0), tmp_path, [LoRACallback(r=4, model_attr="model", noop_check_steps=steps)],
                max_steps=2)
        assert not [w for w in caught if "no-op" in str(w.message)], steps
    with pytest.raises(ConfigError, match=r"noop_check_steps=-1: .*0 or None"):
        LoRACallback(noop_check_steps=-1)


class NestedModel(CausalLM):
    """The GPT-2 two attributes deep, at ``self.backbone.encoder``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.encoder = self.model
        del self.model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.encoder(input_ids=input_ids).logits

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.backbone.encoder(input_ids=batch, labels=batch).loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.backbone.encoder(input_ids=batch, labels=batch).loss)


def test_dotted_model_attr(tmp_path):
    module, checkpoint = NestedModel(), ModelCheckpoint(dirpath=tmp_path / "ckpt")
    fit(module, tmp_path, [LoRACallback(r=4, model_attr="backbone.encoder"), checkpoint], max_steps=2)
    assert len(list(lora_layers(module.backbone.encoder))) == 2 and all_b_nonzero(module)
    loaded = load_lora_checkpoint(NestedModel(), checkpoint.best_model_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(BATCH), module.eval()(BATCH))
    with pytest.raises(ConfigError, match=r"model_attr='backbone\.decoder': NestedModel\.backbone has no attribute "
                                          r"'decoder'"):
        LoRACallback(model_attr="backbone.decoder").apply(NestedModel())


def test_last_export_records_the_epoch_of_its_step(tmp_path):
    """Stopped by max_steps in the second epoch (4 batches an epoch): `last` says epoch 1, as the checkpoint of
    the same step does (on_train_end runs after Lightning has counted that epoch as done)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    callback = LoRACallback(r=2, model_attr="model", adapter_dir=tmp_path / "ad")
    fit(CausalLM(), tmp_path, [callback, ckpt], max_epochs=3, max_steps=5)
    assert Path(ckpt.best_model_path).name == "epoch=1-step=5.ckpt"
    with safe_open(str(tmp_path / "ad" / "last" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["lightning_lora.epoch"], meta["lightning_lora.global_step"]) == ("1", "5")


def test_second_fit_with_the_same_callback_exports_its_own_last(tmp_path):
    callback = LoRACallback(r=2, model_attr="model", adapter_dir=tmp_path / "ad")
    for seed in (1, 2):  # a sweep: two runs ending at the same step
        module = CausalLM(seed=seed)
        fit(module, tmp_path / str(seed), [callback], max_steps=2)
        exported = load_file(str(tmp_path / "ad" / "last" / "adapter_model.safetensors"))
        assert torch.equal(exported["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"],
                           module.model.transformer.h[0].attn.c_attn.lora_b["default"])


def test_transformers_model_without_model_attr_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"holds a transformers model in `self.model`; set "
                                         r"LoRACallback\(model_attr='model'\)"):
        fit(CausalLM(), tmp_path, [LoRACallback(r=2, target_modules=["c_attn"])], max_steps=1)


def test_default_targets_without_model_attr_point_to_model_attr(tmp_path):
    """Without model_attr nor target_modules the error said to set target_modules, after which the run trained
    an adapter whose export does not load onto the model; the fix is model_attr, which also picks the defaults."""
    module = CausalLM()
    with pytest.raises(ConfigError, match=r"target_modules is not set, and CausalLM has no model type .* "
                                          r"`self.model`; set LoRACallback\(model_attr='model'\)"):
        LoRACallback(r=2).apply(module)
    assert not list(lora_layers(module))
    LoRACallback(r=2, model_attr="model").apply(module)
    assert {p.rsplit(".", 1)[-1] for p, _ in lora_layers(module)} == {"c_attn"}


class BuildsInConfigureModel(CausalLM):
    """The idempotent `configure_model` Lightning recommends; the model already exists (built in __init__)."""

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_gpt2(0)


def test_spawned_strategy_needs_apply_before_fit(tmp_path):
    """ddp_spawn trains in a new process and hands back only the tensors the module had: an adapter injected
    there would vanish from the user's module without a word. Refused; with `apply` first it comes back."""
    callback = LoRACallback(r=2, model_attr="model")
    with pytest.raises(Exception, match=r"call lora_callback.apply\(module\) before trainer.fit"):
        fit(CausalLM(), tmp_path, [callback], strategy="ddp_spawn", max_steps=1)
    with pytest.raises(Exception, match=r"call lora_callback.apply\(module\) before trainer.fit"):
        fit(BuildsInConfigureModel(), tmp_path, [callback], strategy="ddp_spawn", max_steps=1)  # model from __init__
    module = CausalLM()
    callback.apply(module)
    fit(module, tmp_path, [callback], strategy="ddp_spawn", max_steps=2)
    assert all_b_nonzero(module)


def test_adapter_dir_expands_the_home_folder(tmp_path, monkeypatch):
    """As Lightning's default_root_dir and ModelCheckpoint(dirpath) do: a YAML config's "~/adapters" made a folder
    named "~" in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    checkpoint = ModelCheckpoint(dirpath="~/ckpt")
    fit(CausalLM(), tmp_path, [LoRACallback(r=2, model_attr="model", adapter_dir="~/adapters"), checkpoint],
        max_steps=1)
    assert (tmp_path / "home" / "adapters" / "last" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "~").exists()
    load_lora_checkpoint(CausalLM(), f"~/ckpt/{Path(checkpoint.best_model_path).name}")  # as load_from_checkpoint


def test_second_callback_and_a_file_as_adapter_dir_refused(tmp_path):
    """Each LoRACallback freezes all but its own adapter: a second one silently froze the first's. And an
    adapter_dir that is a file failed only at the first export, after an epoch, losing its checkpoint."""
    first, second = LoRACallback(r=2, model_attr="model"), LoRACallback(r=2, model_attr="model")
    with pytest.raises(ConfigError, match=r"one LoRACallback per Trainer"):
        fit(CausalLM(), tmp_path, [first, second], max_steps=1)
    (tmp_path / "adapters").write_text("")
    with pytest.raises(ConfigError, match=r"adapter_dir='.*adapters' is a file; name a folder"):
        LoRACallback(adapter_dir=tmp_path / "adapters")


def test_adapter_only_load_stays_strict_inside_a_larger_module():
    """Loaded through a module that holds it (an EMA's AveragedModel, a wrapper, a container), the adapted module's
    frozen keys may be missing, but its LoRA keys and the other modules' keys stay strict."""
    import pickle

    from lit_models import MLP

    inner = MLP()
    LoRACallback(r=2, target_modules=["fc1"]).apply(inner)
    outer = pickle.loads(pickle.dumps(nn.Sequential(nn.Linear(4, 4), inner)))  # the hooks survive pickling
    state = {k: v for k, v in outer.state_dict().items() if "lora_" in k or k.startswith("0.")}
    outer.load_state_dict(state)  # "1.fc1.base_layer.weight" and the other frozen keys of `inner` missing
    for key in ("1.fc1.lora_A.default", "0.weight"):
        with pytest.raises(RuntimeError, match=rf'Missing key\(s\) in state_dict: "{key}"'):
            outer.load_state_dict({k: v for k, v in state.items() if k != key})


def test_fast_dev_run_leaves_the_exported_adapter_alone(tmp_path):
    """Lightning's smoke test writes no checkpoint and no log; it replaced `last` with a one-step adapter."""
    fit(CausalLM(), tmp_path, [LoRACallback(r=2, model_attr="model", adapter_dir=tmp_path / "ad")], max_steps=2)
    exported = (tmp_path / "ad" / "last" / "adapter_model.safetensors").read_bytes()
    module = CausalLM(seed=1)
    fit(module, tmp_path, [LoRACallback(r=2, model_attr="model", adapter_dir=tmp_path / "ad")], fast_dev_run=True)
    assert all_b_nonzero(module)  # it trained
    assert (tmp_path / "ad" / "last" / "adapter_model.safetensors").read_bytes() == exported


def test_ema_weight_averaging_checkpoints_stay_adapter_only_and_resume(tmp_path):
    """EMAWeightAveraging, listed after LoRACallback, put its whole averaged model into every checkpoint's state
    dict (35x the adapter). Cut down again, the checkpoint still resumes both the model and the average."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    def run(max_epochs, ckpt_path=None) -> tuple[L.Trainer, ModelCheckpoint]:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
        callbacks = [LoRACallback(r=2, model_attr="model"), EMAWeightAveraging(decay=0.5), checkpoint]
        return fit(CausalLM(), tmp_path, callbacks, ckpt_path=ckpt_path, max_epochs=max_epochs), checkpoint

    first, checkpoint = run(1)
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    names = set(trainable(first.lightning_module))
    assert set(saved["state_dict"]) == set(saved["current_model_state"]) == names
    resumed, _ = run(2, ckpt_path=checkpoint.best_model_path)
    assert resumed.global_step == 8


def test_weight_averaging_listed_before_lora_is_refused(tmp_path):
    """Listed first, it copied the model before injection and failed in torch on mismatched shapes."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    with pytest.raises(ConfigError, match=r"EMAWeightAveraging is listed before LoRACallback .* list LoRACallback "
                                          r"first"):
        fit(CausalLM(), tmp_path, [EMAWeightAveraging(), LoRACallback(r=2, model_attr="model")], max_steps=1)


def test_ema_weight_averaging_exports_the_averaged_weights(tmp_path):
    """With EMAWeightAveraging, `last` and `best` held the live weights, while the checkpoint (and the module after
    fit) held the averaged ones: the exported adapter was not the model that was validated and kept."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    module = CausalLM()
    callbacks = [LoRACallback(r=2, model_attr="model", adapter_dir=tmp_path / "ad"), EMAWeightAveraging(decay=0.5),
                 checkpoint]
    fit(module, tmp_path, callbacks, max_epochs=1)
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    live = {k: v for k, v in saved["current_model_state"].items() if "lora_B" in k}
    assert all(not torch.allclose(v, saved["state_dict"][k]) for k, v in live.items())  # averaging differs
    for name in ("last", "best"):
        exported = CausalLM().model
        load_adapter(exported, tmp_path / "ad" / name)
        averaged = adapter_state_dict(module.model)  # the module holds the average after fit
        assert adapter_state_dict(exported).keys() == averaged.keys()
        for key, value in adapter_state_dict(exported).items():
            torch.testing.assert_close(value, averaged[key], rtol=0, atol=0)


def test_continue_training_a_loaded_adapter(tmp_path):
    """An adapter loaded with load_adapter before fit: the callback with its config continues from it, but left
    the module's parameters outside model_attr trainable (load_adapter freezes only its model); with another
    config the error advised an adapter_name, which the callback does not take; with quantize='nf4' it trained the
    full-precision base."""
    from lightning_lora import validate_adapter

    class WithExtra(CausalLM):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(4, 4)

    callback = LoRACallback(r=2, alpha=4, target_modules=["c_attn"], model_attr="model", adapter_dir=tmp_path / "a")
    fit(WithExtra(), tmp_path, [callback], max_steps=2)
    module = WithExtra()
    load_adapter(module.model, tmp_path / "a" / "last")
    loaded = {k: v.clone() for k, v in adapter_state_dict(module.model).items()}
    with pytest.raises(ConfigError, match=r"already holds adapter 'default' \(loaded with load_adapter\?\) with "
                                          r"another config \(alpha: 4.0 in the model, 16.0 in LoRACallback; r: 2 in "
                                          r"the model, 8 in LoRACallback\); to continue training it, give "
                                          r"LoRACallback its config"):
        fit(module, tmp_path, [LoRACallback(model_attr="model")], max_steps=1)
    config = validate_adapter(tmp_path / "a" / "last").config
    with pytest.raises(ConfigError, match=r"LoRACallback\(quantize='nf4'\), but the model's adapter 'default' .* "
                                          r"full-precision base layers, .* call quantize_model\(model, config\) "
                                          r"before load_adapter"):  # it trained the full base, in silence
        fit(module, tmp_path, [LoRACallback(config, quantize="nf4", model_attr="model")], max_steps=1)
    fit(module, tmp_path, [LoRACallback(config, model_attr="model")], max_steps=1)
    assert set(trainable(module)) == {n for n, _ in module.named_parameters() if "lora_" in n}  # not `extra`
    for key, value in adapter_state_dict(module.model).items():  # one Adam step (lr 0.05) from the loaded weights
        assert 0 < (value - loaded[key]).abs().max() <= 0.05 + 1e-6


def test_stochastic_weight_averaging_checkpoints_stay_adapter_only_and_resume(tmp_path):
    """StochasticWeightAveraging keeps a whole copy of the model in its callback state, which every checkpoint
    held beside the adapter (the frozen base included). Cut down to the adapter, it still resumes."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    def run(max_epochs, ckpt_path=None) -> L.Trainer:
        callbacks = [LoRACallback(r=2, model_attr="model"), StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1),
                     ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)]
        return fit(CausalLM(), tmp_path, callbacks, ckpt_path=ckpt_path, max_epochs=max_epochs)

    first = run(2)
    saved = torch.load(tmp_path / "ckpt" / "epoch=1-step=8.ckpt", weights_only=True)
    (average,) = [s["average_model_state"] for s in saved["callbacks"].values() if "average_model_state" in s]
    assert set(average) == set(saved["state_dict"]) == set(trainable(first.lightning_module))
    resumed = run(3, ckpt_path=tmp_path / "ckpt" / "epoch=1-step=8.ckpt")
    assert resumed.global_step == 12


def test_tuner_snapshots_leave_the_exported_adapter_alone(tmp_path):
    """lr_find (and scale_batch_size) save a snapshot of the untrained module before their trial steps (and restore
    it after them): its export replaced a trained `last` with an adapter whose B is all zeros."""
    from lightning.pytorch.tuner import Tuner

    fit(CausalLM(), tmp_path, [LoRACallback(r=2, model_attr="model", adapter_dir=tmp_path / "ad")], max_steps=2)
    exported = (tmp_path / "ad" / "last" / "adapter_model.safetensors").read_bytes()
    module = CausalLM()
    trainer = L.Trainer(**trainer_kwargs(tmp_path, callbacks=[LoRACallback(r=2, model_attr="model",
                                                                           adapter_dir=tmp_path / "ad")],
                                         max_steps=2))
    Tuner(trainer).lr_find(module, num_training=3, min_lr=1e-3, max_lr=1e-2, update_attr=False)
    assert not all_b_nonzero(module)  # the tuner restored the untrained adapter
    assert (tmp_path / "ad" / "last" / "adapter_model.safetensors").read_bytes() == exported
    trainer.fit(module)
    assert all_b_nonzero(module)
    loaded = load_file(tmp_path / "ad" / "last" / "adapter_model.safetensors")
    assert loaded.keys() == {k for k in adapter_state_dict(module.model)} and all(
        torch.equal(v, adapter_state_dict(module.model)[k]) for k, v in loaded.items())


class TakesTheModel(CausalLM):
    """``save_hyperparameters()`` in an ``__init__`` that takes the model: Lightning warns, and saves the model."""

    def __init__(self, model: nn.Module, lr: float = 0.05, scheduler: bool = False) -> None:
        super().__init__(lr=lr, scheduler=scheduler)
        self.save_hyperparameters()
        self.model = model


def test_a_model_saved_as_hyperparameter_stays_out_of_the_checkpoint(tmp_path):
    """The whole base model went into the adapter-only checkpoint, pickled under ``hyper_parameters``, where
    `torch.load(weights_only=True)` (resume, `load_lora_checkpoint`) refused it."""
    module = TakesTheModel(tiny_gpt2(0))
    assert "model" in module.hparams
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    fit(module, tmp_path, [LoRACallback(r=4, model_attr="model"), ckpt], max_steps=2)
    checkpoint = torch.load(ckpt.best_model_path, weights_only=True)
    assert "model" not in checkpoint["hyper_parameters"] and checkpoint["hyper_parameters"]["lr"] == 0.05
    assert set(checkpoint["state_dict"]) == set(trainable(module)) and "model" in module.hparams
    loaded = load_lora_checkpoint(TakesTheModel, ckpt.best_model_path, model=tiny_gpt2(0)).eval()
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(BATCH), module(BATCH))


class WithBackbone(Classifier):
    """`net.fc1` and `net.fc2` as the ``backbone`` that Lightning's BackboneFinetuning freezes and later unfreezes."""

    @property
    def backbone(self) -> nn.Module:
        return nn.ModuleList([self.net.fc1, self.net.fc2])


def test_a_finetuning_callback_that_unfreezes_the_base_is_refused(tmp_path):
    """BackboneFinetuning unfroze the whole backbone, base weights included, at its epoch: they trained, and the
    exported adapter silently lacked them. Unfreezing only the adapter's own tensors stays allowed."""
    from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning

    class HeadLater(BaseFinetuning):
        def freeze_before_training(self, pl_module: L.LightningModule) -> None:
            self.freeze(pl_module.net.head)

        def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
            if epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.net.head, optimizer)

    module, fresh = WithBackbone(), Classifier()
    callbacks = [LoRACallback(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]), HeadLater()]
    fit(module, tmp_path, callbacks, max_epochs=2)
    assert all_b_nonzero(module) and not torch.equal(module.net.head.weight, fresh.net.head.weight)

    module = WithBackbone()
    callbacks = [LoRACallback(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
                 BackboneFinetuning(unfreeze_backbone_at_epoch=1)]
    with pytest.raises(ConfigError, match=r"4 parameters outside the LoRA adapter are trainable \(e.g. "
                                          r"'net.fc1.base_layer.weight'\): something unfroze them"):
        fit(module, tmp_path, callbacks, max_epochs=2)
    assert torch.equal(module.net.fc1.base_layer.weight, fresh.net.fc1.weight)


def test_adapter_frozen_for_a_while_is_still_checkpointed(tmp_path):
    """LP-FT (the head first, LoRA from epoch 1, by a BaseFinetuning callback): the checkpoints of epoch 0 lacked
    A and B, frozen then, although A is random from the start: loading or resuming them failed or re-drew A."""
    from lightning.pytorch.callbacks import BaseFinetuning

    class LoRALater(BaseFinetuning):
        def freeze_before_training(self, pl_module: L.LightningModule) -> None:
            for param in self.lora_params(pl_module):
                param.requires_grad_(False)

        def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
            if epoch == 1:
                params = [p.requires_grad_(True) for p in self.lora_params(pl_module)]
                optimizer.add_param_group({"params": params})

        @staticmethod
        def lora_params(module: nn.Module) -> list[nn.Parameter]:
            return [p for _, layer in lora_layers(module) for p in layer.adapter_params("default")]

    module = Classifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    lora = LoRACallback(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    fit(module, tmp_path, [lora, LoRALater(), ckpt], max_epochs=2)
    assert all_b_nonzero(module)
    first = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert set(torch.load(first, weights_only=True)["state_dict"]) == set(trainable(module))
    resumed = Classifier()
    fit(resumed, tmp_path / "resumed", [LoRACallback(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
                                        LoRALater()], ckpt_path=first, max_epochs=2)
    assert all(torch.equal(trainable(resumed)[name], value) for name, value in trainable(module).items())


def test_checkpoint_of_a_compiled_submodule_loads_into_the_plain_module(tmp_path):
    """Trained with ``self.model = torch.compile(model)``, the checkpoint's keys hold ``_orig_mod``: loading it into
    the module built plainly (for inference) failed on every key."""
    module = CausalLM()
    module.model = torch.compile(module.model, backend="eager")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    fit(module, tmp_path, [LoRACallback(r=4, alpha=8, model_attr="model"), ckpt], max_steps=2)
    assert all("._orig_mod." in k for k in torch.load(ckpt.best_model_path, weights_only=True)["state_dict"])
    plain = module.model._orig_mod.eval()
    with torch.no_grad():
        expected = plain(input_ids=BATCH).logits
        for loaded in (load_lora_checkpoint(CausalLM, ckpt.best_model_path), load_lora_checkpoint(
                CausalLM(), ckpt.best_model_path)):
            assert torch.equal(loaded.eval()(BATCH), expected)
