"""`hub.server` under crashes and load: kill -9 between the commit and the ref update, clients that vanish
mid-upload, racing pushes and tags, 32 parallel downloads. Nothing half-written ever becomes visible."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from helpers import point_hf_client
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from hub.server import serve

REPO = "team/adapter"
ROOT_DIR = Path(__file__).resolve().parents[1]


def _ops(version: int, size: int = 20_000) -> list[CommitOperationAdd]:
    """What a push of `version` sends: a config and weights whose bytes are unique to the version."""
    weights = hashlib.sha256(str(version).encode()).digest() * (size // 32)
    return [
        CommitOperationAdd("adapter_config.json", json.dumps({"version": version}).encode()),
        CommitOperationAdd("adapter_model.safetensors", weights),
    ]


def _push(api: HfApi, repo: str, version: int, tag: str | None = None, **kwargs) -> str:
    info = api.create_commit(repo, operations=_ops(version), commit_message=f"v{version}", **kwargs)
    if tag:
        api.create_tag(repo, tag=tag, revision=info.oid)
    return info.oid


def _version_at(api: HfApi, repo: str, revision: str, cache: Path) -> int:
    path = hf_hub_download(repo, "adapter_config.json", revision=revision, cache_dir=cache)
    weights = Path(hf_hub_download(repo, "adapter_model.safetensors", revision=revision, cache_dir=cache))
    version = json.loads(Path(path).read_text())["version"]
    assert weights.read_bytes() == _ops(version)[1].path_or_fileobj, f"{revision}: weights of another version"
    return version


def _start_subprocess(root: Path, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub.server", "--root", str(root), "--port", "0"],
        cwd=ROOT_DIR,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # "serving http://127.0.0.1:PORT", printed once the socket is bound
    assert line.startswith("serving http://"), line
    return proc, line.split()[1]


def test_kill_9_between_commit_and_ref_update(tmp_path, monkeypatch):
    root, marker = tmp_path / "root", tmp_path / "paused"
    with serve(root) as server:
        point_hf_client(monkeypatch, server.url, tmp_path / "home")
        api = HfApi(endpoint=server.url)
        api.create_repo(REPO)
        first = _push(api, REPO, 1, tag="v1.0.0")
        refs, commits = api.list_repo_refs(REPO), api.list_repo_commits(REPO)

    proc, url = _start_subprocess(root, {"LORA_HUB_PAUSE_BEFORE_REF": str(marker)})
    try:
        api = HfApi(endpoint=url)
        errors = []
        pusher = threading.Thread(
            target=lambda: errors.append(_catch(lambda: _push(api, REPO, 2, tag="v1.1.0")))
        )
        pusher.start()
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None, (
                "the server never reached the ref update"
            )
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # blobs and the commit file are on disk, refs.json is not updated
        proc.wait(timeout=10)
        pusher.join(timeout=30)
        assert errors and errors[0] is not None, "the interrupted push must fail on the client"
    finally:
        proc.kill()
    repo_dir = root / "repos" / "model" / "team" / "adapter"
    assert len(list((repo_dir / "commits").glob("*.json"))) == 3  # initial, v1, and v2's orphan commit

    with serve(root) as server:  # restart: the old state, no half version
        point_hf_client(monkeypatch, server.url, tmp_path / "home2")
        api = HfApi(endpoint=server.url)
        assert api.list_repo_refs(REPO) == refs and api.list_repo_commits(REPO) == commits
        assert _version_at(api, REPO, "main", tmp_path / "c1") == 1
        assert not list((repo_dir / "tmp").iterdir())
        second = _push(api, REPO, 2, tag="v1.1.0")  # the retry succeeds
        assert {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags} == {
            "v1.0.0": first,
            "v1.1.0": second,
        }
        assert _version_at(api, REPO, "v1.1.0", tmp_path / "c2") == 2


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e
    return None


def _send_half(url: str, head: str, body: bytes) -> None:
    """A client dying mid-request: headers announce all of `body`, half is sent, the socket closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"{head}\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2]
        )


