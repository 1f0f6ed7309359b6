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


@pytest.mark.slow
def test_a_landed_commit_whose_answer_was_lost_is_recognised_with_preuploaded_shards(hub_server, hub_family,
                                                                                     local_merge):
    hub_family.write_text(hub_family.read_text() + "push: {repo: alice/merged}\n")
    hub_server.fail("POST", r"/commit/", status=502, after=True)  # applied, then the answer is lost

    result = run(hub_family, *SHARDS, "--no-keep")

    assert result.exit_code == 0, result.output
    repo = hub_server.repos["alice/merged"]
    assert len(repo.commits) == 2 and sum("/commit/" in r.path for r in hub_server.log) == 1  # made once
    assert tensors_of(pushed_shards(hub_server)) == tensors_of(shard_bytes(local_merge))
    mark = len(hub_server.log)

    again = run(hub_family, *SHARDS, "--no-keep")  # the run is complete: nothing merged or committed again

    assert again.exit_code == 0, again.output
    assert len(repo.commits) == 2 and not any(r.method in ("POST", "PUT") for r in hub_server.log[mark:])


@pytest.mark.slow
def test_a_pull_request_whose_answer_was_lost_is_recognised_not_opened_twice(hub_server, hub_family, local_merge):
    hub_family.write_text(hub_family.read_text() + "push: {repo: alice/merged, create_pr: true}\n")
    hub_server.fail("POST", r"/commit/", status=502, after=True)

    result = run(hub_family, *SHARDS, "--no-keep", "--format", "json")

    assert result.exit_code == 0, result.output
    repo = hub_server.repos["alice/merged"]
    assert len(repo.prs) == 1 and len(repo.commits[repo.branches["main"]].files) == 1  # main: .gitattributes
    assert tensors_of(pushed_shards(hub_server, "refs/pr/1")) == tensors_of(shard_bytes(local_merge))
    assert f"{hub_server.url}/alice/merged/discussions/1" in result.output

    again = run(hub_family, *SHARDS, "--no-keep")

    assert again.exit_code == 0, again.output
    assert len(repo.prs) == 1
