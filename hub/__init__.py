"""The adapter hub: versioned sharing of PEFT-format LoRA adapters over the Hugging Face Hub protocol.

``push`` / ``pull`` / ``versions`` / ``merge`` / ``info`` talk to any Hub-compatible endpoint (``HF_ENDPOINT``);
``serve`` runs our own. Failures raise `HubError` subclasses whose message is one line.

The verbs (`hub.api`) load on first use: they need torch and lightning_lora, which the server does not.
"""

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
from .server import serve
from .versions import Range, Version

__all__ = [
    "AuthError", "BadSpec", "HubError", "IntegrityError", "InvalidAdapter", "MergeResult", "PushIncomplete",
    "PushResult", "Range", "RepoNotFound", "Unreachable", "Version", "VersionExists", "VersionInfo",
    "VersionNotFound", "info", "merge", "pull", "push", "serve", "versions",
]

# `hub.versions` is the verb, not the submodule that importing `Range` above bound to the same name.
del versions  # noqa: F821 - bound by the import of the submodule
_API = {"MergeResult", "PushResult", "VersionInfo", "info", "merge", "pull", "push", "versions"}


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
