"""`hub.server` against the unmodified huggingface_hub client: every verb the hub uses, with Xet at the
client's default (the server answers "regular" for every file) and with HF_HUB_DISABLE_XET=1 against a server
with an LFS threshold (the LFS batch API); token auth; path traversal; upload limits; restarts."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import time
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from helpers import point_hf_client
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

from hub.server import serve

REPO = "team/adapter"


def _folder(path: Path, version: int, big: int = 6000) -> Path:
    """An adapter-like folder: a config, a README with YAML (validate-yaml), a binary, a nested file."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 4, "version": version}))
    (path / "README.md").write_text(f"---\nlibrary_name: peft\n---\n# v{version}\n")
    (path / "adapter_model.safetensors").write_bytes(os.urandom(big))
    (path / "extra").mkdir()
    (path / "extra" / "notes.txt").write_text(f"notes {version}")
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.parts
    }


def _files_outside(root: Path, allowed: set[str]) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in allowed)


@pytest.fixture(params=["xet-default", "lfs"])
def server_mode(request, tmp_path, monkeypatch):
    """Xet left at the client's default vs HF_HUB_DISABLE_XET=1 with files >= 1 kB announced as LFS."""
    lfs = request.param == "lfs"
    with serve(tmp_path / "root", lfs_threshold=1024 if lfs else None) as server:
        point_hf_client(monkeypatch, server.url, tmp_path / "home", xet=not lfs)
        yield server, lfs


def test_client_round_trip(server_mode, tmp_path):
    server, lfs = server_mode
    api = HfApi(endpoint=server.url)
    url = api.create_repo(REPO)
    assert url == f"{server.url}/{REPO}" and api.create_repo(REPO, exist_ok=True) == url
    with pytest.raises(HfHubHTTPError, match="already created"):
        api.create_repo(REPO)

    v1, v2 = _folder(tmp_path / "v1", 1), _folder(tmp_path / "v2", 2)
    first = api.upload_folder(folder_path=v1, repo_id=REPO, commit_message="release 1")
    api.create_tag(REPO, tag="v1.0.0", revision=first.oid)
    second = api.upload_folder(folder_path=v2, repo_id=REPO, commit_message="release 2")
    api.create_tag(REPO, tag="v1.1.0")
    with pytest.raises(HfHubHTTPError, match="already exists") as err:
        api.create_tag(REPO, tag="v1.0.0", revision=second.oid)
    assert err.value.response.status_code == 409

    refs = api.list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0.0": first.oid, "v1.1.0": second.oid}
    assert [b.name for b in refs.branches] == ["main"] and refs.branches[0].target_commit == second.oid
    commits = api.list_repo_commits(REPO)
    assert [c.commit_id for c in commits[:2]] == [second.oid, first.oid]
    assert [c.title for c in commits] == ["release 2", "release 1", "initial commit"]

    tree = {f.path: f for f in api.list_repo_tree(REPO, revision="v1.0.0", recursive=True)}
    weights = tree["adapter_model.safetensors"]
    assert (
        weights.size == 6000 and (weights.lfs is not None) == lfs
    )  # Xet default: every file travelled inline
    if lfs:
        assert (
            weights.lfs.sha256 == hashlib.sha256((v1 / "adapter_model.safetensors").read_bytes()).hexdigest()
        )
    assert "extra" in tree and tree["extra/notes.txt"].size == len("notes 1")

    pulled = Path(snapshot_download(REPO, revision="v1.0.0"))
    assert _digests(pulled) == {**_digests(v1), ".gitattributes": _digests(pulled)[".gitattributes"]}
    latest = hf_hub_download(REPO, "adapter_model.safetensors")
    assert Path(latest).read_bytes() == (v2 / "adapter_model.safetensors").read_bytes()
    assert api.file_exists(REPO, "extra/notes.txt") and not api.file_exists(REPO, "missing.txt")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    infos = api.get_paths_info(REPO, ["README.md", "extra", "nope"], revision="v1.1.0")
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "README.md"), ("RepoFolder", "extra")]
    assert api.model_info(REPO, revision="v1.0.0").sha == first.oid

    again = api.upload_folder(folder_path=v2, repo_id=REPO)  # nothing changed: the client skips the commit
    assert again.oid == second.oid and len(api.list_repo_commits(REPO)) == 3

    assert api.repo_exists(REPO) and not api.repo_exists("team/missing")
    api.delete_tag(REPO, tag="v1.1.0")
    assert [t.name for t in api.list_repo_refs(REPO).tags] == ["v1.0.0"]
    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)
    assert not (server.root / "repos" / "model" / "team" / "adapter").exists()


