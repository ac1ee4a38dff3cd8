"""Adapter versions: ``MAJOR.MINOR.PATCH`` numbers, their git tags (``v1.2.3``), pull specs and ranges.
The one place that decides version order.

A spec is ``user/repo`` or ``user/repo@RANGE``. Ranges follow npm's rules for release versions:

=============  ===============================  =================================================
``latest``     the highest version              (also what a bare ``user/repo`` means)
``1.2.3``      exactly 1.2.3                    ``v1.2.3`` is accepted too
``^1.2``       ``>=1.2.0, <2.0.0``              the left-most non-zero part is fixed: ``^0.2`` is
                                                ``<0.3.0``, ``^0.0.3`` is exactly 0.0.3
``~1.2``       ``>=1.2.0, <1.3.0``              ``~1`` is ``>=1.0.0, <2.0.0``
``1.2.x``      ``>=1.2.0, <1.3.0``              ``1.x``, ``1.2.*`` and ``1.2`` alike
=============  ===============================  =================================================

Pre-release suffixes (``1.2.3-rc1``) are not versions here: a push is a release.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import BadSpec, VersionNotFound

_NUM = r"(0|[1-9]\d{0,8})"
_MAX = 999_999_999  # the largest part `_NUM` reads back: a bigger one would make a tag no listing sees
_VERSION = re.compile(rf"v?{_NUM}\.{_NUM}\.{_NUM}")
_PART = r"(?:0|[1-9]\d{0,8}|[xX*])"
_PARTIAL = re.compile(rf"(?P<op>[~^]?)v?(?P<major>0|[1-9]\d{{0,8}})(?:\.(?P<minor>{_PART})(?:\.(?P<patch>{_PART}))?)?")
#: The rule for one part of a repo id (namespace or name): huggingface_hub's `validate_repo_id` (``--``, ``..``
#: and a ``.git`` ending refused), a little stricter at the ends. The server (`hub.server.names`) checks names
#: with `is_repo_part` too, so it refuses what the client refuses.
REPO_PART_RULE = ("1-96 letters, digits, '.', '_' or '-', starting and ending with a letter or digit, without "
                  "'--' or '..', not ending in '.git'")
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


@dataclass(frozen=True, order=True)
class Version:
    """A release version; ordered numerically (1.10.0 > 1.9.0)."""

    major: int
    minor: int
    patch: int

    def __post_init__(self) -> None:
        if not all(0 <= part <= _MAX for part in (self.major, self.minor, self.patch)):
            raise BadSpec(f"{self} is not a version: each part must be 0 to {_MAX}")

    @classmethod
    def parse(cls, text: str) -> Version:
        """``"1.2.3"`` or ``"v1.2.3"``; BadSpec otherwise."""
        m = _VERSION.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise BadSpec(f"{text!r} is not a version: use MAJOR.MINOR.PATCH, e.g. 1.0.0")
        return cls(*map(int, m.groups()))

    @property
    def tag(self) -> str:
        """The git tag that marks this version: ``v1.2.3``."""
        return f"v{self}"

    def bump_patch(self) -> Version:
        """The next patch release: 1.2.3 -> 1.2.4 (what a push without a version publishes); BadSpec if the
        patch is already the largest a version may have."""
        if self.patch == _MAX:
            raise BadSpec(f"{self} has no next patch version (each part must be 0 to {_MAX}): give the version "
                          f"to publish")
        return Version(self.major, self.minor, self.patch + 1)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


FIRST = Version(1, 0, 0)


@dataclass(frozen=True)
class Range:
    """The versions ``low <= v < high`` (``high`` None: no upper bound); `text` is what the user wrote."""

    text: str
    low: Version
    high: Version | None

    @classmethod
    def parse(cls, text: str) -> Range:
        """What follows ``@`` in a spec: ``latest`` (or empty, ``*``, ``x``), an exact version, ``^1.2``, ``~1.2`` or
        a partial / wildcard version like ``1.2``, ``1.x``; BadSpec otherwise. See the module's table."""
        text = text.strip()
        if text in ("", "latest", "*", "x"):
            return cls("latest", Version(0, 0, 0), None)
        m = _PARTIAL.fullmatch(text)
        wild = m is not None and any(p is not None and p in "xX*" for p in (m["minor"], m["patch"]))
        minor, patch = (None if p is None or p in "xX*" else int(p) for p in (m["minor"], m["patch"])) if m else (0, 0)
        if m is None or minor is None and patch is not None or m["op"] and wild:
            raise BadSpec(f"{text!r} is not a version or range: use 1.2.3, ^1.2, ~1.2, 1.2.x or latest")
        op, major = m["op"], int(m["major"])
        low = Version(major, minor or 0, patch or 0)
        if op == "^":
            high = _caret_high(major, minor, patch)
        elif minor is None:
            high = _upper(major + 1, 0, 0)
        elif op == "~" or patch is None:
            high = _upper(major, minor + 1, 0)
        else:
            high = _upper(major, minor, patch + 1)
        return cls(text, low, high)

    def __contains__(self, version: Version) -> bool:
        return self.low <= version and (self.high is None or version < self.high)

    def best(self, available: Iterable[Version], repo_id: str = "the repo") -> Version:
        """The highest available version in this range; VersionNotFound (listing what exists) if none."""
        available = sorted(set(available))
        matching = [v for v in available if v in self]
        if not matching:
            have = ", ".join(map(str, available[-8:])) or "none"
            raise VersionNotFound(f"no version of {repo_id} matches {self.text!r} (versions: {have})")
        return matching[-1]


