"""The few HTTP calls lrmerge makes to a server it started (or was pointed at): readiness,
JSON requests and the key header. Standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> int | None:
    """HTTP status of a GET, or None when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def http_json(url: str, headers: dict[str, str] | None = None, body: dict | None = None, timeout: float = 60.0) -> dict:
    """GET (or POST `body`) and decode JSON. Raises urllib errors."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