def test_xet_client_against_lfs_server_fails_cleanly(tmp_path, monkeypatch):
    """A client with hf_xet sends every "lfs" file through Xet, which this server does not speak: the upload
    fails at once (no hang, no retries) and the repo is unchanged."""
    with serve(tmp_path / "root", lfs_threshold=1024) as server:
        point_hf_client(monkeypatch, server.url, tmp_path / "home", xet=True)
        api = HfApi(endpoint=server.url)
        api.create_repo(REPO)
        with pytest.raises(Exception, match="xet-write-token"):
            api.upload_folder(folder_path=_folder(tmp_path / "v1", 1), repo_id=REPO)
        assert len(api.list_repo_commits(REPO)) == 1


def test_auth(hub_token, tmp_path, capfd):
    api = HfApi(endpoint=hub_token.url)
    hub_token.log = True  # request logs go to stderr: they must not contain the token
    with pytest.raises(HfHubHTTPError, match="needs a token for writes") as err:
        api.create_repo(REPO, token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as err:
        api.create_repo(REPO, token="hf_wrong")
    assert err.value.response.status_code == 401
    assert api.whoami()["name"] == "local"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="hf_wrong")

    api.create_repo(REPO, private=True)
    api.upload_folder(folder_path=_folder(tmp_path / "v1", 1), repo_id=REPO)
    api.create_repo("team/public", private=False)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=tmp_path / "v1", repo_id="team/public", token=False)
    assert err.value.response.status_code == 401

    # Without the token a private repo is indistinguishable from a missing one.
    answers = {}
    for repo in (REPO, "team/missing"):
        assert not api.repo_exists(repo, token=False)
        assert not api.file_exists(repo, "adapter_config.json", token=False)
        with pytest.raises(RepositoryNotFoundError) as err:
            hf_hub_download(repo, "adapter_config.json", token=False, cache_dir=tmp_path / "c")
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_refs(repo, token=False)
        response = err.value.response
        answers[repo] = (
            response.status_code,
            response.headers["X-Error-Code"],
            response.text.replace(repo, "<repo>"),
        )
    assert answers[REPO] == answers["team/missing"]
    assert api.repo_exists("team/public", token=False) and api.repo_exists(REPO)
    assert api.model_info(REPO).private and not api.model_info("team/public").private
    out = capfd.readouterr()
    assert HUB_TOKEN not in out.out + out.err and "POST /api/repos/create 401" in out.err


@pytest.mark.parametrize("token", ["", "  "])
def test_empty_token_is_refused_at_start(tmp_path, token):
    with pytest.raises(ValueError, match="token is empty"):
        serve(tmp_path / "root", token=token)
    assert not (tmp_path / "root").exists()


def test_server_token_read_with_its_newline_still_matches(tmp_path):
    """A token read from a file keeps its newline; the header's value is read stripped, so the server's is too."""
    with serve(tmp_path / "root", token=HUB_TOKEN + "\n") as server:
        HfApi(endpoint=server.url, token=HUB_TOKEN).create_repo(REPO)
        with pytest.raises(HfHubHTTPError, match="401"):
            HfApi(endpoint=server.url, token="wrong").create_repo("me/other")