def _caret_high(major: int, minor: int | None, patch: int | None) -> Version | None:
    if major > 0 or minor is None:
        return _upper(major + 1, 0, 0)
    if minor > 0 or patch is None:
        return _upper(0, minor + 1, 0)
    return _upper(0, 0, patch + 1)


def _upper(major: int, minor: int, patch: int) -> Version | None:
    """A range's exclusive upper bound, carried past a part's limit (1.0.<max + 1> is 1.1.0: no version lies
    between); None (no bound) past the largest version."""
    if patch > _MAX:
        minor, patch = minor + 1, 0
    if minor > _MAX:
        major, minor, patch = major + 1, 0, 0
    return None if major > _MAX else Version(major, minor, patch)


def parse_spec(spec: str) -> tuple[str, Range]:
    """``"user/repo@^1.2"`` -> ``("user/repo", Range(^1.2))``; a bare repo id means ``latest``."""
    if not isinstance(spec, str) or spec.count("@") > 1:
        raise BadSpec(f"{spec!r} is not a spec: use user/repo, user/repo@1.2.3 or user/repo@^1.2")
    repo_id, _, wanted = spec.partition("@")
    return check_repo_id(repo_id), Range.parse(wanted)


def is_repo_part(part: str) -> bool:
    """Whether `part` is a valid namespace or repo name (`REPO_PART_RULE`)."""
    return bool(_REPO_PART.fullmatch(part)) and "--" not in part and ".." not in part and not part.endswith(".git")


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is ``namespace/name``, each part valid (`REPO_PART_RULE`); BadSpec otherwise."""
    namespace, slash, name = repo_id.partition("/") if isinstance(repo_id, str) else ("", "", "")
    if not (slash and is_repo_part(namespace) and is_repo_part(name)):
        raise BadSpec(f"{repo_id!r} is not a repo id: use namespace/name, each {REPO_PART_RULE}")
    return repo_id


def from_tags(tags: Iterable[str]) -> dict[Version, str]:
    """The version tags among git tag names: ``{Version: tag}``; other tags are ignored."""
    out = {}
    for tag in tags:
        if tag.startswith("v") and _VERSION.fullmatch(tag):
            out[Version.parse(tag)] = tag
    return out
