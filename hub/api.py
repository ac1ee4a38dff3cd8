"""The hub verbs: push, pull, versions, merge, info. Each is a few `huggingface_hub` calls, so they work against
the real Hub and against `lora-hub serve` alike (``endpoint=`` or ``HF_ENDPOINT``).

A version is a git tag ``v<semver>`` on a commit of ``main``. A push validates the adapter before sending
anything, uploads every file and the model card in one commit whose parent is the head it saw (so a racing push
fails instead of mixing files), then tags it; the tag is what makes the version visible, so a push killed at any
point leaves the published versions as they were, and pushing again finishes it. A pull resolves the version
to its commit, downloads that snapshot into the client's cache, and checks every file against the hash the hub
holds for it (git blob sha1, or sha256 for LFS files) before validating the adapter. Offline
(``HF_HUB_OFFLINE=1``) the tags and hashes the cache recorded on the last pull are used instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import huggingface_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from lightning_lora.card import render_card
from lightning_lora.io import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    AdapterInfo,
    adapter_file,
    atomic_write,
    read_tensors,
    validate_adapter,
)

from .errors import (
    AuthError,
    BadSpec,
    HubError,
    IntegrityError,
    InvalidAdapter,
    PushIncomplete,
    RepoNotFound,
    Unreachable,
    VersionExists,
    VersionNotFound,
)
from .merging import check_out_dir, dtype_of, merge_into
from .versions import FIRST, Range, Version, check_repo_id, from_tags, parse_spec

_BASE_LINE = "base_model: "
_CHUNK = 1 << 20
_DATE = "%Y-%m-%d %H:%M"
# how hf_xet words an HTTP error answer (a ConnectionError): "... HTTP status client error (400 Bad Request),
# domain: <url>"
_XET_HTTP_ERROR = re.compile(r"HTTP status (?:client|server) error \(\d{3}[^)]*\), domain: (\S+)")


@dataclass(frozen=True)
class PushResult:
    """What `push` published: `version` of `repo_id`, tagged on `commit` (full sha); `url` is the commit's page."""

    repo_id: str
    version: Version
    commit: str
    url: str


@dataclass(frozen=True)
class VersionInfo:
    """One published version, as `versions` lists it: its tagged `commit`, the commit's `date` (UTC,
    ``YYYY-MM-DD HH:MM``) and title `message`, and the adapter's `base_model` when the push recorded one."""

    version: Version
    commit: str
    date: str
    message: str
    base_model: str | None


@dataclass(frozen=True)
class MergeResult:
    """What `merge` wrote: the model folder `path`, saved as `dtype` (``"float16"``...); `max_diff` is the largest
    |merged - adapter| output difference on the probe batch; `url` the upload's commit when ``push_to`` was given."""

    path: Path
    max_diff: float
    dtype: str
    url: str | None = None