def test_settings_change_only_what_the_body_names(hub_server):
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO, private=True)
    api.update_repo_settings(REPO, gated="auto")  # names no visibility: the repo stays private
    assert api.model_info(REPO).private
    api.update_repo_settings(REPO, private=False)
    api.update_repo_settings(REPO, gated=False)
    assert not api.model_info(REPO).private
    api.update_repo_settings(REPO, visibility="private")
    assert api.model_info(REPO).private
    status, _, body = _raw(hub_server, "PUT", f"/api/models/{REPO}/settings", {"visibility": "secret"})
    assert status == 400 and "visibility 'secret'" in json.loads(body)["error"]
    assert api.model_info(REPO).private


def test_delete_folders(hub_server):
    """A trailing '/' marks a folder (`CommitOperationDelete("dir/")`), as on the Hub; traversal stays refused."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    for path in ("a/x.txt", "a/deep/y.txt", "b/z.txt", "c/w.txt", "keep.txt"):
        api.upload_file(path_or_fileobj=path.encode(), path_in_repo=path, repo_id=REPO)
    api.create_commit(REPO, [CommitOperationDelete("a/")], commit_message="rm a/")
    api.delete_folder("b", REPO)
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "c/w.txt", "keep.txt"]
    for path in ("../", "c//", "/c/", "c/../"):
        payload = _ndjson({"key": "header", "value": {"summary": "evil"}},
                          {"key": "deletedFolder", "value": {"path": path}})
        status, _, body = _raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", payload)
        assert status == 400 and "invalid file path" in json.loads(body)["error"], (path, body)
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "c/w.txt", "keep.txt"]


def test_unquoted_slash_in_a_revision_is_400_not_500(hub_server, capfd):
    """The client quotes '/' in revisions (``feat%2Fx``); a raw '/' gives extra segments, refused with a 400
    (a 5xx would be retried) that says how to quote, except after /tree/, where they are the folder."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="d/f.txt", repo_id=REPO)
    api.create_branch(REPO, branch="feat/x")
    hub_server.log = True
    for method, route in [("GET", "revision"), ("GET", "commits"), ("POST", "tag"), ("POST", "paths-info"),
                          ("POST", "preupload"), ("POST", "commit"), ("DELETE", "branch")]:
        status, _, body = _raw(hub_server, method, f"/api/models/{REPO}/{route}/feat/x", {"tag": "t"})
        assert status == 400 and "quote '/' in a revision as %2F" in json.loads(body)["error"], (route, body)
    err = capfd.readouterr().err
    assert "Traceback" not in err and " 500" not in err
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["feat/x", "main"] and not api.list_repo_refs(REPO).tags
    assert api.model_info(REPO, revision="feat/x").sha == api.list_repo_commits(REPO, revision="feat/x")[0].commit_id
    assert [f.path for f in api.list_repo_tree(REPO, path_in_repo="d", revision="feat/x")] == ["d/f.txt"]


def _raw(server, method: str, path: str, body: bytes | dict | None = None, token: str | None = None):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, response.headers, payload


def _ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


HOSTILE_PATHS = [
    "../evil.txt",
    "/abs.txt",
    "a/../../evil.txt",
    "a\x00b.txt",
    "x" * 1200,
    ".git/config",
    "a//b.txt",
    "./a.txt",
    "a\\..\\evil.txt",
]


