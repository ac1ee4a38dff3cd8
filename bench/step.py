"""Training-step cost of LoRA: ours vs PEFT vs full fine-tuning vs the frozen-model floor, as a markdown table.

Time: every variant's model lives in this one process and the variants are stepped in turn, round after round
(the order rotates each round), so machine noise hits all alike; after warm-up rounds we report the median step
time and, for the ratios to the frozen floor and to PEFT with the same targets, the median and quartiles of the
per-round ratios. A step is forward, cross-entropy loss, backward
and AdamW (`zero_grad(set_to_none=True)`); the floor has every weight frozen and takes the gradient w.r.t.
`inputs_embeds` (the least work any adapter method must do: forward plus the input-gradient half of backward).

Memory: a child process per variant builds only that model, resets its peak-RSS counter (`/proc/self/clear_refs`)
and runs the steps; "step peak" is `VmHWM` minus the RSS before the first step, i.e. what the step itself adds
(activations, gradients, optimizer state) above the model's weights.

    nice python bench/step.py                     # GPT-2-shaped (6 x 768) and Llama-shaped rows
    nice python bench/step.py --quick             # a 2-layer smoke run
    nice python bench/step.py --model gpt2 --steps 10 --layers 12
    nice python bench/step.py --compile --steady-heap   # every model through torch.compile
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from torch import nn

from lightning_lora import LoRAConfig, inject

#: wall time, or this process's CPU time (all threads): steadier when other jobs share the cores, exact with
#: --threads 1 (with more threads, OpenMP's spin-waiting counts as CPU time too).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
TARGETS = {"gpt2": {"c_attn": ["c_attn"], "all-linear": "all-linear"},
           "llama": {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}}


def build_model(kind: str, layers: int, hidden: int, seq: int) -> nn.Module:
    """A randomly initialised GPT-2- or Llama-shaped causal LM (dropout off, so variants compute the same)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=hidden // 64, n_positions=seq,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 256), max_position_embeddings=seq)
    return LlamaForCausalLM(config)


def variants(kind: str) -> list[str]:
    names = ["full", "floor"]
    for targets in TARGETS[kind]:
        names += [f"peft {targets}", f"ours {targets}"]
    return names


def make_variant(name: str, kind: str, args: argparse.Namespace) -> nn.Module:
    """The model for variant `name`: full, floor, or '<peft|ours> <targets>' with r=8, alpha=16, on
    `args.device` in `args.dtype` (each library then keeps its adapters in its default dtype)."""
    model = build_model(kind, args.layers, args.hidden, args.seq).to(args.device, getattr(torch, args.dtype))
    if name == "full":
        return model.train()
    if name == "floor":
        return model.requires_grad_(False).train()
    lib, targets = name.split(" ", 1)
    spec = TARGETS[kind][targets]
    if lib == "peft":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules=spec)
        return peft.get_peft_model(model, config).train()
    inject(model, LoRAConfig(r=8, alpha=16, dropout=args.dropout, target_modules=spec))
    return model.train()


