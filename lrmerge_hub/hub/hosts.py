"""Which hosts the Hub's answers may send lrmerge to: the token goes to the Hub endpoint only.

Uploading a file to LFS storage, the client asks the Hub's batch endpoint where the bytes go
(`upload.href`, and a URL per part for a multipart upload) and where to confirm the upload
(`verify.href`, which huggingface_hub calls with `Authorization: Bearer <token>`). Every batch
answer is checked before the client uses it: the verify step must be the endpoint itself
(`HF_ENDPOINT`, after the client's own rewrite of huggingface.co URLs for mirrors); the bytes
may also go to the Hub's storage (the presigned S3 URLs of huggingface.co on `*.amazonaws.com`,
the Hub's own `*.huggingface.co` and `*.hf.co` hosts) or to a self-hosted Hub's storage named
in `LRMERGE_HUB_STORAGE_HOSTS`. Besides, a request that carries a token lrmerge pushes with is
refused unless it goes to the endpoint, whatever asked for it.

Both checks are hooks of huggingface_hub's HTTP client, installed once through its public
`set_client_factory`; they raise HubUntrustedHostError (one line) before anything is sent.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx2
from huggingface_hub import constants as hf_constants
from huggingface_hub import set_client_factory
from huggingface_hub.utils import fix_hf_endpoint_in_url
from huggingface_hub.utils._http import default_client_factory  # the client's default, to extend

from ..errors import HubUntrustedHostError, shown
from ..settings import hub_storage_hosts

HUB_STORAGE_HOSTS = ("huggingface.co", "hf.co")  # and their subdomains
HUB_STORAGE_SUFFIXES = (".amazonaws.com",)  # huggingface.co's presigned S3 upload URLs
_tokens: set[str] = set()
_lock = threading.Lock()
_installed = False


def _origin(url: str | httpx2.URL) -> tuple[str, str, int | None] | None:
    try:
        u = httpx2.URL(str(url))
    except (httpx2.InvalidURL, TypeError, ValueError):
        return None
    return u.scheme, u.host.lower(), u.port or {"https": 443, "http": 80}.get(u.scheme)


def _is_endpoint(url: str | httpx2.URL) -> bool:
    return _origin(url) is not None and _origin(url) == _origin(hf_constants.ENDPOINT)


def _is_storage(url: str) -> bool:
    """The endpoint, the Hub's storage, or a host of LRMERGE_HUB_STORAGE_HOSTS."""
    origin = _origin(url)
    if origin is None or not origin[1]:
        return False
    _, host, port = origin
    extra = {h.lower() for h in hub_storage_hosts()}
    return (
        _is_endpoint(url)
        or host in HUB_STORAGE_HOSTS
        or host.endswith(tuple("." + h for h in HUB_STORAGE_HOSTS))
        or host.endswith(HUB_STORAGE_SUFFIXES)
        or host in extra
        or f"{host}:{port}" in extra
    )


def _host(url: str | httpx2.URL) -> str:
    try:
        return httpx2.URL(str(url)).netloc.decode("ascii", "replace")
    except (httpx2.InvalidURL, TypeError, ValueError):
        return str(url)


def _refuse(what: str, url: str) -> HubUntrustedHostError:
    hub = _host(hf_constants.ENDPOINT)
    if what == "bytes":
        fix = "if it is your Hub's storage, add it to LRMERGE_HUB_STORAGE_HOSTS"
    else:
        what, fix = "verify step (which carries the token)", "only the Hub endpoint gets the token"
    return HubUntrustedHostError(
        f"the Hub at {hub} sent the upload's {what} to another host, {shown(_host(url))}; "
        f"refused before anything went there ({fix}); nothing was committed"
    )


def check_batch_answer(response: httpx2.Response) -> None:
    """Refuse an LFS batch answer (from the endpoint) whose hrefs leave the Hub."""
    request = response.request
    if (
        request.method != "POST"
        or not request.url.path.endswith("/info/lfs/objects/batch")
        or not _is_endpoint(request.url)
        or response.status_code >= 300
    ):
        return
    response.read()
    try:
        objects = response.json().get("objects")
    except (ValueError, AttributeError):
        return  # the client reports a malformed answer itself
    for obj in objects if isinstance(objects, list) else []:
        actions: Any = obj.get("actions") if isinstance(obj, dict) else None
        if not isinstance(actions, dict):
            continue
        for name, action in actions.items():
            if not isinstance(action, dict):
                continue
            href = fix_hf_endpoint_in_url(str(action.get("href", "")), hf_constants.ENDPOINT)
            if name == "verify" and not _is_endpoint(href):
                raise _refuse("verify", href)
            if name == "upload":
                header = action.get("header")
                parts = [str(v) for k, v in header.items() if str(k).isdigit()] if isinstance(header, dict) else []
                for url in [href, *parts]:
                    if not _is_storage(url):
                        raise _refuse("bytes", url)


def check_request(request: httpx2.Request) -> None:
    """Refuse a request that carries a protected token to a host other than the endpoint."""
    auth = request.headers.get("authorization")
    if auth and auth.startswith("Bearer ") and auth[len("Bearer ") :] in _tokens and not _is_endpoint(request.url):
        raise HubUntrustedHostError(
            f"a request with the Hub token was about to go to {shown(_host(request.url))}, "
            f"not the Hub at {_host(hf_constants.ENDPOINT)}; refused (only the Hub "
            "endpoint gets the token)"
        )


def _guarded_client() -> httpx2.Client:
    """huggingface_hub's own default client (its hooks: offline mode, request ids), plus ours."""
    client = default_client_factory()
    hooks = client.event_hooks
    client.event_hooks = {
        "request": [*hooks.get("request", []), check_request],
        "response": [*hooks.get("response", []), check_batch_answer],
    }
    return client


def install() -> None:
    """Make huggingface_hub's client run the checks (once per process; the package lrmerge_hub.hub does it on import,
    before any request, since replacing the client closes the one in use)."""
    global _installed
    with _lock:
        if not _installed:
            set_client_factory(_guarded_client)
            _installed = True


def protect(token: str | None) -> None:
    """Refuse `token` to any host other than the Hub endpoint (and install the checks)."""
    install()
    if token:
        _tokens.add(token)