def test_traversal_and_malformed_names_are_refused(hub_server, tmp_path):
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    before = api.list_repo_refs(REPO)
    outside_before = _files_outside(tmp_path, {"hub-root", "hf-home"})

    for namespace, name in [
        ("..", "x"),
        ("team", ".."),
        ("team", "../../etc"),
        ("team", "a\x00b"),
        ("/abs", "x"),
        ("team", "x" * 300),
        ("team", "a--b"),
        ("team", "a.git"),
    ]:
        status, headers, body = _raw(
            hub_server, "POST", "/api/repos/create", {"name": name, "organization": namespace}
        )
        assert status == 400 and "invalid" in json.loads(body)["error"], (namespace, name, body)
    for path in [
        "/api/models/..%2F..%2Fetc/passwd",
        "/%2E%2E/%2E%2E/resolve/main/x",
        "/api/models/team/a%00b",
    ]:
        assert _raw(hub_server, "GET", path)[0] in (400, 404)

    for tag in ["../../x", "a/../b", "/abs", "x\x00y", "-x", "a" * 300, "x.lock", "a//b"]:
        status, _, body = _raw(hub_server, "POST", f"/api/models/{REPO}/tag/main", {"tag": tag})
        assert status == 400 and "invalid tag" in json.loads(body)["error"], (tag, body)
    for revision in ["..%2F..%2Frepo.json", "..", "%2Fetc%2Fpasswd"]:
        status, headers, _ = _raw(hub_server, "GET", f"/{REPO}/resolve/{revision}/.gitattributes")
        assert status in (400, 404) and headers.get("X-Error-Code") in (None, "RevisionNotFound")

    for path in HOSTILE_PATHS:
        payload = _ndjson(
            {"key": "header", "value": {"summary": "evil"}},
            {"key": "file", "value": {"path": path, "content": "aGk=", "encoding": "base64"}},
        )
        status, _, body = _raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", payload)
        assert status == 400 and "invalid file path" in json.loads(body)["error"], (path, body)
        status, _, _ = _raw(hub_server, "GET", f"/{REPO}/resolve/main/{path.replace(chr(0), '%00')}")
        assert status in (400, 404)
    for path in ["..%2Frepo.json", "..%2F..%2F..%2Frefs.json", "%2Fetc%2Fpasswd"]:
        assert _raw(hub_server, "GET", f"/{REPO}/resolve/main/{path}")[0] == 400

    assert api.list_repo_refs(REPO) == before and len(api.list_repo_commits(REPO)) == 1
    assert _files_outside(tmp_path, {"hub-root", "hf-home"}) == outside_before
    assert not any("evil" in p.name for p in tmp_path.rglob("*"))
    assert sorted(
        p.name for p in (hub_server.root / "repos" / "model").rglob("*") if p.parent.name == "team"
    ) == ["adapter"]


@pytest.mark.parametrize("lfs", [False, True], ids=["regular", "lfs"])
def test_upload_size_limit(tmp_path, monkeypatch, lfs):
    with serve(tmp_path / "root", max_upload_bytes=4000, lfs_threshold=1024 if lfs else None) as server:
        point_hf_client(monkeypatch, server.url, tmp_path / "home", xet=not lfs)
        api = HfApi(endpoint=server.url)
        api.create_repo(REPO)
        with pytest.raises(HfHubHTTPError, match="over this server's upload limit of 4000 bytes") as err:
            api.upload_folder(folder_path=_folder(tmp_path / "v1", 1, big=5000), repo_id=REPO)
        assert err.value.response.status_code == 413
        assert len(api.list_repo_commits(REPO)) == 1
        big = _ndjson(
            {"key": "header", "value": {"summary": "big"}},
            {"key": "file", "value": {"path": "a.bin", "content": "QUFB" * 3000, "encoding": "base64"}},
        )
        status, _, body = _raw(server, "POST", f"/api/models/{REPO}/commit/main", big)
        assert status == 413 and "limit" in json.loads(body)["error"]
        api.upload_folder(folder_path=_folder(tmp_path / "v2", 2, big=3000), repo_id=REPO)  # under it: fine
        assert len(api.list_repo_commits(REPO)) == 2


