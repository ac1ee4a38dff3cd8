"""What `hub.server` holds on loopback: pushes/s, pulls/s and latency percentiles, as a markdown table.

The server runs as its own process (``python -m hub.server``), so the clients' Python does not share its GIL.
A push is what `lora-hub push` does: one `create_commit` (a config and `--size-kb` of weights, sent as regular
files, as a default client with hf_xet does) plus one `create_tag`. A pull is `snapshot_download` of a
tag into an empty cache (revision info, tree, then HEAD + GET per file). Each runs with 1 client, then with
`--clients` at once; ops/s is operations over wall time, latencies are per operation.

    nice python bench/hub_load.py [--pushes 40] [--pulls 80] [--clients 8] [--size-kb 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download

REPO = "bench/adapter"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(label: str, fn, count: int, clients: int) -> dict:
    latencies: list[float] = []

    def timed(i: int) -> None:
        start = time.perf_counter()
        fn(i)
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(timed, range(count)))
    wall = time.perf_counter() - start
    return {
        "op": label,
        "clients": clients,
        "n": count,
        "ops_s": count / wall,
        "p50": statistics.median(latencies) * 1e3,
        "p99": percentile(latencies, 99) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=40)
    parser.add_argument("--pulls", type=int, default=80)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size-kb", type=int, default=1024)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hub-load-"))
    server = subprocess.Popen(
        [sys.executable, "-m", "hub.server", "--root", str(work / "root"), "--port", "0"],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().split()[1]
        api = HfApi(endpoint=url)
        api.create_repo(REPO)
        weights = os.urandom(args.size_kb * 1024)

        def push(i: int) -> None:
            tag = f"v{next(counter)}.0.0"
            info = api.create_commit(
                REPO,
                commit_message=tag,
                operations=[
                    CommitOperationAdd("adapter_config.json", f'{{"tag": "{tag}"}}'.encode()),
                    CommitOperationAdd("adapter_model.safetensors", weights[:-8] + i.to_bytes(8, "little")),
                ],
            )
            api.create_tag(REPO, tag=tag, revision=info.oid)

        def pull(i: int) -> None:
            snapshot_download(
                REPO, revision="v0.0.0", endpoint=url, cache_dir=work / "cache" / f"{time.time_ns()}"
            )

        counter = iter(range(10**9))
        rows = [
            run("push", push, args.pushes, 1),
            run("push", push, args.pushes, args.clients),
            run("pull", pull, args.pulls, 1),
            run("pull", pull, args.pulls, args.clients),
        ]
        assert len(api.list_repo_refs(REPO).tags) == 2 * args.pushes, "a push went missing"
    finally:
        server.terminate()
        server.wait()
    print(f"\n{args.size_kb} KiB adapter, server `python -m hub.server` on loopback, {os.cpu_count()} CPUs\n")
    print("| operation | clients | n | ops/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['op']} | {r['clients']} | {r['n']} | {r['ops_s']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} |"
        )


if __name__ == "__main__":
    main()
