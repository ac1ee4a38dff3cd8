"""What the server accepts as a repo id, a revision and a file path, checked before anything touches disk.

Names follow the client's rule (`hub.versions.REPO_PART_RULE`: the Hub's, no ``.git`` ending); revisions are git
ref names or 40-hex commit ids; file paths are relative POSIX paths without empty, ``.``, ``..`` or ``.git``
segments. Every check raises `InvalidName` with a message that names the offending value and the rule, so the
HTTP layer can answer 400 with it. Nothing here touches the file system: the store maps accepted names to
paths, and the checks make sure those paths stay under the server root.
"""

from __future__ import annotations

import re

from ..versions import REPO_PART_RULE, is_repo_part

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

_REF = re.compile(r"[A-Za-z0-9._/-]{1,200}")
COMMIT_ID = re.compile(r"[0-9a-f]{40}")
MAX_PATH = 1000


class InvalidName(ValueError):
    """A repo id, revision or path that the server refuses; the message says which and why."""


def check_name(part: str, what: str = "repo name") -> str:
    """A namespace or repo name, by the client's rule (`hub.versions.is_repo_part`)."""
    if not is_repo_part(part or ""):
        raise InvalidName(f"invalid {what} {part[:100]!r}: use {REPO_PART_RULE}")
    return part


def check_repo_id(namespace: str, name: str) -> str:
    """`namespace/name`, both parts checked."""
    return f"{check_name(namespace, 'namespace')}/{check_name(name)}"


def check_ref_name(ref: str, what: str = "revision") -> str:
    """A branch or tag name as git allows it (the subset the Hub uses)."""
    ok = (
        _REF.fullmatch(ref or "")
        and not ref.startswith(("/", "-", "."))
        and not ref.endswith(("/", ".lock", "."))
        and ".." not in ref
        and "//" not in ref
        and "/." not in ref
        and "@{" not in ref
    )
    if not ok:
        raise InvalidName(
            f"invalid {what} {ref[:100]!r}: use letters, digits, '.', '_', '-' and '/' (at most 200), "
            "no '..', '//', leading '/', '-' or '.', or trailing '/' or '.lock'"
        )
    return ref


def check_path(path: str) -> str:
    """A file path inside a repo: relative, normalised, no traversal."""
    parts = path.split("/") if path else []
    bad = (
        not parts
        or len(path) > MAX_PATH
        or "\x00" in path
        or "\\" in path
        or any(p in ("", ".", "..") for p in parts)
        or ".git" in parts
        or any(ord(c) < 32 for c in path)
    )
    if bad:
        raise InvalidName(
            f"invalid file path {path[:100]!r}: use a relative path of at most {MAX_PATH} characters, "
            "with no empty, '.', '..' or '.git' segments, backslashes or control characters"
        )
    return path
