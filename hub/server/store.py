"""The server's storage: content-addressed blobs, immutable commits, and refs that move atomically.

Layout under ``root/repos/<type>/<namespace>/<name>/``::

    repo.json              {"private": bool, "createdAt": date}
    refs.json              {"branches": {name: commit}, "tags": {name: commit}}   (the only mutable state)
    commits/<id>.json      {"parents", "title", "message", "date", "author", "files": {path: entry}}
    objects/<sha256[:2]>/<sha256[2:]>   file contents, keyed by sha256 (regular and LFS alike)
    tmp/                   uploads in flight; emptied at start-up
    lock                   flock()ed while refs.json is read-modified-written

Beside ``repos/``, the root holds ``serve.lock`` (flock()ed by the one server using the root) and ``trash/``
(repos being created or deleted; emptied at start-up).

A file entry is ``{"sha256", "size", "sha1", "lfs"}``: ``sha1`` is the git blob id of the content (the Hub's
``oid``/``ETag`` of a regular file, which the client compares with its own ``git_hash``); ``lfs`` says how it
was uploaded (a git-LFS pointer on the real Hub, see `lfs_pointer`).

Why a commit is all or nothing, even under ``kill -9``: contents are written to ``tmp/`` and renamed into
``objects/`` under their hash, then the commit file is written (temp file + fsync + ``os.replace``), and only
then is ``refs.json`` replaced the same way while the repo's lock is held. A crash before that last rename
leaves only unreferenced objects and commit files: every reader goes through ``refs.json`` and sees the old
state. The lock (``fcntl.flock`` on a per-repo file, which also excludes threads of this process because each
caller opens its own descriptor) serialises ref updates, so two racing tag creations cannot both win and no
commit is built on a stale head. Commit ids are the sha1 of the commit's canonical JSON.

Test hook: with ``LORA_HUB_PAUSE_BEFORE_REF=<file>`` in the environment, a commit touches that file and sleeps
before moving the ref, so a test can ``kill -9`` the server at the worst moment.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from .names import COMMIT_ID, check_ref_name, check_repo_id

GITATTRIBUTES = (
    "\n".join(
        f"{pattern} filter=lfs diff=lfs merge=lfs -text"
        for pattern in (
            "*.bin",
            "*.ckpt",
            "*.h5",
            "*.npy",
            "*.onnx",
            "*.pt",
            "*.pth",
            "*.safetensors",
            "*.zip",
        )
    )
    + "\n"
)
_PAUSE_ENV = "LORA_HUB_PAUSE_BEFORE_REF"
_CHUNK = 1 << 20


class HubError(Exception):
    """An answer other than success: HTTP status, message, and the Hub's ``X-Error-Code`` when it has one."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


