"""DoRA and QLoRA costs on a Llama-shaped model, ours vs PEFT, as markdown tables.

1. Training step (forward, loss, backward, AdamW), all-linear r=8: LoRA and DoRA, ours and PEFT's, stepped in
   turn inside one process (machine noise hits all alike); medians and the DoRA / LoRA ratio of each.
2. Bytes of the frozen linear weights: fp32 vs NF4 (bitsandbytes, torchao), packed data plus quant state.
3. Step time and memory, fp32 LoRA vs QLoRA per backend: time interleaved in this process; RSS in a child
   process per variant, after setup (freed memory trimmed) and its peak during the steps (VmHWM, reset).

    nice python bench/dora_qlora.py [--hidden 768] [--layers 4] [--seq 128] [--batch 4] [--steps 6]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from torch import nn

from lightning_lora import LoRAConfig, inject, quant


def build(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         max_position_embeddings=args.seq)
    return LlamaForCausalLM(config).train()


def variant(name: str, args: argparse.Namespace) -> nn.Module:
    """A model with the adapter named `name`: ours-lora, ours-dora, peft-lora, peft-dora, qlora-<backend>."""
    model = build(args)
    if name.startswith("peft"):
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=name == "peft-dora")
        return peft.get_peft_model(model, config).train()
    backend = name.removeprefix("qlora-") if name.startswith("qlora") else None
    inject(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear", use_dora=name == "ours-dora",
                             quantize="nf4" if backend else None, quant_backend=backend))
    return model


def stepper(model: nn.Module, args: argparse.Namespace):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def interleaved(names: list[str], args: argparse.Namespace) -> dict[str, float]:
    """Median step seconds per variant, stepping the variants in turn."""
    steps = {n: stepper(variant(n, args), args) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.warmup + args.steps):
        for n in names:
            t = steps[n]()
            if i >= args.warmup:
                times[n].append(t)
    return {n: statistics.median(t) for n, t in times.items()}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rss_child(name: str, args: argparse.Namespace) -> dict[str, float]:
    """MB: resident set size once variant `name` is built and has stepped once (freed memory handed back to
    the OS first, e.g. the fp32 weights QLoRA replaced), and its peak during `args.steps` more steps."""
    quant.available_backends()  # imports both backends in every child, so library code weighs the same
    step = stepper(variant(name, args), args)
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    resident = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    for _ in range(args.steps):
        step()
    return {"resident": resident, "peak": _status_mb("VmHWM")}


def rss(name: str, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
    # A fixed mmap threshold makes glibc hand every large freed block back at once (its default threshold grows
    # after the first free and then keeps freed dequantized weights in the heap), so RSS tracks live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def frozen_bytes(args: argparse.Namespace) -> dict[str, int]:
    model = build(args)
    linears = [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    out = {"fp32": sum(m.weight.nbytes for m in linears)}
    for backend in quant.available_backends():
        out[f"NF4 ({backend})"] = sum(quant.weight_nbytes(quant.quantize(m, backend)) for m in linears)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", default="dora,bytes,qlora", help="comma-separated subset to run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(rss_child(args.child, args)))
        return

    shape = (f"Llama-shaped {args.layers} x {args.hidden}, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, "
             f"r=8 all-linear, fp32, {args.threads} threads, torch {torch.__version__}")
    sections = args.sections.split(",")
    print(f"Setup: {shape}\n")
    if "dora" in sections:
        dora_table(args)
    if "bytes" in sections:
        bytes_table(args)
    if "qlora" in sections:
        qlora_table(args)


def dora_table(args: argparse.Namespace) -> None:
    print("## DoRA vs LoRA training step\n")
    t = interleaved(["ours-lora", "ours-dora", "peft-lora", "peft-dora"], args)
    print("| variant | LoRA step ms | DoRA step ms | DoRA / LoRA |\n|---|---|---|---|")
    for who in ("ours", "peft"):
        lora, dora = t[f"{who}-lora"], t[f"{who}-dora"]
        print(f"| {who} | {lora * 1e3:,.0f} | {dora * 1e3:,.0f} | {dora / lora:.3f} |")
    print(f"\nours DoRA / PEFT DoRA: {t['ours-dora'] / t['peft-dora']:.3f}\n")


def bytes_table(args: argparse.Namespace) -> None:
    print("## Frozen linear weights\n\n| storage | bytes | fp32 / this |\n|---|---|---|")
    sizes = frozen_bytes(args)
    for name, size in sizes.items():
        print(f"| {name} | {size:,} | {sizes['fp32'] / size:.2f} |")
    print()


def qlora_table(args: argparse.Namespace) -> None:
    names = ["ours-lora", *(f"qlora-{b}" for b in quant.available_backends())]
    print("## LoRA vs QLoRA training step\n\n| variant | step ms | / fp32 LoRA | RSS after setup (MB) | "
          "peak RSS in steps (MB) |\n|---|---|---|---|---|")
    t = interleaved(names, args)
    for name in names:
        mb = rss(name, args)
        print(f"| {name} | {t[name] * 1e3:,.0f} | {t[name] / t['ours-lora']:.3f} | {mb['resident']:,.0f} | "
              f"{mb['peak']:,.0f} |")


if __name__ == "__main__":
    main()
