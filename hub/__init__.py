"""The adapter hub: versioned sharing of PEFT-format LoRA adapters over the Hugging Face Hub protocol.

``push`` / ``pull`` / ``versions`` / ``merge`` / ``info`` talk to any Hub-compatible endpoint (``HF_ENDPOINT``);
``serve`` runs our own. Failures raise `HubError` subclasses whose message is one line.
"""

from .api import MergeResult, PushResult, VersionInfo, info, merge, pull, push, versions
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