def _lfs_upload_href(url: str, oid: str, size: int) -> str:
    """Where the server's LFS batch endpoint says to PUT an object of that sha256 and size."""
    answer = httpx2.post(f"{url}/{REPO}.git/info/lfs/objects/batch",
                         json={"operation": "upload", "objects": [{"oid": oid, "size": size}]}).json()
    return answer["objects"][0]["actions"]["upload"]["href"]


def test_client_dying_mid_upload_changes_nothing(hub_server, tmp_path):
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    refs = api.list_repo_refs(REPO)
    content = os.urandom(3_000_000)
    commit = b"".join(
        json.dumps(item).encode() + b"\n"
        for item in [
            {"key": "header", "value": {"summary": "dies"}},
            {
                "key": "file",
                "value": {
                    "path": "w.bin",
                    "encoding": "base64",
                    "content": base64.b64encode(content).decode(),
                },
            },
        ]
    )
    _send_half(hub_server.url, f"POST /api/models/{REPO}/commit/main HTTP/1.1", commit)
    oid = hashlib.sha256(content).hexdigest()
    href = _lfs_upload_href(hub_server.url, oid, len(content))
    _send_half(hub_server.url, f"PUT {href.removeprefix(hub_server.url)} HTTP/1.1", content)

    repo_dir = hub_server.root / "repos" / "model" / "team" / "adapter"
    deadline = time.monotonic() + 10
    while list((repo_dir / "tmp").iterdir()):  # the handlers notice the EOF and remove their temp files
        assert time.monotonic() < deadline, list((repo_dir / "tmp").iterdir())
        time.sleep(0.05)
    assert api.list_repo_refs(REPO) == refs and len(api.list_repo_commits(REPO)) == 1
    assert not (repo_dir / "objects" / oid[:2] / oid[2:]).exists()
    _push(api, REPO, 1, tag="v1.0.0")  # and the server goes on serving
    assert _version_at(api, REPO, "v1.0.0", tmp_path / "c") == 1


