"""The release path's push against Hubs that answer differently from huggingface.co: regular
upload mode for shards, a commit whose answer is lost after it landed, and LFS answers that name
another host (the token must never go there); the client against tests/hub_server.py."""

from __future__ import annotations

import pytest

from tests.hub_support import TOKEN
from tests.test_stream import family, hub_family, local_merge, run, shard_bytes, tensors_of  # noqa: F401 (fixtures)

SHARDS = ("--shard-size", "200KB")


def pushed_shards(hub_server, revision: str = "main") -> dict[str, bytes]:
    return {f: d for f, d in hub_server.files("alice/merged", revision).items() if f.endswith(".safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize("keep", [True, False], ids=["keep", "no-keep"])
def test_release_pushes_when_the_hub_takes_shards_in_regular_mode(hub_server, hub_family, local_merge, keep):
    hub_family.write_text(hub_family.read_text() + "push: {repo: alice/merged}\n")
    hub_server.regular_uploads = True  # shards travel inside the commit, as mirrors and proxies ask

    result = run(hub_family, *SHARDS, *([] if keep else ["--no-keep"]))

    assert result.exit_code == 0, result.output
    pushed = pushed_shards(hub_server)
    assert len(pushed) >= 3 and tensors_of(pushed) == tensors_of(shard_bytes(local_merge))
    assert not any(r.path.startswith("/lfs-storage/") for r in hub_server.log)  # in the commit, not storage
    assert len(hub_server.repos["alice/merged"].commits) == 2  # the repo's first commit, then ours
    out = hub_family.parent / "out"
    assert shard_bytes(out) == (pushed if keep else {})  # --no-keep: the weights leave once committed
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
