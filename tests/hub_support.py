"""Fixtures for tests that talk to the test Hub (tests/hub_server.py) through the official client.

tests/conftest.py fixes `HF_ENDPOINT` (a free port on 127.0.0.1) and `HF_HOME` (a temp folder) for
the whole session before anything imports huggingface_hub; this module serves that address.
tests/conftest.py registers the fixtures `hub_server` and `hub_session` for every test module.

`hub_server` gives each test an empty Hub with one user `alice` whose token is `TOKEN`, no
HF_TOKEN in the environment, and a fresh HF cache (`HF_HUB_CACHE`) of its own. Seed repos
with `hub_server.seed("org/name", folder, branch=..., private=..., gated=...)`, tag them with
`hub_server.tag(...)`, inject failures with `hub_server.fail(...)`, read what was pushed with
`hub_server.files(...)` and what was requested in `hub_server.log`.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.hub_server import HubServer

TOKEN = "hf_test-token-never-printed"  # a test secret; hyphens keep it from looking like a real token
USER = "alice"


_SERVER: HubServer | None = None


def _shared_server() -> HubServer:
    """One test Hub per test process, on the address conftest put in HF_ENDPOINT (several test
    modules import the fixtures below; each import would otherwise start its own server)."""
    global _SERVER
    if _SERVER is None:
        url = urlsplit(os.environ.get("HF_ENDPOINT", ""))
        if url.hostname != "127.0.0.1" or not url.port:
            pytest.fail(
                "HF_ENDPOINT must be set to http://127.0.0.1:PORT in tests/conftest.py before "
                "huggingface_hub is imported"
            )
        _SERVER = HubServer(port=url.port).start()
        atexit.register(_SERVER.stop)
    return _SERVER


@pytest.fixture(scope="session")
def hub_session() -> HubServer:
    """The test Hub, started once per test process."""
    return _shared_server()


@pytest.fixture
def hub_server(hub_session: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """An empty test Hub with user `alice` (token `TOKEN`), and a fresh HF cache for this test."""
    from huggingface_hub import constants

    hub_session.reset()
    hub_session.add_token(TOKEN, USER)
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for subprocesses
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import in this process
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub_session