# -- push --------------------------------------------------------------------------------------------------
def push(
    adapter_dir: str | os.PathLike,
    repo_id: str,
    version: str | Version | None = None,
    message: str | None = None,
    private: bool = True,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Publish the adapter in `adapter_dir` as `version` of `repo_id` (default: the latest patch + 1, or 1.0.0).
    `private` applies when the push creates the repo; an existing repo keeps its visibility.

    Raises InvalidAdapter before anything is sent, VersionExists (nothing changed) if the version is taken,
    PushIncomplete if the commit landed but the tag did not (pushing again finishes it).
    """
    repo_id = check_repo_id(repo_id)
    wanted = version if isinstance(version, Version) or version is None else Version.parse(version)
    info = _validate(adapter_dir)
    files = _upload_files(Path(adapter_dir))
    api = HfApi(endpoint=endpoint, token=token)
    with _translate(api, repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        refs = api.list_repo_refs(repo_id)
        published = {v: t.target_commit for v, t in _version_tags(refs).items()}
        new = wanted or (max(published).bump_patch() if published else FIRST)
        if new in published:
            raise _exists(repo_id, new, published)
        head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
        title = message or f"Push version {new}"
        history = _history(api, repo_id, refs, head)
        today = datetime.now(timezone.utc).strftime(_DATE)
        card = render_card(info, repo_id=repo_id, versions=[_row(VersionInfo(new, "", today, title, None))] +
                           [_row(v) for v in reversed(history)])
        ops = _operations(api, repo_id, head, files, card)
        try:
            commit = api.create_commit(repo_id, ops, commit_message=title, parent_commit=head, commit_description=
                                       f"lora-hub version: {new}\n{_BASE_LINE}{info.base_model or ''}")
        except hf_errors.HfHubHTTPError as err:
            if _status(err) == 412:  # main moved since `head`: if by a push of `new`, that one won
                published = {v: t.target_commit for v, t in _version_tags(api.list_repo_refs(repo_id)).items()}
                if new in published:
                    raise _exists(repo_id, new, published) from None
            raise
    try:
        with _translate(api, repo_id):
            api.create_tag(repo_id, tag=new.tag, revision=commit.oid, tag_message=title)
    except VersionExists:
        raise VersionExists(f"{repo_id} version {new} was published by another push while this one ran; commit "
                            f"{commit.oid[:12]} stays untagged on main, no version changed") from None
    except HubError as err:
        raise PushIncomplete(f"committed {commit.oid[:12]} to {repo_id} but tagging {new.tag} failed ({err}); "
                             f"version {new} is not visible yet: run the same push again to finish it") from None
    return PushResult(repo_id, new, commit.oid, commit.commit_url)


def _exists(repo_id: str, version: Version, published: dict[Version, str]) -> VersionExists:
    """The refusal of a push of `version`, which `published` (version -> commit) already holds."""
    try:
        then = f"push as {max(published).bump_patch()}"
    except BadSpec:  # the latest patch is the largest a version may have
        then = "push as a new minor or major version"
    return VersionExists(f"{repo_id} already has version {version} (commit {published[version][:12]}); versions "
                         f"are never overwritten, nothing was changed: {then}")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _upload_files(directory: Path) -> list[Path]:
    """The adapter folder's top-level files to upload: not hidden ones, not the card (generated per push).

    Pickle files (``optimizer.pt``, ``training_args.bin``: what a Trainer checkpoint folder also holds) are refused,
    not published. Symlinks to files are followed, as huggingface_hub's own upload does: the folder `pull` returns is a cache
    snapshot whose files are links into its blobs; a link pointing anywhere else (say to ~/.netrc) is refused
    (`adapter_file`). InvalidAdapter, before anything is sent, also if the adapter's two files are not among them
    (removed since validation, or named in another case on a case-insensitive disk): a commit never lacks them.
    """
    names = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name != CARD_NAME)
    try:
        files = [adapter_file(directory, name) for name in names]
    except AdapterError as err:
        raise InvalidAdapter(f"invalid adapter: {_one_line(str(err))}; nothing was pushed") from None
    pickles = [n for n in names if n.lower().endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise InvalidAdapter(f"invalid adapter: {directory} holds pickle files {pickles} (training state, such as a "
                             f"Trainer checkpoint's optimizer.pt): loading a pickle can run code, so lora-hub never "
                             f"publishes one; push a folder with the adapter only (save_adapter); nothing was pushed")
    missing = sorted({CONFIG_NAME, WEIGHTS_NAME} - set(names))
    if missing:
        raise InvalidAdapter(f"invalid adapter: {directory} has no file named exactly {' or '.join(missing)} to "
                             f"upload (removed or renamed since it was validated?); nothing was pushed")
    return files


def _operations(api: HfApi, repo_id: str, head: str | None, files: list[Path], card: str) -> list:
    """Add `files` and the card; delete what the last version had beyond."""
    ops: list = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    ops.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode("utf-8")))
    keep = {op.path_in_repo for op in ops} | {".gitattributes"}
    if head is not None:
        ops += [CommitOperationDelete(path_in_repo=f) for f in api.list_repo_files(repo_id, revision=head)
                if f not in keep]
    return ops


# -- versions ----------------------------------------------------------------------------------------------
def versions(repo_id: str, endpoint: str | None = None, token: str | None = None) -> list[VersionInfo]:
    """The published versions of `repo_id`, oldest first (semver order), with commit, date, message, base."""
    repo_id = check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    with _translate(api, repo_id):
        refs = api.list_repo_refs(repo_id)
        head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
        return _history(api, repo_id, refs, head)


def _history(api: HfApi, repo_id: str, refs, head: str | None) -> list[VersionInfo]:
    tags = _version_tags(refs)
    if not tags:
        return []
    commits = {c.commit_id: c for c in api.list_repo_commits(repo_id, revision=head)} if head else {}
    out = []
    for version in sorted(tags):
        sha = tags[version].target_commit
        commit = commits.get(sha)
        base = None
        if commit is not None:
            base = next((line[len(_BASE_LINE):].strip() for line in (commit.message or "").splitlines()
                         if line.startswith(_BASE_LINE)), None) or None
        out.append(VersionInfo(version, sha, commit.created_at.strftime(_DATE) if commit else "",
                               commit.title if commit else "", base))
    return out


def _version_tags(refs) -> dict[Version, object]:
    by_name = {t.name: t for t in refs.tags}
    return {v: by_name[name] for v, name in from_tags(by_name).items()}


def _row(v: VersionInfo) -> dict[str, str]:
    return {"version": str(v.version), "commit": v.commit[:12] or "this commit", "date": v.date, "message": v.message}


# -- pull --------------------------------------------------------------------------------------------------
def pull(
    spec: str,
    local_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Download the version `spec` names (``user/repo``, ``user/repo@1.2.0``, ``@latest``, ``@^1.2``) and
    return its folder: the cache's snapshot, or `local_dir` holding a copy. Every file is checked against the
    hub's hash and the adapter is validated; IntegrityError / InvalidAdapter otherwise."""
    return _pull(spec, local_dir, endpoint, token, cache_dir)[0]


def _pull(spec: str, local_dir, endpoint, token, cache_dir) -> tuple[Path, AdapterInfo]:
    """`pull`, also returning the validated adapter's info (so callers need not read it again)."""
    repo_id, wanted = parse_spec(spec)
    if local_dir is not None and Path(local_dir).exists() and not Path(local_dir).is_dir():
        raise HubError(f"{local_dir} already exists and is a file; choose another --to (a folder) or delete it")
    api = HfApi(endpoint=endpoint, token=token)
    offline = huggingface_hub.is_offline_mode()
    with _translate(api, repo_id):
        if offline:
            version, sha = _resolve_cached(repo_id, wanted, cache_dir)
            expected = None
        else:
            tags = _version_tags(api.list_repo_refs(repo_id))
            version = wanted.best(tags, repo_id)
            sha = tags[version].target_commit
            expected = {f.path: _hub_hash(f) for f in api.list_repo_tree(repo_id, revision=sha, recursive=True)
                        if hasattr(f, "blob_id")}
        # by the commit the tag named, so nothing named like the tag (a branch ``v1.0.0``) or moved since
        # changes what is pulled; the tag is then recorded in the cache, as a download by tag would, for offline
        snapshot = Path(huggingface_hub.snapshot_download(
            repo_id, revision=sha, cache_dir=cache_dir, endpoint=endpoint, token=token))
    if not offline:
        with atomic_write(snapshot.parent.parent / "refs" / version.tag) as tmp:
            tmp.write_text(sha)
    what = f"{repo_id}@{version}"
    _verify(snapshot, expected if expected is not None else _cached_hashes(snapshot, what), what)
    out = snapshot if local_dir is None else _copy_files(snapshot, Path(local_dir))
    return out, _validate(out)


def _resolve_cached(repo_id: str, wanted: Range, cache_dir) -> tuple[Version, str]:
    refs = Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE) / repo_folder_name(
        repo_id=repo_id, repo_type="model") / "refs"
    tags = {v: (refs / t).read_text().strip() for v, t in from_tags(
        p.name for p in refs.iterdir()).items()} if refs.is_dir() else {}
    try:
        version = wanted.best(tags, repo_id)
    except VersionNotFound as err:
        raise VersionNotFound(f"{err}; offline (HF_HUB_OFFLINE=1) only versions pulled before are available") from None
    return version, tags[version]


