"""The Hugging Face Hub: read models (`sources`: pin, check from headers, download or stream by
ranges through `stream`) and write them (`publish`: one commit, a pull request, a tag).

Owns every call to `huggingface_hub` and every request to the Hub. May import `recipe`,
`merge` (plans and safetensors I/O), `metadata`, `errors` and `settings`; nothing above it.
`hosts` checks, before any request, that a token goes to the Hub's own hosts only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import hub_errors
    from .publish import PushResult, ShardUploader, push
    from .sources import (
        ModelMeta,
        PullPlan,
        download,
        materialize_sources,
        model_meta,
        plan_recipe,
        pull,
        stream_sources,
        targets_to_recipe,
    )

# name -> the module that defines it. Imported on first use: a local merge never loads
# huggingface_hub and httpx (half a second of every command's start-up); each module that
# makes requests installs the host checks (hosts.install) when it is imported
_HOME = {
    "hub_errors": "errors",
    "PushResult": "publish",
    "ShardUploader": "publish",
    "push": "publish",
    **{
        name: "sources"
        for name in (
            "ModelMeta",
            "PullPlan",
            "download",
            "materialize_sources",
            "model_meta",
            "plan_recipe",
            "pull",
            "stream_sources",
            "targets_to_recipe",
        )
    },
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


__all__ = [
    "ModelMeta",
    "PullPlan",
    "PushResult",
    "ShardUploader",
    "download",
    "hub_errors",
    "materialize_sources",
    "model_meta",
    "plan_recipe",
    "pull",
    "push",
    "stream_sources",
    "targets_to_recipe",
]
