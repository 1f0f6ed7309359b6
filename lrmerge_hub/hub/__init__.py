"""The Hugging Face Hub: read models (`sources`: pin, check from headers, download or stream by
ranges through `stream`) and write them (`publish`: one commit, a pull request, a tag).

Owns every call to `huggingface_hub` and every request to the Hub. May import `recipe`,
`merge` (plans and safetensors I/O), `metadata`, `errors` and `settings`; nothing above it.
`hosts` checks, before any request, that a token goes to the Hub's own hosts only.
"""

from . import hosts
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

hosts.install()  # before any request: the client's answers are checked for other hosts

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
