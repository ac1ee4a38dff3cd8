"""The quickstart on several processes: ``strategy="ddp"`` with LoRACallback (CPU gloo here, GPUs elsewhere).

    python examples/ddp.py                                     # 2 CPU processes
    python examples/ddp.py --accelerator gpu --devices 8       # 8 GPUs on one machine

Several machines: the same script on each, with Lightning's ``--num-nodes``; either under SLURM
(``srun python examples/ddp.py --accelerator gpu --devices 8 --num-nodes 4``, Lightning reads SLURM's
variables) or torchrun (``torchrun --nnodes 4 --nproc-per-node 8 --rdzv-endpoint HOST:29500
examples/ddp.py --accelerator gpu --devices 8 --num-nodes 4``).

Only global rank 0 writes checkpoints and the adapter; LoRA is injected before the DDP wrap, so every rank
holds the same adapter and only the LoRA gradients are all-reduced.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
from quickstart import CausalLM, byte_loader, small_gpt2

from lightning_lora import LoRACallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--out", default="runs/ddp")
    args = parser.parse_args()

    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy="ddp",
                        max_steps=args.max_steps, default_root_dir=args.out, logger=False,
                        enable_progress_bar=False, callbacks=[
                            LoRACallback(r=8, alpha=16, model_attr="model", adapter_dir=f"{args.out}/adapter"),
                        ])
    trainer.fit(CausalLM(small_gpt2()), byte_loader())
    if trainer.is_global_zero:
        print(f"{trainer.world_size} processes trained one adapter: {os.path.abspath(args.out)}/adapter/last")


if __name__ == "__main__":
    main()
