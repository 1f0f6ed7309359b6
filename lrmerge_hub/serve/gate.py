"""The API key in front of every route of a served model.

vLLM checks `--api-key` only under /v1, /v2, /inference and /cohere: `/invocations`,
`/tokenize`, `/pooling`, `/metrics`, `/health` ... answer anyone. So `lrmerge serve` with a
key adds `RequireKey` to vLLM's app (`--middleware lrmerge_hub.serve.gate.RequireKey`), which
refuses every request without `Authorization: Bearer KEY` with 401 before vLLM routes it,
whatever the path or method; and, for several models, runs `python -m lrmerge_hub.serve.gate`: a
small router that checks the key the same way, then passes each request to the vLLM that
serves its `model` and streams the answer back.

The key is read from VLLM_API_KEY (never argv). This module imports nothing heavy: vLLM
imports it at start-up; the router needs aiohttp (a dependency of vLLM).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import os
import sys
from typing import Any

KEY_VARIABLE = "VLLM_API_KEY"
UNAUTHORIZED = {
    "error": {
        "message": "missing or wrong API key: send the header Authorization: Bearer <key>",
        "type": "authentication_error",
        "code": 401,
    }
}
MAX_REQUEST_BYTES = 256 * 1024**2  # aiohttp's default (1 MB) is below a long chat or an image
# hop-by-hop headers (RFC 9110 7.6.1) and the length, which the router recomputes
NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def key_from_environment() -> str:
    """The key to require. Raises RuntimeError when it is unset: never serve open by mistake."""
    key = os.environ.get(KEY_VARIABLE, "")
    if not key:
        raise RuntimeError(f"{KEY_VARIABLE} is not set: refusing to serve without a key")
    return key


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: an address other machines cannot reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def authorized(header: str | None, key: str) -> bool:
    """True when an Authorization header value is `Bearer <key>` (compared in constant time)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        hashlib.sha256(given.strip().encode()).digest(), hashlib.sha256(key.encode()).digest()
    )


class RequireKey:
    """ASGI middleware: every HTTP or WebSocket request without the key is refused before routing
    (401 JSON for HTTP; a WebSocket is closed with policy violation 1008, which servers answer
    with 403). Lifespan events pass."""

    def __init__(self, app) -> None:
        self.app = app
        self.key = key_from_environment()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"").decode("latin-1")
            if not authorized(header, self.key):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = json.dumps(UNAUTHORIZED).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


# --- the router in front of several vLLMs ---


def model_of(body: bytes) -> str | None:
    """The `model` field of a JSON request body, or None."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def error(status: int, message: str, kind: str):
    """An OpenAI-style error answer."""
    from aiohttp import web

    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def make_router(routes: dict[str, str], key: str | None):
    """The aiohttp app: key check, then `GET /v1/models` (every model), `GET /health` (every
    vLLM healthy), and any request whose JSON body names a served `model` goes to that vLLM."""
    from aiohttp import ClientError, ClientSession, ClientTimeout, web

    async def forward(request, name: str, body: bytes):
        headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
        session: ClientSession = request.app["session"]
        answer = None
        try:
            async with session.request(
                request.method, routes[name] + request.rel_url.raw_path_qs, data=body, headers=headers
            ) as upstream:
                answer = web.StreamResponse(
                    status=upstream.status,
                    headers={k: v for k, v in upstream.headers.items() if k.lower() not in NOT_FORWARDED},
                )
                await answer.prepare(request)
                async for chunk in upstream.content.iter_any():  # streamed tokens go out as they come
                    await answer.write(chunk)
                await answer.write_eof()
                return answer
        except ClientError:
            if answer is not None:  # the answer had begun: all that is left is to drop the connection
                raise
            return error(502, f"the vLLM serving `{name}` did not answer", "BadGateway")

    async def fetch(request, url: str, read_json: bool = False) -> tuple[int | None, Any]:
        """Status (None: no answer) and, when asked, the JSON body of a GET with the caller's key."""
        session: ClientSession = request.app["session"]
        auth = {"Authorization": request.headers["Authorization"]} if key else {}
        try:
            async with session.get(url, headers=auth) as r:
                return r.status, (await r.json(content_type=None) if read_json and r.status == 200 else None)
        except (ClientError, ValueError):
            return None, None

    async def handle(request):
        if key is not None and not authorized(request.headers.get("Authorization"), key):
            return web.json_response(UNAUTHORIZED, status=401, headers={"WWW-Authenticate": "Bearer"})
        if request.method == "GET" and request.path == "/v1/models":
            listed = [await fetch(request, base + "/v1/models", read_json=True) for base in routes.values()]
            if any(status != 200 for status, _ in listed):
                return error(502, "a vLLM behind the router did not list its model", "BadGateway")
            return web.json_response({"object": "list", "data": [m for _, d in listed for m in d["data"]]})
        if request.method == "GET" and request.path == "/health":
            statuses = [(await fetch(request, base + "/health"))[0] for base in routes.values()]
            return web.Response(status=200 if all(s == 200 for s in statuses) else 503)
        body = await request.read()
        name = model_of(body)
        if not body:
            return error(
                404,
                "the router answers GET /v1/models, GET /health and requests whose JSON body names a `model`",
                "NotFoundError",
            )
        if name is None:
            return error(400, f"name the model in the JSON body's `model`: one of {sorted(routes)}", "BadRequestError")
        if name not in routes:
            return error(
                404, f"The model `{name[:200]}` does not exist: this endpoint serves {sorted(routes)}", "NotFoundError"
            )
        return await forward(request, name, body)

    async def session_context(app):
        app["session"] = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10), auto_decompress=False)
        yield
        await app["session"].close()

    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lrmerge_hub.serve.gate", description="Route OpenAI requests to one vLLM per model, by `model`."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--route",
        action="append",
        required=True,
        metavar="NAME=URL",
        help="A served name and its vLLM's base URL (http://127.0.0.1:PORT); repeat.",
    )
    parser.add_argument(
        "--no-key",
        action="store_true",
        help="Serve without a key (loopback binds only: refused with any other --host).",
    )
    args = parser.parse_args(argv)
    routes = dict(r.rpartition("=")[::2] for r in args.route)
    if args.no_key and not is_loopback(args.host):
        print(
            f"Error: --no-key with --host {args.host[:60]} would serve every route to other machines "
            f"without a key: set {KEY_VARIABLE} instead, or bind 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    if not args.no_key and not os.environ.get(KEY_VARIABLE):
        print(
            f"Error: {KEY_VARIABLE} is not set: set it to the key every request must send "
            "(or pass --no-key on a loopback bind)",
            file=sys.stderr,
        )
        return 2
    key = None if args.no_key else key_from_environment()
    from aiohttp import web

    web.run_app(
        make_router(routes, key), host=args.host, port=args.port, print=None, access_log=None, handle_signals=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
