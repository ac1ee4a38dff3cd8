"""Push + pull of a 50 MB adapter three ways, in one run against `lora-hub serve` on 127.0.0.1:

- ``hub``: `hub.push` / `hub.pull` (validate, card, commit + tag; resolve, download, verify hashes, validate);
- ``raw``: the bare huggingface_hub calls they wrap (create_repo + create_commit + create_tag; snapshot_download);
- ``copy``: shutil copies of the same files to a folder and back, the floor for moving the bytes.

Each is run `--repeat` times on fresh repos and fresh caches; the table shows medians and our overhead over raw
(target: within 10 %). The server runs in its own process (`lora-hub serve`), as it would in use.

    nice .venv/bin/python bench/hub.py [--mb 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# run as a script, this file's folder comes first on sys.path and its name would shadow the `hub` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.utils import disable_progress_bars
from safetensors.torch import save_file

import hub
from lightning_lora import LoRAConfig


def make_adapter(directory: Path, megabytes: int, r: int = 64, width: int = 4096) -> Path:
    """A valid PEFT-format adapter of about `megabytes` MB: `n` layers of A [r, width] and B [width, r]."""
    per_layer = 2 * r * width * 4
    n = max(1, round(megabytes * 1e6 / per_layer))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(n):
        prefix = f"base_model.model.layers.{i}.proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, width, generator=g)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, r, generator=g)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoRAConfig(r=r, alpha=2 * r, target_modules=["proj"], base_model="bench/base").to_peft_dict()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).parent / "lora-hub"
    proc = subprocess.Popen([str(exe), "serve", "--root", str(root), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    return proc, proc.stdout.readline().split(" at ")[1].split()[0]


# each method: push(adapter, repo, url, work) and pull(repo, url, cache, work)
def copy_push(adapter: Path, repo: str, url: str, work: Path) -> None:
    shutil.copytree(adapter, work / "store" / repo)


def copy_pull(repo: str, url: str, cache: Path, work: Path) -> None:
    shutil.copytree(work / "store" / repo, cache)


def raw_push(adapter: Path, repo: str, url: str, work: Path) -> None:
    api = HfApi(endpoint=url, token=False)
    api.create_repo(repo, private=True, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sorted(adapter.iterdir())]
    commit = api.create_commit(repo, ops, commit_message="raw push")
    api.create_tag(repo, tag="v1.0.0", revision=commit.oid)


def raw_pull(repo: str, url: str, cache: Path, work: Path) -> None:
    snapshot_download(repo, revision="v1.0.0", cache_dir=cache, endpoint=url, token=False)


def hub_push(adapter: Path, repo: str, url: str, work: Path) -> None:
    hub.push(adapter, repo, version="1.0.0", endpoint=url, token=False)


def hub_pull(repo: str, url: str, cache: Path, work: Path) -> None:
    hub.pull(f"{repo}@^1.0", cache_dir=cache, endpoint=url, token=False)


METHODS = {"copy": (copy_push, copy_pull), "raw": (raw_push, raw_pull), "hub": (hub_push, hub_pull)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    proc, url = start_server(work / "server")
    try:
        adapter = make_adapter(work / "adapter", args.mb)
        size = sum(p.stat().st_size for p in adapter.iterdir())
        times: dict[str, dict[str, list[float]]] = {k: {"push": [], "pull": []} for k in METHODS}
        for i in range(args.repeat):
            for kind, (push, pull) in METHODS.items():  # interleaved, so load drift hits all three alike
                repo, cache = f"bench/{kind}-{i}", work / f"cache-{kind}-{i}"
                times[kind]["push"].append(timed(lambda: push(adapter, repo, url, work)))  # noqa: B023
                times[kind]["pull"].append(timed(lambda: pull(repo, url, cache, work)))  # noqa: B023
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: {op: statistics.median(v) for op, v in ops.items()} for k, ops in times.items()}
    print(f"push + pull of a {size / 1e6:.1f} MB adapter, median of {args.repeat}, server {url}")
    print(f"{'method':<6} {'push s':>8} {'pull s':>8} {'total s':>8} {'MB/s':>7} {'vs raw':>7}")
    raw_total = med["raw"]["push"] + med["raw"]["pull"]
    for kind, m in med.items():
        total = m["push"] + m["pull"]
        print(f"{kind:<6} {m['push']:8.3f} {m['pull']:8.3f} {total:8.3f} {2 * size / 1e6 / total:7.1f} "
              f"{total / raw_total:7.2f}")
    overhead = (med["hub"]["push"] + med["hub"]["pull"]) / raw_total - 1
    print(f"hub overhead over the raw client: {100 * overhead:+.1f} % (target within 10 %)")


if __name__ == "__main__":
    main()