def test_restart_keeps_everything(tmp_path, monkeypatch):
    root = tmp_path / "root"
    with serve(root, lfs_threshold=1024) as server:
        point_hf_client(monkeypatch, server.url, tmp_path / "home1", xet=False)
        api = HfApi(endpoint=server.url)
        api.create_repo(REPO, private=True)
        for version in (1, 2):
            api.upload_folder(folder_path=_folder(tmp_path / f"v{version}", version), repo_id=REPO)
            api.create_tag(REPO, tag=f"v{version}.0.0")
        api.create_repo("team/other")
        refs, commits = api.list_repo_refs(REPO), api.list_repo_commits(REPO)
        digests = {tag: _digests(Path(snapshot_download(REPO, revision=tag))) for tag in ("v1.0.0", "v2.0.0")}

    with serve(root) as server:  # another port, another process-lifetime secret, no LFS threshold
        point_hf_client(monkeypatch, server.url, tmp_path / "home2")
        api = HfApi(endpoint=server.url)
        assert api.list_repo_refs(REPO) == refs and api.list_repo_commits(REPO) == commits
        assert api.model_info(REPO).private and api.repo_exists("team/other")
        for tag, expected in digests.items():
            assert _digests(Path(snapshot_download(REPO, revision=tag))) == expected
        assert _digests(tmp_path / "v2") == {
            k: v for k, v in digests["v2.0.0"].items() if k != ".gitattributes"
        }


def _chunked(server, path: str, body: bytes) -> tuple[int, bytes]:
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", path)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(body)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, payload


def test_malformed_chunk_size_is_400_not_500(hub_server, capfd):
    HfApi(endpoint=hub_server.url).create_repo(REPO)
    hub_server.log = True
    for bad in (b"zz", b"-5", b"0x10", b"1_0"):
        status, body = _chunked(hub_server, f"/api/models/{REPO}/commit/main", bad + b"\r\nhi\r\n0\r\n\r\n")
        assert status == 400 and "malformed chunk size" in json.loads(body)["error"], (bad, body)
    err = capfd.readouterr().err
    assert "Traceback" not in err and " 500" not in err
    assert len(HfApi(endpoint=hub_server.url).list_repo_commits(REPO)) == 1


def test_deeply_nested_json_body_is_400_not_500(hub_server, capfd):
    """JSON nested past Python's recursion limit, in a JSON body (validate-yaml takes one without a token) or a
    commit line: 400 saying why, no traceback in the log."""
    HfApi(endpoint=hub_server.url).create_repo(REPO)
    deep = b'{"a":' * 100_000
    for path in ("/api/validate-yaml", f"/api/models/{REPO}/commit/main"):
        status, _, answer = _raw(hub_server, "POST", path, deep)
        assert status == 400 and "maximum recursion depth exceeded" in json.loads(answer)["error"]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("length", ["-1", "1_0", "ten"])
def test_content_length_that_is_not_a_byte_count_is_400(hub_server, length):
    """Answered at once, without a token (validate-yaml needs none): a negative one had the server read the
    connection until the client hung up, every byte kept in memory, with no answer."""
    host, port = hub_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = f"POST /api/validate-yaml HTTP/1.1\r\nHost: h\r\nContent-Length: {length}\r\n\r\n"
        sock.sendall(head.encode() + b"x" * 100_000)
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 400") and f"Content-Length '{length}' is not a number of bytes" in answer


def test_error_message_cannot_inject_headers(hub_server):
    """A request value echoed in ``X-Error-Message`` with CR/LF in it must not end the header (response
    splitting); the JSON body keeps the message as it was."""
    HfApi(endpoint=hub_server.url).create_repo(REPO)
    status, headers, body = _raw(
        hub_server, "POST", f"/lfs-verify/model/{REPO}", {"oid": "zz\r\nX-Evil: injected", "size": 1}
    )
    assert status == 422 and headers["X-Evil"] is None
    assert headers["X-Error-Message"].startswith("LFS object zz X-Evil: injected was not uploaded")
    assert json.loads(body)["error"].startswith("LFS object zz\r\nX-Evil")