def _hub_hash(entry) -> tuple[str, str]:
    return ("sha256", entry.lfs.sha256) if entry.lfs else ("git-sha1", entry.blob_id)


def _cached_hashes(snapshot: Path, what: str) -> dict[str, tuple[str, str]]:
    """What the hub said each file's hash was when it was downloaded: the cache names blobs by their ETag and
    links the snapshot's files to them. A cache without links (``HF_HUB_DISABLE_SYMLINKS``, Windows without
    developer mode) moves the blobs into the snapshot and keeps no hash: such files are not verified, with a
    warning, rather than refused."""
    out, copies = {}, []
    for path in sorted(snapshot.rglob("*")):
        name = path.relative_to(snapshot).as_posix()
        if path.is_symlink():
            etag = Path(os.readlink(path)).name
            out[name] = ("sha256" if len(etag) == 64 else "git-sha1", etag)
        elif path.is_file():
            copies.append(name)
    if copies:
        warnings.warn(f"{what}: {', '.join(copies)} not verified: the cache holds copies, which keep no record of "
                      f"the hub's hashes (symlinks disabled); pull online to verify", stacklevel=4)
    return out


def _verify(folder: Path, expected: dict[str, tuple[str, str]], what: str) -> None:
    for name, (algo, want) in expected.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{what}: {name} is missing from the download; pull again")
        got = file_hash(path, algo)
        if got != want:
            raise IntegrityError(f"{what}: {name} has {algo} {got[:12]}, the hub recorded {want[:12] or 'none'} "
                                 f"(corrupt download or cache); delete it from the cache and pull again")


