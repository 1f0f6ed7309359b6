"""The release path's push against Hubs that answer differently from huggingface.co: regular
upload mode for shards, a commit whose answer is lost after it landed, and LFS answers that name
another host (the token must never go there); the client against tests/hub_server.py."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import pytest
from click.testing import CliRunner

from lrmerge_hub.hub import hosts as hub_hosts
from lrmerge_hub.cli import main
from lrmerge_hub.errors import HubUntrustedHostError
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
def test_a_landed_commit_whose_answer_was_lost_is_recognised_with_preuploaded_shards(
    hub_server, hub_family, local_merge
):
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


class Spoof:
    """Another host (127.0.0.2): records every request and its Authorization header, answers 200."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []
        spoof = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                spoof.requests.append((self.command, self.path, self.headers.get("Authorization")))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_POST = do_PUT = do_GET = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def spoof():
    server = Spoof()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("step", ["verify", "upload"])
def test_lfs_answers_naming_another_host_get_neither_the_token_nor_the_bytes(hub_server, hub_family, spoof, step):
    hub_family.write_text(hub_family.read_text() + "push: {repo: alice/merged}\n")
    if step == "verify":  # the client POSTs the verify step with the token
        hub_server.lfs_verify_href = f"{spoof.url}/alice/merged.git/info/lfs/objects/verify"
    else:
        hub_server.lfs_upload_href = f"{spoof.url}/storage/{{oid}}"

    result = run(hub_family, *SHARDS)

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "127.0.0.2:" in lines[0], result.output
    assert "Traceback" not in result.output and TOKEN not in result.output
    assert spoof.requests == []  # refused before anything was sent there
    assert not pushed_shards(hub_server) and len(hub_server.repos["alice/merged"].commits) == 1


def test_lrmerge_push_refuses_a_verify_step_on_another_host(hub_server, local_merge, spoof):
    hub_server.lfs_verify_href = f"{spoof.url}/verify"

    result = CliRunner().invoke(
        main, ["push", str(local_merge), "alice/merged", "--format", "quiet"], env={"HF_TOKEN": TOKEN}
    )

    assert (
        result.exit_code == 2
        and "127.0.0.2:" in result.output
        and "only the Hub endpoint gets the token" in result.output
    ), result.output
    assert spoof.requests == [] and len(hub_server.repos["alice/merged"].commits) == 1


def test_no_request_carries_a_push_token_to_another_host(hub_server, spoof):
    from huggingface_hub import get_session

    hub_hosts.protect(TOKEN)

    with pytest.raises(HubUntrustedHostError, match="127.0.0.2"):
        get_session().post(f"{spoof.url}/anything", headers={"authorization": f"Bearer {TOKEN}"})
    get_session().post(f"{spoof.url}/anything", headers={"authorization": "Bearer another-service-token"})

    assert spoof.requests == [("POST", "/anything", "Bearer another-service-token")]  # only the other token left


def test_a_refused_commit_is_not_blamed_on_the_card(hub_server, local_merge):
    hub_server.fail("POST", r"/commit/", status=400)  # e.g. an LFS object the Hub does not hold

    result = CliRunner().invoke(main, ["push", str(local_merge), "alice/merged"], env={"HF_TOKEN": TOKEN})

    assert result.exit_code == 2 and "HTTP 400" in result.output and "nothing was committed" in result.output
    assert "README" not in result.output, result.output


def batch_answer(actions: dict) -> httpx2.Response:
    request = httpx2.Request("POST", "https://huggingface.co/alice/merged.git/info/lfs/objects/batch")
    return httpx2.Response(
        200, json={"transfer": "basic", "objects": [{"oid": "0" * 64, "size": 1, "actions": actions}]}, request=request
    )


def test_huggingface_co_answers_pass_and_other_storage_needs_naming(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.delenv("LRMERGE_HUB_STORAGE_HOSTS", raising=False)
    verify = {"href": "https://huggingface.co/alice/merged.git/info/lfs/objects/verify"}
    s3 = "https://s3.us-east-1.amazonaws.com/lfs.huggingface.co/repos/ab/cd/x?X-Amz-Signature=1"
    multipart = {
        "href": "https://huggingface.co/api/complete_multipart?uploadId=1",
        "header": {"chunk_size": "5", "1": "https://hf-hub-lfs-us-east-1.s3-accelerate.amazonaws.com/p1"},
    }
    for actions in ({"upload": {"href": s3}, "verify": verify}, {"upload": multipart, "verify": verify}):
        hub_hosts.check_batch_answer(batch_answer(actions))  # what huggingface.co answers: accepted

    minio = {"upload": {"href": "http://minio.internal:9000/bucket/x"}, "verify": verify}
    with pytest.raises(HubUntrustedHostError, match="minio.internal:9000.*LRMERGE_HUB_STORAGE_HOSTS"):
        hub_hosts.check_batch_answer(batch_answer(minio))
    monkeypatch.setenv("LRMERGE_HUB_STORAGE_HOSTS", "minio.internal:9000")
    hub_hosts.check_batch_answer(batch_answer(minio))  # a self-hosted Hub's storage, once named
    with pytest.raises(HubUntrustedHostError, match="verify step"):  # the token's step: never elsewhere
        hub_hosts.check_batch_answer(
            batch_answer({"upload": {"href": s3}, "verify": {"href": "http://minio.internal:9000/verify"}})
        )


def test_a_refused_lfs_upload_is_one_line_and_commits_nothing(hub_server, local_merge):
    hub_server.fail("PUT", r"^/lfs-storage/", status=403, times=10)  # the storage refuses the bytes

    result = CliRunner().invoke(main, ["push", str(local_merge), "alice/merged"], env={"HF_TOKEN": TOKEN})

    assert result.exit_code == 2 and "HTTP 403" in result.output, (result.output, result.exception)
    assert len(result.output.strip().splitlines()) == 1 and len(hub_server.repos["alice/merged"].commits) == 1