def test_logs_never_carry_the_query_string(hub_server, capfd):
    import socket

    hub_server.log = True
    host, port = hub_server.url.removeprefix("http://").split(":")
    for line in (
        b"GET /x?sig=SECRET1 HTTP/1.1 HTTP/1.1\r\n\r\n",  # refused by the stdlib (log_error)
        b"GET /api/models/team/none?sig=SECRET2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(line)
            assert sock.recv(65536).startswith(b"HTTP/1.")
    err = capfd.readouterr().err
    assert "SECRET" not in err and "sig=" not in err and "Traceback" not in err
    assert "GET /api/models/team/none 404" in err and "400" in err


def test_server_refuses_what_the_client_refuses():
    import subprocess
    import sys

    from huggingface_hub.utils import validate_repo_id

    from hub.server.names import InvalidName, check_name, check_path
    from hub.versions import check_repo_id

    for name in ("name_", "name-", "_name", "a--b", "a..b", "x" * 97, "a.git", "a.b.git"):
        with pytest.raises(InvalidName):
            check_name(name)
        with pytest.raises(Exception, match="is not a repo id"):
            check_repo_id(f"team/{name}")
        with pytest.raises(Exception, match="is not a repo id"):
            check_repo_id(f"{name}/x")
    for name in ("a.b_c-1", "x" * 96, "a.gitx", "git", "a-git"):  # accepted by all three
        assert check_name(name) == name and check_repo_id(f"{name}/{name}") == f"{name}/{name}"
        validate_repo_id(f"{name}/{name}")
    for path in ("a/.git/config", "a/.git", ".git"):
        with pytest.raises(InvalidName, match="invalid file path"):
            check_path(path)
    assert check_path("a/.gitattributes") == "a/.gitattributes"
    code = "import sys, hub.server; assert not {'torch', 'lightning_lora'} & set(sys.modules), 'heavy import'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_path_cannot_be_both_a_file_and_a_folder(hub_server, tmp_path):
    """Git cannot hold ``x`` beside ``x/y`` (the Hub refuses it); accepted, snapshot_download silently dropped
    one."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"file", path_in_repo="x", repo_id=REPO)
    with pytest.raises(HfHubHTTPError, match="'x' would be both a file and a folder") as err:
        api.upload_file(path_or_fileobj=b"inside", path_in_repo="x/y", repo_id=REPO)
    assert err.value.response.status_code == 409
    api.upload_file(path_or_fileobj=b"inside", path_in_repo="d/y", repo_id=REPO)
    with pytest.raises(HfHubHTTPError, match="'d' would be both a file and a folder \\(holding 'd/y'\\)"):
        api.upload_file(path_or_fileobj=b"file", path_in_repo="d", repo_id=REPO)
    moved = [CommitOperationDelete("x"), CommitOperationAdd("x/y", b"inside")]
    api.create_commit(REPO, moved, commit_message="mv")  # one commit may turn a file into a folder
    pulled = Path(snapshot_download(REPO, local_dir=tmp_path / "pulled"))
    assert (pulled / "x" / "y").read_bytes() == b"inside" and (pulled / "d" / "y").read_bytes() == b"inside"


def test_repo_info_carries_the_model_card_metadata(hub_server):
    """Like the Hub: ``cardData`` from README.md's YAML, ``pipeline_tag`` (transformers' ``pipeline(model=)``
    needs it) and tags derived from the card; per revision; no README or a broken YAML block: no card."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    assert api.model_info(REPO).card_data is None and api.model_info(REPO).tags == []
    card = (
        "---\nlibrary_name: peft\nbase_model: gpt2\npipeline_tag: text-generation\nlicense: mit\n"
        "tags:\n- lora\n- peft\ndatasets: [imdb]\ndate: 2024-05-01\n---\n# card\n"
    )
    first = api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=REPO).oid
    info = api.model_info(REPO)
    assert info.card_data.base_model == "gpt2" and info.card_data.to_dict()["date"] == "2024-05-01"
    assert (info.library_name, info.pipeline_tag) == ("peft", "text-generation")
    assert info.tags == ["peft", "text-generation", "lora", "base_model:gpt2", "license:mit", "dataset:imdb"]
    api.upload_file(path_or_fileobj=b"# no metadata\n", path_in_repo="README.md", repo_id=REPO)
    assert api.model_info(REPO).card_data is None and api.model_info(REPO).pipeline_tag is None
    assert api.model_info(REPO, revision=first).card_data.license == "mit"
    broken = {"content": base64.b64encode(b"---\n- a list\n---\n").decode(), "path": "README.md"}
    payload = _ndjson({"key": "header", "value": {"summary": "unchecked"}}, {"key": "file", "value": broken})
    assert _raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", payload)[0] == 200
    assert api.model_info(REPO).card_data is None and api.model_info(REPO).tags == []


