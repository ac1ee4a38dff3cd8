"""A decoder fine-tune with LoRA on every linear layer, and its generations before and after.

    python examples/causal_lm.py [--max-steps 300] [--out runs/causal-lm]

The model is Llama-shaped (grouped-query attention, SwiGLU MLP) and built from its config, so this runs
offline on a CPU; swap in ``AutoModelForCausalLM.from_pretrained(...)`` and a tokenizer for a real one.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from quickstart import TEXT, CausalLM, byte_loader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_lora import LoRACallback

PROMPT = "the quick"


def generate(model: LlamaForCausalLM, prompt: str = PROMPT, new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt`, byte tokens in and out."""
    model.eval()
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return bytes(out[0].tolist()).decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--out", default="runs/causal-lm")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    print(f"before: {generate(model)!r}")
    callback = LoRACallback(r=16, alpha=32, target_modules="all-linear", model_attr="model",
                            adapter_dir=f"{args.out}/adapter")
    trainer = L.Trainer(max_steps=args.max_steps, default_root_dir=args.out, logger=False,
                        enable_progress_bar=False, callbacks=[callback])
    trainer.fit(CausalLM(model, lr=1e-2), byte_loader())
    print(f"after:  {generate(model)!r}")
    print(f"target: {TEXT[:len(PROMPT) + 40]!r}")
    print(f"adapter (PEFT format): {os.path.abspath(args.out)}/adapter/last")


if __name__ == "__main__":
    main()