def now() -> str:
    """The Hub's date format: ``2024-01-31T12:00:00.123Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file the real Hub keeps in git for an LFS file (its blob id is the ``oid``)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def write_json(path: Path, value: object) -> None:
    """Write `value` as JSON to `path` atomically (temp file beside it, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Repo:
    """One repository on disk. Reads take no lock: they start from `refs.json`, replaced atomically."""

    def __init__(self, path: Path, rtype: str, repo_id: str):
        self.path, self.rtype, self.repo_id = path, rtype, repo_id

    # -- reading ---------------------------------------------------------------------------------------
    def _gone(self) -> HubError:
        """The answer when the repo's folder vanished since `Store.get`: it was deleted or moved meanwhile."""
        return HubError(404, f"Repository {self.repo_id} not found", "RepoNotFound")

    def _read(self, name: str) -> dict:
        try:
            return read_json(self.path / name)
        except FileNotFoundError:
            raise self._gone() from None

    @property
    def meta(self) -> dict:
        return self._read("repo.json")

    def refs(self) -> dict:
        return self._read("refs.json")

    def resolve(self, revision: str) -> str:
        """A branch, a tag (bare or ``refs/heads/…``, ``refs/tags/…``) or a commit id -> commit id. A bare name
        that is both a tag and a branch is the tag, as git resolves it (so a branch ``v1.0.0`` cannot hide a
        version)."""
        refs = self.refs()
        for prefix, kind in (("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs[kind]:
                return refs[kind][revision[len(prefix) :]]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if COMMIT_ID.fullmatch(revision) and (self.path / "commits" / f"{revision}.json").is_file():
            return revision
        raise HubError(404, f"Revision {revision[:200]!r} not found in {self.repo_id}", "RevisionNotFound")

    def commit(self, commit_id: str) -> dict:
        return {"id": commit_id, **self._read(f"commits/{commit_id}.json")}

    def snapshot(self, revision: str) -> dict:
        """The commit that `revision` names, with its ``files``."""
        return self.commit(self.resolve(revision))

    def history(self, revision: str) -> list[dict]:
        """Commits reachable from `revision`, newest first (first-parent chain)."""
        out, commit_id = [], self.resolve(revision)
        while commit_id:
            commit = self.commit(commit_id)
            out.append(commit)
            commit_id = commit["parents"][0] if commit["parents"] else None
        return out

    def last_commits(self, commit_id: str, paths: Iterable[str]) -> dict[str, dict]:
        """For each of `paths` (a file, or a folder: anything under it), the newest commit on the first-parent
        chain from `commit_id` that changed it: the Hub's ``lastCommit`` in ``expand=true`` listings."""
        left, found = set(paths), {}
        commit = self.commit(commit_id)
        while left:
            parent = self.commit(commit["parents"][0]) if commit["parents"] else None
            now, before = commit["files"], parent["files"] if parent else {}
            changed = {p for p in now.keys() | before.keys() if now.get(p) != before.get(p)}
            for path in left & (changed | folders(changed)):  # sets: each path against each file was quadratic
                found[path] = commit
                left.discard(path)
            if parent is None:
                break
            commit = parent
        return found

    def blob_path(self, sha256: str) -> Path:
        return self.path / "objects" / sha256[:2] / sha256[2:]

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def content_sha1(self, entry: dict) -> str:
        """Git blob id of a file's content; computed (and not stored) for files uploaded through LFS."""
        if entry.get("sha1"):
            return entry["sha1"]
        sha1 = hashlib.sha1(b"blob %d\0" % entry["size"])
        with open(self.blob_path(entry["sha256"]), "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                sha1.update(chunk)
        return sha1.hexdigest()

    # -- writing ---------------------------------------------------------------------------------------
    def put_blob(
        self, chunks: Iterable[bytes], size: int | None, limit: int, expect: str | None = None
    ) -> dict:
        """Store a content from `chunks` (checked against sha256 `expect` if given); returns its file entry
        (without ``lfs``). Idempotent: the same content lands on the same object."""
        tmp = self.path / "tmp" / uuid.uuid4().hex
        sha256, total = hashlib.sha256(), 0
        sha1 = hashlib.sha1(b"blob %d\0" % size) if size is not None else None
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    total += len(chunk)
                    if total > limit:
                        raise HubError(
                            413,
                            f"upload larger than this server's limit of {limit} bytes "
                            "(lora-hub serve --max-upload-mb)",
                        )
                    sha256.update(chunk)
                    if sha1 is not None:
                        sha1.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if size is not None and total != size:
                raise HubError(400, f"upload announced {size} bytes but carried {total}")
            if sha1 is None:
                sha1 = hashlib.sha1(b"blob %d\0" % total)
                with open(tmp, "rb") as f:
                    for chunk in iter(lambda: f.read(_CHUNK), b""):
                        sha1.update(chunk)
            digest = sha256.hexdigest()
            if expect is not None and digest != expect:
                raise HubError(400, f"uploaded content has sha256 {digest}, not the announced {expect}")
            target = self.blob_path(digest)
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp, target)
            return {"sha256": digest, "size": total, "sha1": sha1.hexdigest()}
        except FileNotFoundError:  # no tmp/ or objects/ any more
            raise self._gone() from None
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """Hold the repo's lock; yield its refs, to be changed in place and saved on success."""
        try:
            lock = open(self.path / "lock", "a+b")  # noqa: SIM115 - closed below; fails if the folder is gone
        except FileNotFoundError:
            raise self._gone() from None
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                refs = self.refs()  # 404 if the repo was deleted while we waited
                before = json.dumps(refs, sort_keys=True)
                yield refs
                if json.dumps(refs, sort_keys=True) != before:
                    write_json(self.path / "refs.json", refs)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write_commit(self, parents: list[str], title: str, message: str, author: str, files: dict) -> str:
        body = {
            "parents": parents,
            "title": title,
            "message": message,
            "date": now(),
            "author": author,
            "files": files,
        }
        commit_id = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        write_json(self.path / "commits" / f"{commit_id}.json", body)
        return commit_id

    def commit_changes(
        self,
        branch: str,
        *,
        title: str,
        message: str,
        author: str,
        adds: dict[str, dict],
        deletes: Iterable[str] = (),
        deleted_folders: Iterable[str] = (),
        parent_commit: str | None = None,
    ) -> str:
        """Make one commit on `branch`: `adds` maps paths to file entries whose blobs are already stored."""
        for path, entry in adds.items():
            if not self.has_blob(entry["sha256"], entry["size"]):
                raise HubError(
                    422,
                    f"content of {path!r} (sha256 {entry['sha256']}) was never uploaded: "
                    "upload it through the LFS batch API before committing",
                )
        with self.locked() as refs:
            if branch not in refs["branches"]:
                if branch in refs["tags"]:
                    raise HubError(400, f"cannot commit to tag {branch!r}: commits go to a branch")
                raise HubError(
                    404, f"Branch {branch!r} not found in {self.repo_id}; create it first", "RevisionNotFound"
                )
            head = refs["branches"][branch]
            if parent_commit is not None and parent_commit != head:
                raise HubError(
                    412,
                    f"parent commit {parent_commit} is not the head of {branch!r} ({head}): "
                    "someone committed in between; refresh and retry",
                )
            files = dict(self.commit(head)["files"])
            for path in deletes:
                if files.pop(path, None) is None:
                    raise HubError(
                        404, f"cannot delete {path!r}: no such file on {branch!r}", "EntryNotFound"
                    )
            for folder in deleted_folders:
                prefix = folder + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise HubError(
                        404, f"cannot delete folder {folder!r}: not found on {branch!r}", "EntryNotFound"
                    )
                for path in gone:
                    del files[path]
            files.update(adds)
            _check_no_file_is_a_folder(files)
            commit_id = self._write_commit([head], title, message, author, files)
            _pause_for_tests()
            refs["branches"][branch] = commit_id
        return commit_id

    def set_ref(self, kind: str, name: str, revision: str | None) -> None:
        """Create (`revision` given) or delete (None) a branch or tag; 409 if it exists, 404 if it doesn't."""
        label = "branch" if kind == "branches" else "tag"
        check_ref_name(name, label)
        with self.locked() as refs:
            if revision is None:
                if name not in refs[kind]:
                    raise HubError(404, f"{label} {name!r} not found in {self.repo_id}", "RevisionNotFound")
                if kind == "branches" and name == "main":
                    raise HubError(403, "the default branch 'main' cannot be deleted")
                del refs[kind][name]
                return
            if name in refs[kind]:
                raise HubError(
                    409,
                    f"{label} {name!r} already exists in "
                    f"{self.repo_id} (at {refs[kind][name]}); pick another name",
                )
            refs[kind][name] = self.resolve(revision)

    def set_private(self, private: bool) -> None:
        with self.locked():
            write_json(self.path / "repo.json", {**self.meta, "private": private})


class Store:
    """All repositories under `root`; `Repo` objects are cheap views, state lives on disk only.

    One store per root: it holds ``root/serve.lock`` (``flock``, released by `close` or when the process dies)
    and empties the temp folders, left by a crash, only once it holds it; OSError if another store has it.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / "serve.lock", "a+b")  # noqa: SIM115 - held until `close`
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise OSError(
                errno.EBUSY,
                "another lora-hub serve is using this root (one server per root): stop it or pick another --root",
                str(self.root),
            ) from None
        trash = self.root / "trash"
        shutil.rmtree(trash, ignore_errors=True)  # repos deleted (or half created) before a crash
        trash.mkdir()
        for tmp in (self.root / "repos").glob("*/*/*/tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    def close(self) -> None:
        """Let another store open this root."""
        self._lock.close()

    def _path(self, rtype: str, repo_id: str) -> Path:
        namespace, _, name = repo_id.partition("/")
        check_repo_id(namespace, name)
        return self.root / "repos" / rtype / namespace / name

    def get(self, rtype: str, repo_id: str) -> Repo:
        path = self._path(rtype, repo_id)
        if not (path / "refs.json").is_file():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return Repo(path, rtype, repo_id)

    def create(self, rtype: str, repo_id: str, *, private: bool, author: str) -> Repo:
        """Build the repo in ``trash/`` (first commit: ``.gitattributes``), then rename it into place."""
        path = self._path(rtype, repo_id)
        staging = self.root / "trash" / uuid.uuid4().hex
        for sub in ("commits", "objects", "tmp"):
            (staging / sub).mkdir(parents=True)
        write_json(staging / "repo.json", {"private": private, "createdAt": now()})
        repo = Repo(staging, rtype, repo_id)
        data = GITATTRIBUTES.encode()
        entry = {**repo.put_blob([data], len(data), len(data)), "lfs": False}
        first = repo._write_commit([], "initial commit", "", author, {".gitattributes": entry})
        write_json(staging / "refs.json", {"branches": {"main": first}, "tags": {}})
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, path)  # atomic; fails if the target exists and is not empty
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise HubError(409, f"You already created this {rtype} repo: {repo_id}") from None
        return Repo(path, rtype, repo_id)

    def move(self, rtype: str, repo_id: str, new_id: str) -> None:
        """Rename a repo (`HfApi.move_repo`), history, tags and privacy kept; 409 if `new_id` exists."""
        repo = self.get(rtype, repo_id)
        target = self._path(rtype, new_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        with repo.locked():
            try:
                os.rename(repo.path, target)  # atomic; fails if the target exists and is not empty
            except OSError:
                raise HubError(
                    409, f"cannot move {repo_id} to {new_id}: a {rtype} repo {new_id} exists"
                ) from None

    def delete(self, rtype: str, repo_id: str) -> None:
        repo = self.get(rtype, repo_id)
        gone = self.root / "trash" / uuid.uuid4().hex
        with repo.locked():
            os.rename(repo.path, gone)
        shutil.rmtree(gone, ignore_errors=True)


def folders(files: Iterable[str]) -> set[str]:
    """Every folder that holds one of `files` (``a`` and ``a/b`` for ``a/b/c``), in one pass over the paths."""
    return {path[:i] for path in files for i, c in enumerate(path) if c == "/"}


def _check_no_file_is_a_folder(files: dict) -> None:
    """409 if a path is both a file and a folder (``x`` and ``x/y``): git cannot hold that tree, the Hub refuses
    it, and a client downloading it would have to drop one of the two."""
    clash = min(folders(files).intersection(files), default=None)
    if clash is not None:
        inside = min(p for p in files if p.startswith(clash + "/"))
        raise HubError(
            409,
            f"{clash!r} would be both a file and a folder (holding {inside!r}): delete one, or pick another path",
        )


def _pause_for_tests() -> None:
    marker = os.environ.get(_PAUSE_ENV)
    if marker:
        Path(marker).touch()
        time.sleep(60)
