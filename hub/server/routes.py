"""The endpoints the unmodified `huggingface_hub` client calls, as it really calls them (2.4.0 source).

URLs: ``/api/{models|datasets|spaces}/{ns}/{name}/...`` for the API (revisions quoted with ``safe=""``, so one
segment), ``/{prefix}{ns}/{name}/resolve/{rev}/{path}`` for downloads and ``/{prefix}{ns}/{name}.git/info/lfs/
objects/batch`` for LFS, with prefix ``""``, ``datasets/`` or ``spaces/``. LFS uploads go to our own
``/lfs-upload/...`` URL: the client PUTs there without an Authorization header, so the URL carries an HMAC
signature (made with a per-process secret, valid one hour) instead. Files are ``"regular"`` in preupload
answers unless the server has an ``lfs_threshold`` (see `HubServer`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import time
from collections.abc import Callable, Iterator
from hashlib import sha1
from typing import TYPE_CHECKING

import yaml
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from .names import REPO_TYPES, URL_PREFIX, check_path, check_ref_name, check_repo_id
from .store import HubError, Repo, folders, git_blob_sha1, lfs_pointer

if TYPE_CHECKING:
    from .app import Request

_SHA256 = re.compile(r"[0-9a-f]{64}")
_LFS_JSON = "application/vnd.git-lfs+json"
_SIGNATURE_TTL = 3600
_CARD_LIMIT = 1 << 20  # a README.md read on every repo_info: bigger ones are not parsed for cardData
_CARD_VALUES = 100_000  # values in a card once YAML aliases are expanded: more is an alias bomb
_CARD_DEPTH = 100


# -- shapes the client parses --------------------------------------------------------------------------------
def _file_json(path: str, entry: dict) -> dict:
    """A `RepoFile` as ``/tree`` and ``/paths-info`` return it."""
    out = {"type": "file", "path": path, "size": entry["size"]}
    if entry["lfs"]:
        pointer = lfs_pointer(entry["sha256"], entry["size"])
        out["oid"] = git_blob_sha1(pointer)
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
    else:
        out["oid"] = entry["sha1"]
    return out


def _dir_json(path: str, commit_id: str) -> dict:
    return {"type": "directory", "path": path, "oid": sha1(f"{commit_id}:{path}".encode()).hexdigest()}


def _entries(files: dict, commit_id: str, base: str, recursive: bool) -> list[dict]:
    prefix = base.rstrip("/") + "/" if base else ""
    out, dirs = [], set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            dirs.add(prefix + "/".join(parts[:depth]))
        if recursive or len(parts) == 1:
            out.append(_file_json(path, files[path]))
    return [_dir_json(d, commit_id) for d in sorted(dirs)] + out


def _expanded(repo: Repo, commit_id: str, entries: list[dict]) -> list[dict]:
    """`entries` with the ``lastCommit`` that ``expand=true`` asks for (`HfFileSystem.modified` reads it)."""
    last = repo.last_commits(commit_id, [e["path"] for e in entries])
    for entry in entries:
        commit = last[entry["path"]]
        entry["lastCommit"] = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
    return entries


def _repo_url(req: Request, rtype: str, repo_id: str) -> str:
    return f"{req.base_url()}/{URL_PREFIX[rtype]}{repo_id}"


# -- account and repos ---------------------------------------------------------------------------------------
def whoami(req: Request) -> None:
    if req.headers.get("Authorization") is None or not req.authorized():
        raise HubError(401, "Invalid user token: send Authorization: Bearer <token>")
    req.send_json(
        {
            "type": "user",
            "name": req.hub.user,
            "fullname": req.hub.user,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "lora-hub", "role": "write"}},
        }
    )


def _repo_type(body: dict) -> str:
    rtype = body.get("type") or "model"
    if rtype not in URL_PREFIX:
        raise HubError(400, f"unknown repo type {rtype!r}: use model, dataset or space")
    return rtype


def _repo_from_body(req: Request, body: dict) -> tuple[str, str]:
    rtype = _repo_type(body)
    namespace, name = body.get("organization") or req.hub.user, body.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str):
        raise HubError(400, "'name' (and 'organization', if given) must be strings")
    return rtype, check_repo_id(namespace, name)


def _private(body: dict) -> bool | None:
    """Whether the body asks for a private repo: clients send ``visibility`` ("private"/"public"), older ones
    ``private``; None when it names neither (create: public, as on the Hub; settings: left as it is)."""
    visibility = body.get("visibility")
    if visibility is None:
        return None if body.get("private") is None else bool(body["private"])
    if visibility not in ("private", "public"):
        raise HubError(400, f"unknown visibility {str(visibility)[:40]!r}: use 'private' or 'public'")
    return visibility == "private"


def create_repo(req: Request) -> None:
    req.require_write()
    rtype, repo_id = _repo_from_body(req, body := req.json_body())
    private = bool(_private(body))
    url = _repo_url(req, rtype, repo_id)
    try:
        req.hub.store.create(rtype, repo_id, private=private, author=req.hub.user)
    except HubError as e:
        e.extra["url"] = url  # create_repo(exist_ok=True) reads it from the 409's body
        raise
    req.send_json({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(req: Request) -> None:
    req.require_write()
    rtype, repo_id = _repo_from_body(req, req.json_body())
    req.hub.store.delete(rtype, repo_id)
    req.send_json({})


def move_repo(req: Request) -> None:
    req.require_write()
    body = req.json_body()
    rtype, ids = _repo_type(body), [body.get("fromRepo"), body.get("toRepo")]
    if not all(isinstance(i, str) and i.count("/") == 1 for i in ids):
        raise HubError(400, "'fromRepo' and 'toRepo' must be repo ids 'namespace/name'")
    source, target = (check_repo_id(*i.split("/")) for i in ids)
    req.hub.store.move(rtype, source, target)
    req.send_json({})


def repo_settings(req: Request, rtype: str, repo_id: str) -> None:
    """Only visibility is a setting here (gating and the rest are accepted and ignored); it changes only when
    the body names it."""
    repo = req.write_repo(rtype, repo_id)
    private = _private(req.json_body())
    if private is not None:
        repo.set_private(private)
    req.send_json({"private": repo.meta["private"]})


def _front_matter(text: str) -> dict | None:
    """A README's YAML metadata block, found and read as the client does
    (`huggingface_hub.repocard.metadata_load`): None without one, ValueError (YAMLError included) if it is
    not a YAML mapping."""
    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as e:
        raise ValueError(f"the YAML metadata block does not parse: {e}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ValueError(f"the YAML metadata block nests deeper than {_CARD_DEPTH} levels") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError("the YAML metadata block must be a mapping (key: value lines)")
    return None if data is None else _json_ready(data)


def _json_ready(card: dict) -> dict:
    """`card` as JSON holds it: dates and other YAML-only values become strings, and so do keys JSON refuses
    (a date). ValueError past `_CARD_VALUES` values or `_CARD_DEPTH` levels: YAML aliases (``&a`` ... ``*a``)
    are shared, not copied, when loaded, so a few hundred bytes can expand to gigabytes of JSON, or without end
    (an alias inside itself)."""
    left = _CARD_VALUES

    def plain(value: object, depth: int) -> object:
        nonlocal left
        left -= 1
        if left < 0 or depth > _CARD_DEPTH:
            raise ValueError(
                f"the YAML metadata block expands to more than {_CARD_VALUES} values or {_CARD_DEPTH} levels "
                "(through its aliases '*name'): write the values out"
            )
        if isinstance(value, dict):
            return {_json_key(k): plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v, depth + 1) for v in value]
        return value if value is None or isinstance(value, (str, int, float)) else str(value)

    return plain(card, 0)


def _json_key(key: object) -> str:
    """A mapping key as `json.dumps` writes it (``1``, ``true``, ``null``), or str() of one it refuses."""
    if isinstance(key, str):
        return key
    return json.dumps(key) if key is None or isinstance(key, (int, float)) else str(key)


def _card_data(repo: Repo, files: dict) -> dict | None:
    """The YAML metadata at the top of README.md, as the Hub returns it in ``cardData``; None without one, or
    with one that `validate_yaml` would have refused."""
    entry = files.get("README.md")
    if entry is None or entry["size"] > _CARD_LIMIT:
        return None
    try:
        card = _front_matter(repo.blob_path(entry["sha256"]).read_text(encoding="utf-8-sig"))
    except ValueError:  # UnicodeDecodeError too
        return None
    return card or None


def _strings(value: object) -> list[str]:
    """A card field that may be one string or a list of them (``base_model``, ``tags``...)."""
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, str)]


def _card_fields(card: dict | None) -> dict:
    """What `repo_info` shows of a card: ``cardData``, ``library_name``, ``pipeline_tag`` (transformers'
    ``pipeline(model=...)`` reads it) and the tags the Hub derives from a card alone: library, task, the
    card's own tags, ``base_model:``, ``license:`` and ``dataset:`` ones (transformers looks for
    ``base_model:...``)."""
    if card is None:
        return {}
    tags = [
        *_strings(card.get("library_name")),
        *_strings(card.get("pipeline_tag")),
        *_strings(card.get("tags")),
        *(f"base_model:{b}" for b in _strings(card.get("base_model"))),
        *(f"license:{x}" for x in _strings(card.get("license"))),
        *(f"dataset:{d}" for d in _strings(card.get("datasets"))),
    ]
    named = {key: card[key] for key in ("library_name", "pipeline_tag") if isinstance(card.get(key), str)}
    return {"cardData": card, "tags": list(dict.fromkeys(tags)), **named}


def repo_info(req: Request, rtype: str, repo_id: str, revision: str = "main") -> None:
    repo = req.read_repo(rtype, repo_id)
    commit = repo.snapshot(revision)
    siblings = []
    for path, entry in sorted(commit["files"].items()):
        listed = _file_json(path, entry)
        sibling = {"rfilename": path, "size": entry["size"], "blobId": listed["oid"]}
        if entry["lfs"]:  # siblings name the LFS hash "sha256" where the tree says "oid"
            sibling["lfs"] = {
                "size": entry["size"],
                "sha256": entry["sha256"],
                "pointerSize": listed["lfs"]["pointerSize"],
            }
        siblings.append(sibling)
    namespace = repo_id.split("/")[0]
    meta = repo.meta
    req.send_json(
        {
            "_id": repo_id,
            "id": repo_id,
            **({"modelId": repo_id} if rtype == "model" else {}),
            "author": namespace,
            "sha": commit["id"],
            "lastModified": commit["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e["size"] for e in commit["files"].values()),
            **_card_fields(_card_data(repo, commit["files"])),
        }
    )


# -- refs and history ----------------------------------------------------------------------------------------
def list_refs(req: Request, rtype: str, repo_id: str) -> None:
    refs = req.read_repo(rtype, repo_id).refs()

    def listing(kind: str, prefix: str) -> list[dict]:
        return [
            {"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": c} for n, c in sorted(refs[kind].items())
        ]

    out = {"branches": listing("branches", "heads"), "tags": listing("tags", "tags"), "converts": []}
    if req.query.get("include_prs"):
        out["pullRequests"] = []
    req.send_json(out)


def list_commits(req: Request, rtype: str, repo_id: str, revision: str) -> None:
    history = req.read_repo(rtype, repo_id).history(revision)
    req.send_json(
        [
            {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "date": c["date"],
                "authors": [{"user": c["author"]}],
            }
            for c in history
        ]
    )


def create_tag(req: Request, rtype: str, repo_id: str, revision: str) -> None:
    repo = req.write_repo(rtype, repo_id)
    tag = req.json_body().get("tag")
    if not isinstance(tag, str):
        raise HubError(400, "'tag' must be a string")
    repo.set_ref("tags", tag, revision)
    req.send_json({})


def create_branch(req: Request, rtype: str, repo_id: str, branch: str) -> None:
    repo = req.write_repo(rtype, repo_id)
    start = req.json_body().get("startingPoint") or "main"
    repo.set_ref("branches", branch, str(start))
    req.send_json({})


def delete_ref(kind: str) -> Callable:
    def delete(req: Request, rtype: str, repo_id: str, name: str) -> None:
        req.write_repo(rtype, repo_id).set_ref(kind, name, None)
        req.send_json({})

    return delete


# -- listing files -------------------------------------------------------------------------------------------
def list_tree(req: Request, rtype: str, repo_id: str, revision: str, path: str) -> None:
    repo = req.read_repo(rtype, repo_id)
    commit = repo.snapshot(revision)
    if path:
        check_path(path)
    entries = _entries(commit["files"], commit["id"], path, req.query.get("recursive", "").lower() == "true")
    if path and not entries:
        raise HubError(
            404, f"no folder {path!r} at {revision}", "EntryNotFound", {"X-Repo-Commit": commit["id"]}
        )
    if req.query.get("expand", "").lower() == "true":
        entries = _expanded(repo, commit["id"], entries)
    req.send_json(entries)


def paths_info(req: Request, rtype: str, repo_id: str, revision: str) -> None:
    repo = req.read_repo(rtype, repo_id)
    commit = repo.snapshot(revision)
    form, out, files = req.form_body(), [], commit["files"]
    dirs = folders(files)  # once: scanning every file for every asked path was minutes for a 1 MB form
    for path in form.get("paths", []):
        path = check_path(path.strip("/"))
        if path in files:
            out.append(_file_json(path, files[path]))
        elif path in dirs:
            out.append(_dir_json(path, commit["id"]))
    if form.get("expand", [""])[-1].lower() == "true":
        out = _expanded(repo, commit["id"], out)
    req.send_json(out)


def resolve(req: Request, rtype: str, repo_id: str, revision: str, path: str) -> None:
    """HEAD/GET one file: ``X-Repo-Commit``, ``ETag`` (git blob id, or sha256 for LFS with ``X-Linked-*``)."""
    repo = req.read_repo(rtype, repo_id)
    commit = repo.snapshot(revision)
    entry = commit["files"].get(check_path(path))
    if entry is None:
        raise HubError(
            404,
            f"Entry {path!r} not found at {revision} in {repo_id}",
            "EntryNotFound",
            {"X-Repo-Commit": commit["id"]},
        )
    headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{entry["sha1"]}"'}
    if entry["lfs"]:
        headers.update(
            {
                "ETag": f'"{entry["sha256"]}"',
                "X-Linked-Etag": f'"{entry["sha256"]}"',
                "X-Linked-Size": entry["size"],
            }
        )
    req.send_file(repo.blob_path(entry["sha256"]), headers)


# -- uploads -------------------------------------------------------------------------------------------------
def _file_size(req: Request, path: str, size: object) -> int:
    if not isinstance(size, int) or size < 0:
        raise HubError(400, f"size of {path!r} must be a non-negative integer")
    if size > req.hub.max_upload_bytes:
        raise HubError(
            413,
            f"{path} is {size} bytes, over this server's upload limit of "
            f"{req.hub.max_upload_bytes} bytes (lora-hub serve --max-upload-mb)",
        )
    return size


def preupload(req: Request, rtype: str, repo_id: str, revision: str) -> None:
    repo = req.write_repo(rtype, repo_id)
    files = repo.snapshot(revision)["files"]
    threshold = req.hub.lfs_threshold
    answers = []
    for item in req.json_body().get("files", []):
        path = check_path(item.get("path", ""))
        size = _file_size(req, path, item.get("size"))
        mode = "lfs" if threshold is not None and size >= threshold and size > 0 else "regular"
        old = files.get(path)
        oid = None if old is None else old["sha256"] if mode == "lfs" else repo.content_sha1(old)
        answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    req.send_json({"files": answers})


def lfs_batch(req: Request, rtype: str, repo_id: str) -> None:
    repo = req.write_repo(rtype, repo_id)
    body = req.json_body()
    if body.get("operation") != "upload":
        raise HubError(
            400, "this server's LFS batch API only handles 'upload' (downloads go through /resolve)"
        )
    objects, base, expires = [], req.base_url(), str(int(time.time()) + _SIGNATURE_TTL)
    for obj in body.get("objects", []):
        oid, size = obj.get("oid"), obj.get("size")
        if not isinstance(oid, str) or not _SHA256.fullmatch(oid):
            raise HubError(400, f"LFS object id {str(oid)[:80]!r} is not a sha256 hex digest")
        try:
            _file_size(req, f"LFS object {oid}", size)
        except HubError as e:
            objects.append({"oid": oid, "size": size, "error": {"code": e.status, "message": e.message}})
            continue
        if repo.has_blob(oid, size):
            objects.append({"oid": oid, "size": size})  # already stored: nothing to send
            continue
        where = f"{rtype}/{repo_id}/{oid}"
        signature = req.hub.sign(where, str(size), expires)
        objects.append(
            {
                "oid": oid,
                "size": size,
                "authenticated": True,
                "actions": {
                    "upload": {
                        "href": f"{base}/lfs-upload/{where}?size={size}&expires={expires}&sig={signature}"
                    },
                    "verify": {"href": f"{base}/lfs-verify/{rtype}/{repo_id}"},
                },
            }
        )
    req.send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, content_type=_LFS_JSON)


def lfs_upload(req: Request, rtype: str, repo_id: str, oid: str) -> None:
    size, expires = req.query.get("size", ""), req.query.get("expires", "")
    expected = req.hub.sign(f"{rtype}/{repo_id}/{oid}", size, expires).encode()
    valid = hmac.compare_digest(expected, req.query.get("sig", "").encode())
    if not (valid and size.isdigit() and expires.isdigit() and int(expires) >= time.time()):
        raise HubError(403, "LFS upload URL is invalid or expired: ask the batch API for a new one")
    repo = req.hub.store.get(rtype, repo_id)
    repo.put_blob(req.body(req.hub.max_upload_bytes), int(size), req.hub.max_upload_bytes, expect=oid)
    req.send_json({})


def lfs_verify(req: Request, rtype: str, repo_id: str) -> None:
    repo = req.write_repo(rtype, repo_id)
    body = req.json_body()
    if not _SHA256.fullmatch(str(body.get("oid"))) or not repo.has_blob(body["oid"], body.get("size")):
        raise HubError(422, f"LFS object {str(body.get('oid'))[:80]} was not uploaded (or has another size)")
    req.send_json({})


def _ndjson(req: Request, limit: int) -> Iterator[dict]:
    buffer = bytearray()  # one line holds a whole base64 file: append in place, never re-copy it
    for chunk in req.body(limit):
        searched = len(buffer)
        buffer += chunk
        end = buffer.find(b"\n", searched)
        while end >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if line.strip():
                yield _json_line(line)
            end = buffer.find(b"\n")
    if buffer.strip():
        yield _json_line(bytes(buffer))


def _json_line(line: bytes) -> dict:
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # the last: nested too deep
        raise HubError(400, f"commit payload line is not JSON: {e}") from None
    if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
        raise HubError(400, "commit payload lines must be {'key': ..., 'value': {...}}")
    return item


def commit(req: Request, rtype: str, repo_id: str, revision: str) -> None:
    """One atomic commit from the client's ndjson: a header, then ``file``/``lfsFile``/``deleted*`` lines."""
    repo = req.write_repo(rtype, repo_id)
    if req.query.get("create_pr"):
        raise HubError(400, "this server does not do pull requests: commit to a branch")
    branch = revision.removeprefix("refs/heads/")
    check_ref_name(branch, "branch")
    limit = req.hub.max_upload_bytes
    header, adds, deletes, folders, total = None, {}, [], [], 0
    for item in _ndjson(req, limit // 3 * 4 + (1 << 20)):
        key, value = item.get("key"), item["value"]
        if key == "header":
            header = value
            continue
        path = str(value.get("path", ""))
        # a folder's path may end with '/', the client's mark of a folder; the checks apply to the rest
        path = check_path(path.removesuffix("/") if key == "deletedFolder" else path)
        if key == "file":
            try:
                data = base64.b64decode(value.get("content", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise HubError(400, f"content of {path!r} is not valid base64") from None
            total += len(data)
            if total > limit:
                raise HubError(413, f"commit carries more than this server's upload limit of {limit} bytes")
            adds[path] = {**repo.put_blob([data], len(data), limit), "lfs": False}
        elif key == "lfsFile":
            oid = value.get("oid")
            if (
                not isinstance(oid, str)
                or not _SHA256.fullmatch(oid)
                or value.get("algo", "sha256") != "sha256"
            ):
                raise HubError(400, f"lfsFile {path!r} needs a sha256 'oid'")
            size = value.get("size", repo.blob_path(oid).stat().st_size if repo.has_blob(oid) else 0)
            adds[path] = {"sha256": oid, "size": size, "sha1": None, "lfs": True}
        elif key == "deletedFile":
            deletes.append(path)
        elif key == "deletedFolder":
            folders.append(path)
        else:
            raise HubError(400, f"unknown commit operation {str(key)[:40]!r}")
    if header is None:
        raise HubError(400, "commit payload has no header line")
    commit_id = repo.commit_changes(
        branch,
        title=str(header.get("summary") or "commit"),
        message=str(header.get("description") or ""),
        author=req.hub.user,
        adds=adds,
        deletes=deletes,
        deleted_folders=folders,
        parent_commit=header.get("parentCommit"),
    )
    url = f"{_repo_url(req, rtype, repo_id)}/commit/{commit_id}"
    req.send_json(
        {
            "success": True,
            "commitOid": commit_id,
            "commitUrl": url,
            "commitMessage": header.get("summary"),
            "hookOutput": "",
        }
    )


def no_xet(req: Request, *_: str) -> None:
    raise HubError(
        400,
        "this server does not speak Xet; upload with HF_HUB_DISABLE_XET=1, or run the server "
        "without an LFS threshold so that every file is uploaded as a regular file",
    )


def validate_yaml(req: Request) -> None:
    """400 with ``errors`` for a README whose metadata block does not parse (the client then raises a
    ValueError before uploading anything, as its docs promise); everything else is accepted."""
    content = req.json_body().get("content")
    if not isinstance(content, str):
        raise HubError(400, "'content' must be the README's text")
    try:
        _front_matter(content)
    except ValueError as e:
        raise HubError(
            400, f"Invalid metadata in README.md: {e}", extra={"errors": [{"message": str(e)}]}
        ) from None
    req.send_json({"errors": [], "warnings": []})


def not_here(req: Request, *_: str) -> None:
    raise HubError(404, f"{req.command} {req.path.split('?')[0][:200]} is not an endpoint of this server")


# -- routing -------------------------------------------------------------------------------------------------
_API: dict[tuple[str, str], Callable] = {  # (method, route) -> handler(req, rtype, repo_id, revision)
    ("POST", "paths-info"): paths_info,
    ("GET", "commits"): list_commits,
    ("POST", "tag"): create_tag,
    ("DELETE", "tag"): delete_ref("tags"),
    ("POST", "branch"): create_branch,
    ("DELETE", "branch"): delete_ref("branches"),
    ("POST", "preupload"): preupload,
    ("POST", "commit"): commit,
    ("GET", "revision"): repo_info,
    ("GET", "xet-write-token"): no_xet,
    ("GET", "xet-read-token"): no_xet,
}
_PLAIN: dict[tuple[str, ...], Callable] = {
    ("GET", "whoami-v2"): whoami,
    ("POST", "repos", "create"): create_repo,
    ("DELETE", "repos", "delete"): delete_repo,
    ("POST", "repos", "move"): move_repo,
    ("POST", "validate-yaml"): validate_yaml,
}


def route(req: Request, method: str, seg: list[str]) -> None:
    """Find the handler for `seg` (the unquoted path segments) and call it."""
    get = "GET" if method == "HEAD" else method
    if seg[:1] == ["api"]:
        if (get, *seg[1:]) in _PLAIN:
            return _PLAIN[(get, *seg[1:])](req)
        if len(seg) >= 4 and seg[1] in REPO_TYPES:
            rtype, repo_id, rest = REPO_TYPES[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:]
            if not rest:
                return repo_info(req, rtype, repo_id) if get == "GET" else not_here(req)
            if rest == ["refs"] and get == "GET":
                return list_refs(req, rtype, repo_id)
            if rest == ["settings"] and get == "PUT":
                return repo_settings(req, rtype, repo_id)
            if rest[0] == "tree" and len(rest) >= 2 and get == "GET":  # what follows the revision is a folder
                return list_tree(req, rtype, repo_id, rest[1], "/".join(rest[2:]))
            handler = _API.get((get, rest[0]))
            if handler is not None and len(rest) == 2:
                return handler(req, rtype, repo_id, rest[1])
            if handler is not None and len(rest) > 2:
                raise HubError(
                    400,
                    f"{'/'.join(rest[1:])[:200]!r} is not one revision: quote '/' in a revision as %2F "
                    "(huggingface_hub does)",
                )
        return not_here(req)
    if seg[:1] == ["lfs-upload"] and len(seg) == 5 and get == "PUT" and seg[1] in URL_PREFIX:
        return lfs_upload(req, seg[1], check_repo_id(seg[2], seg[3]), seg[4])
    if seg[:1] == ["lfs-verify"] and len(seg) == 4 and get == "POST" and seg[1] in URL_PREFIX:
        return lfs_verify(req, seg[1], check_repo_id(seg[2], seg[3]))
    rtype = "model"
    if (
        seg[:1] in (["datasets"], ["spaces"])
        and len(seg) > 3
        and (seg[3] == "resolve" or seg[2].endswith(".git"))
    ):
        rtype, seg = REPO_TYPES[seg[0]], seg[1:]
    if len(seg) >= 5 and seg[2] == "resolve" and get == "GET":
        return resolve(req, rtype, check_repo_id(seg[0], seg[1]), seg[3], "/".join(seg[4:]))
    if (
        len(seg) == 6
        and seg[1].endswith(".git")
        and seg[2:] == ["info", "lfs", "objects", "batch"]
        and get == "POST"
    ):
        return lfs_batch(req, rtype, check_repo_id(seg[0], seg[1][:-4]))
    return not_here(req)