def maybe_compile(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """With --compile, the model's forward through `torch.compile` (Inductor; it needs a C++ compiler on
    CPU): the step then runs the compiled forward and its compiled backward. Compiling happens in warm-up."""
    if args.compile:
        model.compile()
    return model


def make_step(name: str, model: nn.Module, args: argparse.Namespace) -> Callable[[], None]:
    """One training step of `model` as a closure (the floor's: gradient w.r.t. inputs_embeds only)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embed = model.get_input_embeddings()

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast):
            if name == "floor":
                embeds = embed(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=embeds, labels=ids).loss
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()  # the clock reads the host: wait for the GPU's queue
    return step


def time_variants(kind: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Step seconds per variant and round, the variants stepped in rotating order in this process."""
    names = variants(kind)
    steps = {n: make_step(n, maybe_compile(make_variant(n, kind, args), args), args) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = CLOCKS[args.clock]
    for round_ in range(args.warmup + args.steps):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            start = clock()
            steps[name]()
            if round_ >= args.warmup:
                times[name].append(clock() - start)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> str:
    """Median over rounds of `name`'s step time over `reference`'s in the same round, with the quartiles.

    Pairing by round cancels slow drifts of the machine (other tenants, frequency) that a ratio of two medians
    keeps."""
    ratios = [t / r for t, r in zip(times[name], times[reference])]
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{median:.3f} ({q1:.2f}-{q3:.2f})"


def steady_heap() -> None:
    """Keep freed memory in glibc's heap (no mmap'ed chunks, no trimming): each step then reuses pages instead
    of faulting in fresh zeroed ones for every large activation, which removes most of the run-to-run spread
    (and the page-fault time, which grows with what a variant allocates)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
    for option, value in ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 << 20)):
        if not libc.mallopt(option, value):
            raise OSError(f"mallopt({option}, {value}) failed")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(name: str, kind: str, args: argparse.Namespace) -> dict[str, float]:
    """Run in a child: peak RSS (on CUDA: peak allocated GPU memory) of `args.mem_steps` steps of one
    variant, and what the steps add."""
    step = make_step(name, maybe_compile(make_variant(name, kind, args), args), args)
    if args.compile:
        step()  # compiling takes far more memory than a step: measure after it (and the optimizer's state)
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the compiler's freed memory back, or steps reuse it unseen
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(args.mem_steps):
            step()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    for _ in range(args.mem_steps):
        step()
    peak = _rss_kb("VmHWM")
    return {"peak_mb": peak / 1024, "step_mb": (peak - before) / 1024}


def memory_in_child(name: str, kind: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", name, "--model", kind, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--seq", str(args.seq), "--batch", str(args.batch),
           "--mem-steps", str(args.mem_steps), "--threads", str(args.threads), "--dropout", str(args.dropout),
           "--device", args.device, "--dtype", args.dtype]
    cmd += ["--autocast"] * args.autocast + ["--compile"] * args.compile
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(kind: str, args: argparse.Namespace, times: dict[str, list[float]], memory: dict[str, dict]) -> str:
    heap = ", steady heap" if args.steady_heap else ""
    memory_kind = "GPU" if args.device == "cuda" else "RSS"
    rows = [(f"### {kind}-shaped: {args.layers} layers x {args.hidden}, seq {args.seq}, batch {args.batch}, "
             f"r=8, dropout {args.dropout}, {args.dtype}{' + bf16 autocast' * args.autocast}{', compiled' * args.compile} on {args.device}, {args.threads} threads, {args.clock} clock"
             f"{heap}; {args.steps} rounds, ratios paired by round (median, quartiles)"),
            "", (f"| variant | step ms | tokens/s | / floor | ours / PEFT | peak {memory_kind} MB | step peak MB | "
                 "step peak / PEFT |"), "|---|---|---|---|---|---|---|---|"]
    for name, t in times.items():
        lib, _, targets = name.partition(" ")
        peft_name = f"peft {targets}"
        vs_peft = paired_ratio(times, name, peft_name) if lib == "ours" else ""
        mem = memory.get(name, {})
        mem_vs = (f"{mem['step_mb'] / memory[peft_name]['step_mb']:.3f}"
                  if lib == "ours" and mem and memory.get(peft_name) else "")
        peak, step = (f"{mem['peak_mb']:,.0f}", f"{mem['step_mb']:,.0f}") if mem else ("-", "-")
        median = statistics.median(t)
        rows.append(f"| {name} | {1000 * median:,.0f} | {args.batch * args.seq / median:,.0f} | "
                    f"{paired_ratio(times, name, 'floor')} | "
                    f"{vs_peft} | {peak} | {step} | {mem_vs} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2", "llama", "both"], default="both")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="timed rounds (after --warmup rounds)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mem-steps", type=int, default=2, help="steps per memory child (0: skip memory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout of both ours and PEFT")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the models' weights")
    parser.add_argument("--autocast", action="store_true",
                        help="forward and loss under bf16 autocast (Lightning's precision='bf16-mixed')")
    parser.add_argument("--compile", action="store_true",
                        help="every variant's model through torch.compile (Inductor), compiled in warm-up")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall")
    parser.add_argument("--steady-heap", action="store_true",
                        help="time with glibc's heap kept (no page faults per step; see steady_heap)")
    parser.add_argument("--quick", action="store_true", help="2 layers x 256, seq 64, 3 steps: a smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    if "--quick" in sys.argv[1:]:  # its settings are defaults: flags given beside it still count
        parser.set_defaults(layers=2, hidden=256, seq=64, steps=3, warmup=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_memory(args.child, args.model, args)))
        return
    if args.steady_heap:
        steady_heap()
    for kind in (["gpt2", "llama"] if args.model == "both" else [args.model]):
        times = time_variants(kind, args)
        memory = {n: memory_in_child(n, kind, args) for n in variants(kind)} if args.mem_steps else {}
        print(table(kind, args, times, memory), flush=True)
        print()


if __name__ == "__main__":
    main()
