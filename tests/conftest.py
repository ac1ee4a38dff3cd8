"""Shared fixtures. Other test files append theirs below (append only)."""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same random state."""
    random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture
def adapter_path(tmp_path):
    """A fresh folder for one adapter."""
    path = tmp_path / "adapter"
    path.mkdir()
    return path


# -- the Hub-compatible server (hub/server) and the unmodified huggingface_hub client pointed at it ---------------
HUB_TOKEN = "hf_lora_hub_test_token_5f0c2d"


def _hub_server(tmp_path, monkeypatch, token):
    from helpers import point_hf_client

    from hub.server import serve

    with serve(tmp_path / "hub-root", token=token) as server:
        point_hf_client(monkeypatch, server.url, tmp_path / "hf-home", token=token)
        yield server


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A fresh `HubServer` on 127.0.0.1 (root ``tmp_path/hub-root``, no token) with HF_ENDPOINT and the client's
    constants pointed at it, a fresh HF_HOME, telemetry off, online. See `helpers.point_hf_client`."""
    yield from _hub_server(tmp_path, monkeypatch, None)


@pytest.fixture
def hub_token(tmp_path, monkeypatch):
    """Like `hub_server`, but the server requires `HUB_TOKEN` for writes and private reads, and HF_TOKEN holds
    it (pass ``token=False`` to a client call to send none)."""
    yield from _hub_server(tmp_path, monkeypatch, HUB_TOKEN)


# -- hypothesis: no example database in the checkout, no per-example deadline on 2 shared cores ----------------
from hypothesis import settings as _hypothesis_settings

_hypothesis_settings.register_profile("lightning-lora", database=None, deadline=None)
_hypothesis_settings.load_profile("lightning-lora")