def test_readme_with_broken_metadata_is_refused_before_upload(hub_server, tmp_path):
    """As the client's docs promise (and the Hub does): README.md whose YAML block does not parse, or is not
    a mapping, fails with a ValueError that says why, before anything is uploaded."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    for readme, why in [(b"---\n[not: closed\n---\n", "does not parse"), (b"---\n- a\n---\n", "a mapping")]:
        with pytest.raises(ValueError, match=f"Invalid metadata in README.md.\n- .*{why}"):
            api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=REPO)
        (tmp_path / "README.md").write_bytes(readme)
        with pytest.raises(ValueError, match=why):
            api.upload_folder(folder_path=tmp_path, repo_id=REPO)
    assert len(api.list_repo_commits(REPO)) == 1
    fine = b"---\n---\n# empty metadata is fine\n"
    api.upload_file(path_or_fileobj=fine, path_in_repo="README.md", repo_id=REPO)


def test_card_metadata_json_cannot_hold_neither_crashes_nor_expands(hub_server):
    """A date as a key becomes a string key (it was a 500 on every `model_info`); YAML aliases that expand past
    100,000 values (a 300-byte "billion laughs" block was 22 MB of JSON per `model_info`, two more lines a
    hundred times that) or into themselves are refused before upload and, committed anyway, give no card."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"---\n2024-05-01: released\n---\n", path_in_repo="README.md", repo_id=REPO)
    assert api.model_info(REPO).card_data.to_dict() == {"2024-05-01": "released"}
    laughs = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]\n" for p, k in zip("abcdef", "bcdefg"))
    for block in ["a: &a [x, x, x, x, x, x, x, x, x]\n" + laughs, "a: &a [1, *a]\n"]:
        readme = f"---\n{block}---\n".encode()
        with pytest.raises(ValueError, match="expands to more than 100000 values or 100 levels"):
            api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=REPO)
        line = {"key": "file", "value": {"content": base64.b64encode(readme).decode(), "path": "README.md"}}
        payload = _ndjson({"key": "header", "value": {"summary": "unchecked"}}, line)
        assert _raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", payload)[0] == 200
        assert api.model_info(REPO).card_data is None