def file_hash(path: str | os.PathLike, algo: str) -> str:
    """``"sha256"`` of the bytes, or ``"git-sha1"``: git's blob id, sha1 over ``b"blob <size>\\0" + bytes``."""
    path = Path(path)
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_files(snapshot: Path, target: Path) -> Path:
    """Copy every file beside its place in `target`, and only once all are copied rename them into place: a
    pull into a folder holding an earlier version that is interrupted or fails while copying leaves that version
    whole, not its weights beside the new config."""
    with contextlib.ExitStack() as renames:
        for path in sorted(snapshot.rglob("*")):
            if path.is_file():
                shutil.copyfile(path, renames.enter_context(atomic_write(target / path.relative_to(snapshot))))
    return target


# -- info and merge ----------------------------------------------------------------------------------------
def info(dir_or_spec: str | os.PathLike, endpoint: str | None = None, token: str | None = None,
         cache_dir: str | os.PathLike | None = None) -> AdapterInfo:
    """What an adapter is (config, parameter count, base, size): a local folder, or a spec pulled first."""
    return _local_or_pulled(dir_or_spec, endpoint, token, cache_dir)[1]


def merge(
    spec_or_dir: str | os.PathLike,
    base: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    push_to: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> MergeResult:
    """Fold an adapter (folder or spec) into its base (folder or repo id on the endpoint) and save the full
    model to `out_dir` (sharded safetensors, config, tokenizer files when the base has them); optionally upload
    it to `push_to`. The merge runs in float32, then casts to `dtype` (default: the base's dtype).

    ``max_diff`` is the largest absolute difference between the merged model's output and the unmerged
    adapter's on a fixed probe batch: float32 rounding only, unless something is wrong.
    """
    check_out_dir(Path(out_dir))  # every argument before the downloads, which for a base may take long
    dtype_of(dtype)
    if push_to:
        _check_push_to(HfApi(endpoint=endpoint, token=token), check_repo_id(push_to))
    adapter, adapter_info = _local_or_pulled(spec_or_dir, endpoint, token, cache_dir)
    base_dir = Path(base)
    if not base_dir.is_dir():
        api = HfApi(endpoint=endpoint, token=token)
        with _translate(api, _not_a_folder(base, check_repo_id)):
            base_dir = Path(huggingface_hub.snapshot_download(str(base), cache_dir=cache_dir, endpoint=endpoint,
                                                              token=token))
    path, max_diff, saved_dtype = merge_into(adapter, adapter_info, base_dir, Path(out_dir), dtype)
    url = None
    if push_to:
        api = HfApi(endpoint=endpoint, token=token)
        with _translate(api, check_repo_id(push_to)):
            api.create_repo(push_to, private=True, exist_ok=True)
            url = api.upload_folder(repo_id=push_to, folder_path=path, commit_message=f"Merge {spec_or_dir} into {base}")
    return MergeResult(path, max_diff, saved_dtype, str(url) if url else None)


def _check_push_to(api: HfApi, repo_id: str) -> None:
    """HubError if `repo_id` exists and holds anything beyond ``.gitattributes``: the upload adds files and
    deletes none, so the merged model would be mixed with them (an adapter's files make transformers load
    the adapter, not the model)."""
    with _translate(api, repo_id):
        try:
            held = sorted(set(api.list_repo_files(repo_id)) - {".gitattributes"})
        except hf_errors.RepositoryNotFoundError:
            return
    if held:
        raise HubError(f"{repo_id} already exists and is not empty ({', '.join(held[:3])}{', ...' if held[3:] else ''}"
                       f"); push the merged model to a new repo")


def _local_or_pulled(dir_or_spec: str | os.PathLike, endpoint, token, cache_dir) -> tuple[Path, AdapterInfo]:
    """A local adapter folder, or the spec pulled; with its validated info either way."""
    local = Path(dir_or_spec)
    if local.is_dir():
        return local, _validate(local)
    return _pull(_not_a_folder(dir_or_spec, parse_spec), None, endpoint, token, cache_dir)


def _not_a_folder(value: str | os.PathLike, check: Callable[[str], object]) -> str:
    """`value`, which names no folder, as a string once `check` (`parse_spec` or `check_repo_id`) accepts it;
    if it does not, the error says both: a mistyped path should not read as only a malformed repo id. A file's
    path (``out/adapter_model.safetensors``) is refused as such, not looked up as a repo."""
    if Path(value).exists():
        raise BadSpec(f"{str(value)!r} is a file, not a folder: give the folder that holds it")
    try:
        check(str(value))
    except BadSpec as err:
        raise BadSpec(f"no folder {str(value)!r}, and {err}") from None
    return str(value)


# -- errors ------------------------------------------------------------------------------------------------
def _validate(directory: str | os.PathLike) -> AdapterInfo:
    """`validate_adapter`, and every value finite: it reads only the header, and a diverged (NaN / Inf) adapter
    must not become a version that every load refuses."""
    try:
        info = validate_adapter(directory)
        read_tensors(directory)
        return info
    except AdapterError as err:
        raise InvalidAdapter(f"invalid adapter: {_one_line(str(err))}") from None
    except OSError as err:
        raise InvalidAdapter(f"invalid adapter: cannot read {directory}: {err.strerror or err}") from None


@contextlib.contextmanager
def _translate(api: HfApi, repo_id: str) -> Iterator[None]:
    """Turn the client's exceptions into HubError subclasses with one line each, never carrying a token."""
    try:
        yield
    except HubError:
        raise
    except Exception as err:  # mapped below, re-raised when unknown
        mapped = _map_error(_xet_answer(api, err), api.endpoint, repo_id)
        if mapped is None:
            raise
        raise type(mapped)(_scrub(str(mapped), api.token)) from None


def _xet_answer(api: HfApi, err: Exception) -> Exception:
    """hf_xet reports an HTTP error answer as a ConnectionError that names the URL but not what the server
    said (a server that does not speak Xet answers its token request 400, saying to set HF_HUB_DISABLE_XET=1).
    For such an error from the endpoint, ask that URL again: the error it gives carries the server's message
    and maps like any other, and a server gone since stays Unreachable. `err` otherwise."""
    answered = _XET_HTTP_ERROR.search(str(err)) if isinstance(err, ConnectionError) else None
    if answered is None or not answered[1].startswith(api.endpoint.rstrip("/") + "/"):  # the token goes nowhere else
        return err
    try:
        hf_raise_for_status(get_session().get(answered[1], headers=build_hf_headers(token=api.token),
                                              timeout=huggingface_hub.constants.HF_HUB_ETAG_TIMEOUT))
    except Exception as again:  # noqa: BLE001 - the caller maps it
        return again
    return err


def _map_error(err: Exception, where: str, repo_id: str) -> HubError | None:
    import httpx2

    if isinstance(err, hf_errors.RepositoryNotFoundError):
        return RepoNotFound(f"repo {repo_id} not found on {where} (or it is private and your token may not see it)")
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return VersionNotFound(f"{repo_id}: revision not found on {where}: {_hf_message(err)}")
    if isinstance(err, hf_errors.OfflineModeIsEnabled):
        return Unreachable(f"offline mode (HF_HUB_OFFLINE=1): {where} cannot be asked about {repo_id}; unset "
                           f"HF_HUB_OFFLINE (offline, only versions pulled before can be pulled)")
    if isinstance(err, hf_errors.LocalEntryNotFoundError):
        return Unreachable(f"{repo_id}: {_one_line(str(err))}")
    if isinstance(err, UnicodeEncodeError) and str(err.object).startswith("Bearer "):  # headers are ASCII
        return AuthError(f"the token for {where} (HF_TOKEN or `hf auth login`) holds a character that is not ASCII "
                         f"(pasted with an invisible one?): set it again")
    if isinstance(err, hf_errors.HfHubHTTPError):
        status = _status(err)
        if status in (401, 403):
            return AuthError(f"{where} refused the token for {repo_id} (HTTP {status}): set HF_TOKEN or run "
                             f"`hf auth login` with a token that may write there")
        if status == 409:
            return VersionExists(f"{repo_id}: {_hf_message(err)}")
        if status == 412:
            return HubError(f"{repo_id} changed while pushing (another push landed first); nothing was changed: "
                            f"push again")
        return HubError(f"{where} answered HTTP {status} for {repo_id}: {_hf_message(err)}")
    if isinstance(err, ConnectionError) and _XET_HTTP_ERROR.search(str(err)):
        return HubError(f"the Xet transfer for {repo_id} got an HTTP error answer: {_one_line(str(err))}")
    if isinstance(err, httpx2.UnsupportedProtocol):  # HF_ENDPOINT=127.0.0.1:8000: nothing was even tried
        return Unreachable(f"the endpoint {where!r} is not an http:// or https:// URL: set --endpoint or HF_ENDPOINT "
                           f"to one, e.g. http://127.0.0.1:8000")
    if isinstance(err, (httpx2.TransportError, ConnectionError)):
        return Unreachable(f"cannot reach {where} ({type(err).__name__}); is `lora-hub serve` running? set "
                           f"--endpoint or HF_ENDPOINT")
    return None


def _status(err: hf_errors.HfHubHTTPError) -> int | None:
    return err.response.status_code if err.response is not None else None


def _hf_message(err: Exception) -> str:
    server = getattr(err, "server_message", None)
    return _one_line(server or str(err))


def _one_line(text: str) -> str:
    line = " ".join(text.strip().splitlines()[:1]) if text.strip() else "unknown error"
    return _scrub(line, huggingface_hub.get_token())


def _scrub(text: str, *tokens: str | bool | None) -> str:
    for token in tokens:
        if isinstance(token, str) and token:
            text = text.replace(token, "***")
    return text