@pytest.mark.parametrize("gone", ["move", "delete"])
def test_repo_moved_or_deleted_mid_upload_is_404_not_500(hub_server, gone):
    """A commit and an LFS upload whose repo is moved or deleted while their bodies arrive: 404 RepoNotFound,
    as for a request that came later (it was a 500, "internal server error"), and the repo stays whole."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    content = os.urandom(2_000_000)
    line = {"key": "file", "value": {"path": "w.bin", "content": base64.b64encode(content).decode()}}
    header = {"key": "header", "value": {"summary": "x"}}
    commit = b"".join(json.dumps(i).encode() + b"\n" for i in [header, line])
    href = _lfs_upload_href(hub_server.url, hashlib.sha256(content).hexdigest(), len(content))
    host, port = hub_server.url.removeprefix("http://").split(":")
    sockets, uploads = [], [(f"POST /api/models/{REPO}/commit/main", commit), (f"PUT {href.split(port)[1]}", content)]
    for head, body in uploads:
        sock = socket.create_connection((host, int(port)), timeout=10)
        request = f"{head} HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(request.encode() + body[:1000])
        sockets.append((sock, body[1000:]))
    tmp = hub_server.root / "repos" / "model" / "team" / "adapter" / "tmp"
    while not list(tmp.iterdir()):  # the LFS upload is being written: both handlers are past their checks
        time.sleep(0.01)
    api.move_repo(REPO, "team/moved") if gone == "move" else api.delete_repo(REPO)
    for sock, rest in sockets:
        sock.sendall(rest)
        answer = sock.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 404") and "X-Error-Code: RepoNotFound" in answer, answer
        sock.close()
    if gone == "move":
        assert len(api.list_repo_commits("team/moved")) == 1
        api.upload_file(path_or_fileobj=content, path_in_repo="w.bin", repo_id="team/moved")


def test_concurrent_pushes_land_whole_or_fail_cleanly(hub_server, tmp_path):
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    with ThreadPoolExecutor(8) as pool:  # 8 versions into one repo
        oids = dict(zip(range(8), pool.map(lambda v: _push(api, REPO, v, tag=f"v1.{v}.0"), range(8))))
    tags = {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}
    assert tags == {f"v1.{v}.0": oid for v, oid in oids.items()}
    history = api.list_repo_commits(REPO)
    assert len(history) == 9 and {c.commit_id for c in history[:8]} == set(oids.values())
    for version in range(8):
        assert _version_at(api, REPO, f"v1.{version}.0", tmp_path / "c") == version

    repos = [f"team/repo-{i}" for i in range(8)]  # 8 repos at once
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: (api.create_repo(repos[i]), _push(api, repos[i], i, tag="v1.0.0")), range(8)))
    for i, repo in enumerate(repos):
        assert _version_at(api, repo, "v1.0.0", tmp_path / "c") == i

    head = api.list_repo_refs(REPO).branches[0].target_commit  # 8 pushes that all expect the same parent
    results = list(
        ThreadPoolExecutor(8).map(
            lambda v: _catch(lambda: _push(api, REPO, 10 + v, parent_commit=head)), range(8)
        )
    )
    assert sum(r is None for r in results) == 1
    assert all(r.response.status_code == 412 for r in results if r is not None)

    heads = [c.commit_id for c in api.list_repo_commits(REPO)[:8]]  # the same tag, 8 times at once
    results = list(
        ThreadPoolExecutor(8).map(
            lambda oid: _catch(lambda: api.create_tag(REPO, tag="v2.0.0", revision=oid)), heads
        )
    )
    winners = [oid for oid, r in zip(heads, results) if r is None]
    assert len(winners) == 1 and all(
        isinstance(r, HfHubHTTPError) and r.response.status_code == 409 for r in results if r is not None
    )
    assert {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags}["v2.0.0"] == winners[0]


def test_32_concurrent_downloads_get_identical_bytes(hub_server, tmp_path):
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    api.create_commit(
        REPO, operations=[CommitOperationAdd("big.bin", os.urandom(1_000_000))], commit_message="x"
    )
    api.create_tag(REPO, tag="v1.0.0")

    def pull(i: int) -> str:
        folder = snapshot_download(REPO, revision="v1.0.0", cache_dir=tmp_path / f"cache-{i}")
        return hashlib.sha256((Path(folder) / "big.bin").read_bytes()).hexdigest()

    with ThreadPoolExecutor(32) as pool:
        digests = set(pool.map(pull, range(32)))
    stored = api.list_repo_tree(REPO, revision="v1.0.0")
    assert len(digests) == 1 and api.repo_exists(REPO) and any(f.path == "big.bin" for f in stored)
    assert digests == {
        hashlib.sha256(
            Path(hf_hub_download(REPO, "big.bin", cache_dir=tmp_path / "c")).read_bytes()
        ).hexdigest()
    }


def test_second_server_on_the_same_root_touches_nothing(hub_server, tmp_path):
    """A second server on a root in use, on the same port (cannot bind) or another (the root is locked), is
    refused before it cleans anything: the running server's upload in flight completes."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    content = os.urandom(2_000_000)
    oid = hashlib.sha256(content).hexdigest()
    href = _lfs_upload_href(hub_server.url, oid, len(content))
    host, port = hub_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = f"PUT {href.removeprefix(hub_server.url)} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(content)}"
        sock.sendall(f"{head}\r\n\r\n".encode() + content[:1_000_000])
        tmp = hub_server.root / "repos" / "model" / REPO / "tmp"
        deadline = time.monotonic() + 10
        while not list(tmp.iterdir()):
            assert time.monotonic() < deadline, "the upload never reached the server's temp folder"
            time.sleep(0.05)
        with pytest.raises(OSError, match="in use"):
            serve(hub_server.root, port=int(port))
        assert list(tmp.iterdir())
        with pytest.raises(OSError, match="another lora-hub serve is using this root"):
            serve(hub_server.root)
        assert list(tmp.iterdir())
        sock.sendall(content[1_000_000:])
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    assert (hub_server.root / "repos" / "model" / REPO / "objects" / oid[:2] / oid[2:]).read_bytes() == content