def test_expand_gives_each_entry_its_last_commit(hub_server):
    """``expand=True`` listings carry ``lastCommit``: the newest commit that changed the file, or anything in
    the folder, as of the revision listed; `HfFileSystem.modified` reads it."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    first = api.upload_file(path_or_fileobj=b"1", path_in_repo="d/a.txt", repo_id=REPO, commit_message="one")
    second = api.upload_file(path_or_fileobj=b"2", path_in_repo="b.txt", repo_id=REPO, commit_message="two")
    third = api.upload_file(path_or_fileobj=b"3", path_in_repo="d/e/c.txt", repo_id=REPO, commit_message="3")
    api.upload_file(path_or_fileobj=b"2", path_in_repo="b.txt", repo_id=REPO)  # same content: no commit
    last = {e.path: e.last_commit for e in api.list_repo_tree(REPO, recursive=True, expand=True)}
    assert {p: c.oid for p, c in last.items() if p != ".gitattributes"} == {
        "d": third.oid, "d/e": third.oid, "d/a.txt": first.oid, "d/e/c.txt": third.oid, "b.txt": second.oid
    }
    assert [last[p].title for p in ("d/a.txt", "d", ".gitattributes")] == ["one", "3", "initial commit"]
    infos = api.get_paths_info(REPO, ["d", "b.txt"], expand=True, revision=second.oid)
    assert [(i.path, i.last_commit.oid) for i in infos] == [("d", first.oid), ("b.txt", second.oid)]
    assert api.list_repo_tree(REPO).__next__().last_commit is None  # not asked for: not computed
    commits = {c.commit_id: c.created_at for c in api.list_repo_commits(REPO)}
    assert HfFileSystem().modified(f"{REPO}/d/a.txt") == commits[first.oid]


def test_paths_info_for_many_paths_is_linear(hub_server):
    """Any reader may ask about 100,000s of paths at once: each was compared with every file of the revision
    (a 1 MB form on a 2,000-file repo held the server 50 s); now one set lookup each."""
    HfApi(endpoint=hub_server.url).create_repo(REPO)
    files = [{"key": "file", "value": {"path": f"d{i}/f.txt", "content": "eA=="}} for i in range(300)]
    payload = _ndjson({"key": "header", "value": {"summary": "many"}}, *files)
    assert _raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", payload)[0] == 200
    form = "&".join(["paths=nope"] * 150_000 + ["paths=d7", "paths=d7/f.txt"]).encode()
    start = time.monotonic()
    status, _, answer = _raw(hub_server, "POST", f"/api/models/{REPO}/paths-info/main", form)
    assert time.monotonic() - start < 3
    assert status == 200 and [(e["type"], e["path"]) for e in json.loads(answer)] == [
        ("directory", "d7"),
        ("file", "d7/f.txt"),
    ]


def test_expand_on_a_large_repo_is_linear(hub_server):
    """``lastCommit`` for every entry of a 5,000-file listing: each entry was compared with each changed file
    of each commit (quadratic: 6 s here, 10x the files 100x that); now set lookups."""
    api = HfApi(endpoint=hub_server.url)
    api.create_repo(REPO)
    repo = hub_server.store.get("model", REPO)
    blob = {**repo.put_blob([b"x"], 1, 1), "lfs": False}
    adds = {f"d{i % 100}/f{i}.txt": blob for i in range(5000)}
    head = repo.commit_changes("main", title="many", message="", author="local", adds=adds)
    start = time.monotonic()
    listing = list(api.list_repo_tree(REPO, recursive=True, expand=True))
    assert time.monotonic() - start < 3
    assert len(listing) == 5101 and {e.last_commit.oid for e in listing if e.path != ".gitattributes"} == {head}


def test_move_repo(hub_token):
    """`HfApi.move_repo` renames a repo, with its history, tags and privacy; a taken name is 409, no token
    401."""
    api = HfApi(endpoint=hub_token.url)
    api.create_repo(REPO, private=True)
    head = api.upload_file(path_or_fileobj=b"w", path_in_repo="w.bin", repo_id=REPO).oid
    api.create_tag(REPO, tag="v1.0.0")
    api.create_repo("team/taken")
    with pytest.raises(HfHubHTTPError, match="a model repo team/taken exists"):
        api.move_repo(REPO, "team/taken")
    with pytest.raises(HfHubHTTPError, match="needs a token for writes"):
        HfApi(endpoint=hub_token.url, token=False).move_repo(REPO, "other/renamed")
    api.move_repo(REPO, "other/renamed")
    assert not api.repo_exists(REPO)
    info = api.model_info("other/renamed", revision="v1.0.0")
    assert info.sha == head and info.private and len(api.list_repo_commits("other/renamed")) == 2
    assert Path(hf_hub_download("other/renamed", "w.bin")).read_bytes() == b"w"
    api.create_repo(REPO)  # the old name is free again
