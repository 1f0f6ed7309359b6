"""Serving: vLLM's OpenAI-compatible server for one or several merged models (`vllm`), the
router and API-key gate in front of it (`gate`), and the parity check that compares the
served answers with transformers' before any is trusted (`parity`).

May import `metadata`, `errors`, `settings` and `progress`; nothing about merging or cards.
`gate` imports nothing of lrmerge at all: the serving images copy it alone (with this file
and the package's `__init__`), so the names below are imported when first used.
"""

from .. import lazy_attributes

_EXPORTS = {
    "auth_headers": "http",
    "http_json": "http",
    "Endpoint": "vllm",
    "ModelTarget": "vllm",
    "ServeOptions": "vllm",
    "free_port": "vllm",
    "resolve_target": "vllm",
    "serve_until_signal": "vllm",
    "start": "vllm",
    "start_with_signals": "vllm",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
