"""The hub's exceptions: one class per failure a user can act on, each with a one-line message that names the
repo, version or folder and what to do. The CLI prints ``str(err)`` and exits with ``err.exit_code``."""

from __future__ import annotations


class HubError(Exception):
    """Base class: a hub operation that could not be done; nothing was changed unless the message says so."""

    exit_code = 1


class BadSpec(HubError):
    """A malformed repo id, version or version range."""

    exit_code = 2


class RepoNotFound(HubError):
    """The repo does not exist on the endpoint (or is private and the token may not see it)."""


class VersionNotFound(HubError):
    """No version of the repo matches the requested version or range."""


class VersionExists(HubError):
    """The version is already published; versions are never overwritten."""


class InvalidAdapter(HubError):
    """A local or downloaded folder that is not a valid PEFT-format LoRA adapter."""


class AuthError(HubError):
    """The endpoint refused the token (missing, wrong, or without write access)."""


class Unreachable(HubError):
    """The endpoint could not be reached."""


class IntegrityError(HubError):
    """A downloaded file does not match the hash the hub recorded for it."""


class PushIncomplete(HubError):
    """The commit landed but its version tag did not: the version is not visible; pushing again finishes it."""
