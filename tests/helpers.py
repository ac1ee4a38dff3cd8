"""Tiny models built from transformers configs (nothing downloaded) and small training helpers, shared by
every test file. Keep them tiny: the whole suite runs on 2 CPU cores."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import torch
from torch import nn


def tiny_gpt2(seed: int = 0, n_embd: int = 32, n_layer: int = 2) -> nn.Module:
    """GPT2LMHeadModel with Conv1D `c_attn` / `c_proj` / `c_fc` (weights stored [in, out])."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=4,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> nn.Module:
    """LlamaForCausalLM with grouped-query attention (2 KV heads for 4 query heads), so `k_proj`/`v_proj`
    are narrower than `q_proj`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_bert_classifier(seed: int = 0, hidden: int = 32, layers: int = 2, num_labels: int = 3) -> nn.Module:
    """BertForSequenceClassification: `query` / `value` to adapt, a fresh `classifier` head to save."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0, d_model: int = 32, layers: int = 2) -> nn.Module:
    """T5ForConditionalGeneration, whose feed-forward reads `wo.weight.dtype` in forward (a wrapped `wo` must
    still have a `.weight`). Inputs need `decoder_input_ids` beside `input_ids`."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_heads=4,
                      decoder_start_token_id=0, dropout_rate=0.0)
    return T5ForConditionalGeneration(config).eval()


class SmallConvNet(nn.Module):
    """A diffusion-UNet-like stack: Conv2d, Conv1d over rows, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_mid = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv_row = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv_mid(torch.relu(self.conv_in(x))))  # [B, 8, 4, 4]
        h = self.conv_row(h.flatten(2)[..., :4])  # [B, 8, 4]
        return self.head(h.flatten(1))


def small_conv_net(seed: int = 0) -> SmallConvNet:
    torch.manual_seed(seed)
    return SmallConvNet().eval()


def token_batch(seed: int = 1, batch: int = 2, seq: int = 8, vocab: int = 64) -> dict[str, torch.Tensor]:
    """`input_ids` (and matching `labels`) for the tiny language / classification models."""
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}


def image_batch(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def model_output(model: nn.Module, batch) -> torch.Tensor:
    """The model's main output tensor for `batch` (a dict of HF inputs or a tensor), without gradients."""
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out.logits if hasattr(out, "logits") else out


def _loss(model: nn.Module, batch) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float().pow(2).mean() - logits.float().mean()


def train_steps(model: nn.Module, batch, steps: int = 3, lr: float = 0.05) -> nn.Module:
    """A few Adam steps on whatever is trainable, so LoRA's B (zero at init) becomes non-zero. Returns the
    model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing is trainable"
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    return model.eval()


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every tensor in `model.state_dict()`, to prove later that nothing changed."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """`model`'s state_dict has exactly the keys and values of `snapshot` (bitwise)."""
    now = model.state_dict()
    assert list(now) == list(snapshot), "the model's parameter set changed"
    for key, value in snapshot.items():
        assert torch.equal(now[key], value), f"{key} changed"


def saved_adapter(directory, seed: int = 0, r: int = 4, targets=("c_attn",), n_embd: int = 32) -> nn.Module:
    """A tiny GPT-2 (weights from `seed`) with a LoRA adapter trained two steps (so B is non-zero), saved in
    PEFT's format to `directory` with base model "tiny-gpt2". Returns the adapted model."""
    from lightning_lora import LoRAConfig, inject, save_adapter

    model = tiny_gpt2(seed=seed, n_embd=n_embd)
    inject(model, LoRAConfig(r=r, alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM"))
    train_steps(model, token_batch(seed=seed), steps=2)
    save_adapter(model, directory, base_model="tiny-gpt2")
    return model


def point_hf_client(monkeypatch, url: str, home, token: str | None = None, xet: bool = True) -> None:
    """Point the unmodified huggingface_hub client (and so transformers and PEFT) at the server at `url`, with
    a fresh cache under `home`, no telemetry, online, and HF_TOKEN = `token` (unset if None).

    huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET... once, when `huggingface_hub.constants` is
    first imported, so inside a running test process the environment alone does not move it: the constants
    are patched too (the client reads ``constants.X`` at call time). ``HUGGINGFACE_CO_URL_TEMPLATE`` must move
    with ``ENDPOINT``, or ``hf_hub_url`` keeps building public-Hub URLs even when given ``endpoint=``. The
    environment is set as well, for subprocesses. The module-level functions (``huggingface_hub.create_repo``...)
    are methods of one `HfApi` made at import time, whose endpoint is patched too. `xet=False` is
    ``HF_HUB_DISABLE_XET=1`` (the LFS path)."""
    from pathlib import Path

    from huggingface_hub import constants, hf_api

    home = Path(home)
    for key, value in {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH",
                "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(key, raising=False)
    if not xet:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    patched = {
        "ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"), "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_XET": not xet,
    }
    for key, value in patched.items():
        monkeypatch.setattr(constants, key, value)
    monkeypatch.setattr(hf_api.api, "endpoint", url)  # the instance behind huggingface_hub.create_repo & co.


def script_env() -> dict[str, str]:
    """The environment for a test script run in a subprocess: tests/ for its imports, then this checkout, ahead of
    any installed lightning_lora (an editable install of another checkout would otherwise be what it runs)."""
    tests = Path(__file__).resolve().parent
    return {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": f"{tests}{os.pathsep}{tests.parent}"}


def run_script(script, root, *args: str, timeout: float = 240):
    """Run a multi-process Lightning script (DDP / FSDP re-execute ``sys.argv`` for rank 1, which a pytest
    process cannot) as ``python script root *args`` in its own process group, killed whole if it outlives
    `timeout`. Returns the `subprocess.CompletedProcess`, stdout and stderr merged."""
    import signal
    import subprocess
    import sys

    env = script_env()
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, str(script), str(root), *args], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is rank 0's child: never leave it behind
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


class Relay:
    """A TCP relay in front of the hub that can fail like a network or a dying client: connections whose
    request line contains `drop` are cut, and after `stall_after` bytes from the client it stops forwarding
    and sets `stalled` (the client then blocks mid-upload) until `close()`."""

    def __init__(self, target: str, drop: bytes | None = None, stall_after: int | None = None) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target, self.drop, self.stall_after = (host, int(port)), drop, stall_after
        self.sent, self.stalled, self.sockets, self.request = 0, threading.Event(), [], b""
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if from_client and data.split(b" ", 1)[0] in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE"):
                    self.request = data.split(b"\r\n", 1)[0]
                if from_client and self.drop and self.drop in self.request:
                    break
                if from_client and self.stall_after is not None and self.sent + len(data) > self.stall_after:
                    self.stalled.set()
                    return
                self.sent += len(data) if from_client else 0
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            s.close()

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            s.close()
