"""QLoRA on CPU, offline: a small Llama-shaped model built from its config, its linear layers quantized to
NF4, LoRA (or DoRA) trained on top to continue a repeating token pattern, the adapter saved in PEFT's
format, then merged into a dense model with the merge error reported.

    python examples/qlora.py --max-steps 60 [--backend bnb|torchao] [--dora] [--out runs/qlora-adapter]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lora import LoRAConfig, inject, quant, save_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--backend", choices=quant.BACKENDS, default=None, help="default: the first installed")
    parser.add_argument("--dora", action="store_true", help="train DoRA instead of plain LoRA")
    parser.add_argument("--out", default="runs/qlora-adapter")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64))
    dense_bytes = sum(m.weight.nbytes for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    summary = inject(model, LoRAConfig(r=8, alpha=16, target_modules="all-linear", use_dora=args.dora,
                                       quantize="nf4", quant_backend=args.backend))
    nf4_bytes = sum(quant.weight_nbytes(m) for m in model.modules() if quant.is_quantized(m))
    print(summary)
    print(f"frozen linear weights: {dense_bytes:,} bytes fp32 -> {nf4_bytes:,} bytes NF4 "
          f"({dense_bytes / nf4_bytes:.2f}x smaller)")

    pattern = torch.arange(16).repeat(4)  # the model learns to continue 0, 1, ..., 15, 0, 1, ...
    batch = torch.stack([pattern.roll(-k) for k in range(8)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, args.max_steps + 1):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == args.max_steps:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()

    print(f"adapter saved to {save_adapter(model, args.out)}")
    with torch.no_grad():
        before = model(input_ids=batch).logits
        errors = quant.unload_quantized(model)  # dense fp32 export; requantize=True gives NF4 again
        after = model(input_ids=batch).logits
    print(f"merge error: weights (max relative) {max(errors.values()):.2e}, "
          f"logits (max abs) {(after - before).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
