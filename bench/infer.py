"""Inference cost of LoRA and the cost of putting it in and taking it out, ours vs PEFT, as markdown tables.

1. Forward under `torch.inference_mode()` on a GPT-2-shaped model (6 x 768, seq 128, batch 4, r=8 all-linear):
   the base model, ours unmerged, ours after `unload` (merged, original classes) and PEFT unmerged, stepped in
   turn inside one process; medians and ratios to the base.
   Then the same for one token (batch 1, seq 1, --token-steps rounds): what each linear layer sees in a decoding
   step, where no large GEMM hides the adapters' per-call cost (Python, dispatch).
2. `inject` on a deep, narrow Llama-shaped model with 1,000+ target layers (all-linear) vs PEFT's
   `get_peft_model`, and our `unload` vs PEFT's `merge_and_unload` on it; each timed on a fresh model (model
   construction not counted), median of --repeats.

    nice python bench/infer.py [--quick] [--steps 10] [--deep-layers 150]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from step import CLOCKS, build_model
from torch import nn

from lightning_lora import LoRAConfig, inject, lora_layers, unload


def _trained(model: nn.Module) -> nn.Module:
    """Give every LoRA B a non-zero value, as after training (so merging does real work)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.eval()


def _peft(model: nn.Module) -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def inference_rows(args: argparse.Namespace, batch: int, seq: int, steps: int) -> list[str]:
    def build() -> nn.Module:
        return build_model("gpt2", args.layers, args.hidden, args.seq).eval()

    ours = build()
    inject(ours, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    merged = build()
    inject(merged, LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    models = {"base": build(), "ours unmerged": _trained(ours), "ours unload": unload(_trained(merged)),
              "peft unmerged": _trained(_peft(build()))}
    ids = torch.randint(0, 50257, (batch, seq), generator=torch.Generator().manual_seed(1))
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = CLOCKS[args.clock]
    with torch.inference_mode():
        for round_ in range(args.warmup + steps):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                start = clock()
                models[name](input_ids=ids)
                if round_ >= args.warmup:
                    times[name].append(clock() - start)
    med = {n: statistics.median(t) for n, t in times.items()}
    rows = [(f"### inference: gpt2-shaped {args.layers} x {args.hidden}, seq {seq}, batch {batch}, r=8 "
            f"all-linear, {args.threads} threads, {args.clock} clock; medians of {steps}"), "", "| variant | forward ms | / base |", "|---|---|---|"]
    rows += [f"| {n} | {1000 * t:,.1f} | {t / med['base']:.3f} |" for n, t in med.items()]
    return rows


def _median_time(
    setup: Callable[[], object], action: Callable[[object], object], args: argparse.Namespace
) -> float:
    """Median over `args.repeats` of the time `action` takes on a fresh `setup()` (setup not timed)."""
    clock, times = CLOCKS[args.clock], []
    for _ in range(args.repeats):
        subject = setup()
        start = clock()
        action(subject)
        times.append(clock() - start)
    return statistics.median(times)


def surgery_rows(args: argparse.Namespace) -> list[str]:
    def deep() -> nn.Module:
        return build_model("llama", args.deep_layers, 64, 32).eval()

    config = LoRAConfig(r=8, alpha=16, target_modules="all-linear")
    probe = deep()
    inject(probe, config)
    n_targets = len(list(lora_layers(probe)))
    del probe

    def ours_injected() -> nn.Module:
        model = deep()
        inject(model, config)
        return _trained(model)

    t_inject_ours = _median_time(deep, lambda m: inject(m, config), args)
    t_inject_peft = _median_time(deep, _peft, args)
    t_unload_ours = _median_time(ours_injected, unload, args)
    t_unload_peft = _median_time(lambda: _trained(_peft(deep())), lambda m: m.merge_and_unload(), args)
    return [(f"### surgery: llama-shaped {args.deep_layers} layers x 64, {n_targets:,} target layers (all-linear, "
            f"r=8), {args.clock} clock; medians of {args.repeats}"), "", "| operation | ours ms | PEFT ms | ours / PEFT |", "|---|---|---|---|",
            (f"| inject / get_peft_model | {1000 * t_inject_ours:,.0f} | {1000 * t_inject_peft:,.0f} | "
            f"{t_inject_ours / t_inject_peft:.3f} |"),
            (f"| unload / merge_and_unload | {1000 * t_unload_ours:,.0f} | {1000 * t_unload_peft:,.0f} | "
            f"{t_unload_ours / t_unload_peft:.3f} |")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--token-steps", type=int, default=200, help="rounds of the one-token forward")
    parser.add_argument("--deep-layers", type=int, default=150, help="Llama layers for the surgery timing (x7)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall", help="see step.py's CLOCKS")
    parser.add_argument("--quick", action="store_true", help="2 layers x 256, seq 64, a smoke run")
    if "--quick" in sys.argv[1:]:  # its settings are defaults: flags given beside it still count
        parser.set_defaults(layers=2, hidden=256, seq=64, steps=3, repeats=1, token_steps=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("\n".join(inference_rows(args, args.batch, args.seq, args.steps)), end="\n\n", flush=True)
    print("\n".join(inference_rows(args, 1, 1, args.token_steps)), end="\n\n", flush=True)
    print("\n".join(surgery_rows(args)))


if __name__ == "__main__":
    main()
