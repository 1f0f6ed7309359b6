"""Check that a served model computes what transformers computes on the same folder.

A few fixed prompts (chat-templated when the tokenizer has a chat template, and plain) are
tokenized here; transformers generates greedily from the token ids on the CPU in float32
(the reference: no bf16 kernel of ours or vLLM's in it) and records, at each position, the
gap between its two highest logits. The served model is asked for the same token ids
through `/v1/completions` (greedy, `ignore_eos`, `return_token_ids`). The served tokens must
equal the reference's at every position, except where the reference's top two logits are
within NEAR_TIE of each other: there a bf16 kernel may honestly pick either. After such a
near-tie flip the server is asked again from the prompt plus the reference's tokens so far
(teacher forcing), so the rest is still checked. Any other difference is a failure: the
error names the prompt and the position.

The reference runs in a child process before the server starts (`reference_tokens`), so the
model is never held twice in memory by this check; when the float32 copy would not fit in
the memory available, the check is skipped with the reason (a 70B model needs 280 GB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import LrmergeError
from ..settings import parity_answer_timeout
from .http import http_json

NEAR_TIE = 0.5  # logits: top-2 gap below which either token is an honest greedy pick in bf16
NEW_TOKENS = 16
CHAT_PROMPTS = ("What is the capital of France?", "Name three colors.")
PLAIN_PROMPTS = ("The capital of France is", "def add(a, b):\n    return")
MEMORY_SHARE = 0.5  # the float32 copy may use at most this share of the memory available


class ParityError(LrmergeError):
    """The served model's greedy tokens differ from transformers' on the same folder."""


@dataclass
class Reference:
    """transformers' greedy continuation of one prompt."""

    name: str  # e.g. 'chat: What is the capital of France?'
    prompt_ids: list[int]
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logit at each generated position


@dataclass
class ParityResult:
    """What the check did; `summary` is the sentence for the card and the results."""

    status: str  # "passed" | "skipped" | "disabled"
    prompts: int = 0
    chat: bool = False
    near_ties: int = 0
    reason: str = ""
    seconds: float = 0.0
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def summary(self) -> str:
        if self.status == "disabled":
            return "served outputs not checked against transformers (--no-parity-check)"
        if self.status == "skipped":
            return f"served outputs not checked against transformers: {self.reason}"
        kinds = "chat-templated and plain" if self.chat else "plain only (no chat template)"
        ties = (
            f", except {self.near_ties} near-tie(s) (top-2 logits within {NEAR_TIE}), "
            "checked on from transformers' token"
            if self.near_ties
            else ""
        )
        return (
            f"served outputs checked against transformers: {self.prompts} prompts ({kinds}), "
            f"same greedy tokens for {NEW_TOKENS} tokens{ties}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "summary": self.summary,
            "prompts": self.prompts,
            "chat_template": self.chat,
            "near_tie_logits": NEAR_TIE,
            "new_tokens": NEW_TOKENS,
            "near_ties": self.near_ties,
            "reason": self.reason,
            "seconds": round(self.seconds, 1),
        }


def float32_bytes(folder: Path) -> int | None:
    """Bytes the weights take in float32, from the safetensors headers (None if unknown)."""
    from ..merge.st_io import read_header

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    try:
        return sum(4 * stored.spec.numel for f in files for stored in read_header(f)[0].values())
    except LrmergeError:  # a corrupt header: serve's own checks say so; the check cannot size it
        return None


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def skip_reason(folder: Path) -> str | None:
    """Why the reference cannot run here, or None when it can."""
    need, have = float32_bytes(folder), available_memory()
    if need is not None and have is not None and need > MEMORY_SHARE * have:
        return (
            f"the float32 reference needs {need / 1e9:.1f} GB, more than half of the "
            f"{have / 1e9:.1f} GB available (the served copy is not loaded twice)"
        )
    return None


def _compute(folder: str) -> list[dict[str, Any]]:
    """In the child process: tokenize the prompts and generate greedily in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    prompts: list[tuple[str, list[int]]] = []
    if getattr(tokenizer, "chat_template", None):
        for text in CHAT_PROMPTS:
            encoded: Any = tokenizer.apply_chat_template(  # a BatchEncoding (return_dict); its stub says str too
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
            )
            prompts.append((f"chat: {text}", list(encoded["input_ids"])))
    for text in PLAIN_PROMPTS:
        prompts.append((f"plain: {text!r}", tokenizer(text)["input_ids"]))
    out = []
    with torch.no_grad():
        for name, ids in prompts:
            tokens, gaps = [], []
            past, step = None, torch.tensor([ids])
            for _ in range(NEW_TOKENS):
                result = model(input_ids=step, past_key_values=past, use_cache=True)
                past = result.past_key_values
                logits = result.logits[0, -1].float()
                top = torch.topk(logits, 2)
                tokens.append(int(top.indices[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                step = top.indices[:1].view(1, 1)
            out.append({"name": name, "prompt_ids": ids, "tokens": tokens, "gaps": gaps})
    return out


def reference_tokens(folder: Path, *, timeout: float = 1800.0) -> list[Reference]:
    """transformers' greedy tokens on the fixed prompts, computed in a child process (its
    memory is returned before anything else loads the model). Raises ParityError when
    transformers cannot load the folder."""
    package_root = str(Path(__file__).resolve().parent.parent)  # this copy of lrmerge_hub, from any cwd
    env = {
        **os.environ,
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "lrmerge_hub.serve.parity", str(folder)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1][:200] if lines else f"exit status {done.returncode}"
        raise ParityError(
            f"parity check: transformers cannot load {folder.name} ({last}); "
            f"fix the folder, or pass --no-parity-check to serve it unchecked"
        )
    return [Reference(**r) for r in json.loads(done.stdout.strip().splitlines()[-1])]


def served_tokens(
    base_url: str,
    model: str,
    prompt_ids: list[int],
    headers: dict[str, str],
    max_tokens: int = NEW_TOKENS,
    timeout: float | None = None,
) -> list[int]:
    """The served model's greedy tokens for `prompt_ids` (vLLM's `return_token_ids`)."""
    timeout = timeout or parity_answer_timeout()
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "skip_special_tokens": False,
    }
    reply = http_json(f"{base_url.rstrip('/')}/completions", headers, body, timeout=timeout)
    choice = reply["choices"][0]
    if not isinstance(choice.get("token_ids"), list):
        raise ParityError(
            f"parity check: the server at {base_url} returns no token_ids for {model} "
            f"(not vLLM?): pass --no-parity-check to accept its answers unchecked"
        )
    return [int(t) for t in choice["token_ids"]]


@dataclass
class Comparison:
    """One prompt: the first clear difference (None: none), and the near-tie positions where
    the served model picked the other token (the comparison goes on from the reference's)."""

    mismatch: int | None
    served: int | None  # the served token at the mismatch
    flips: list[int]


def compare(ref: Reference, ask: Callable[[list[int], int], list[int]]) -> Comparison:
    """Compare the served continuation with the reference, teacher-forced past near-ties:
    where the served token differs and the reference's top-2 gap is below NEAR_TIE, the
    served model is asked again from the prompt plus the reference's tokens so far, so every
    position is checked and only a near-tie may differ. `ask(ids, n)` returns n served tokens."""
    start = 0
    flips: list[int] = []
    while start < len(ref.tokens):
        served = ask(ref.prompt_ids + ref.tokens[:start], len(ref.tokens) - start)
        for offset, want in enumerate(ref.tokens[start:]):
            pos = start + offset
            got = served[offset] if offset < len(served) else None
            if got == want:
                continue
            if ref.gaps[pos] >= NEAR_TIE or got is None:
                return Comparison(pos, got, flips)
            flips.append(pos)
            start = pos + 1
            break
        else:
            break
    return Comparison(None, None, flips)


def check_served(
    base_url: str,
    model: str,
    refs: list[Reference],
    headers: dict[str, str],
    decode: Callable[[list[int]], str] | None = None,
) -> ParityResult:
    """Compare the served model with the reference. Raises ParityError on a mismatch (and
    when the server does not answer a request within LRMERGE_PARITY_TIMEOUT seconds)."""
    import urllib.error

    started = time.monotonic()
    near_ties, details = 0, []
    for ref in refs:

        def ask(ids: list[int], n: int, ref: Reference = ref) -> list[int]:
            try:
                return served_tokens(base_url, model, ids, headers, max_tokens=n)
            except urllib.error.HTTPError as e:
                raise ParityError(
                    f"parity check: {model} answered HTTP {e.code} to the prompt {ref.name}; see the server's log"
                ) from None
            except (urllib.error.URLError, OSError, TimeoutError, KeyError, IndexError, ValueError) as e:
                raise ParityError(
                    f"parity check: {model} did not answer the prompt {ref.name} within "
                    f"{parity_answer_timeout():.0f} s ({type(e).__name__}); see the server's log, "
                    f"or raise LRMERGE_PARITY_TIMEOUT"
                ) from None

        result = compare(ref, ask)
        if result.mismatch is not None:
            pos, want, got = result.mismatch, ref.tokens[result.mismatch], result.served
            shown = (
                f" (transformers: {decode([want])!r}, served: {decode([got]) if got is not None else None!r})"
                if decode
                else f" (transformers: token {want}, served: token {got})"
            )
            raise ParityError(
                f"parity check: {model} differs from transformers on the prompt {ref.name} at "
                f"generated token {pos}{shown}, where transformers' top-2 logit gap is "
                f"{ref.gaps[pos]:.2f} (a near-tie is < {NEAR_TIE}); serve with other settings "
                f"(docs/serving.md, 'CPU defaults') or pass --no-parity-check"
            )
        near_ties += len(result.flips)
        details.append({"prompt": ref.name, "tokens": len(ref.tokens), "near_tie_flips": result.flips})
    chat = any(r.name.startswith("chat:") for r in refs)
    return ParityResult(
        status="passed",
        prompts=len(refs),
        chat=chat,
        near_ties=near_ties,
        seconds=time.monotonic() - started,
        details=details,
    )


def local_folder(model: str, revision: str | None) -> Path:
    """The folder of a served model: itself, or its Hub snapshot (the files vLLM reads too,
    into the same cache)."""
    if revision is None and Path(model).is_absolute():
        return Path(model)
    from huggingface_hub import snapshot_download

    from ..hub import hosts

    hosts.install()  # before any request: the client's answers are checked for other hosts
    return Path(
        snapshot_download(
            model, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
        )
    )


Prepared = dict  # served name -> list[Reference] to check, or a ParityResult (skipped, disabled)


def prepare(targets: list[Any], enabled: bool, echo: Callable[[str], None] = lambda s: None) -> Prepared:
    """Before any server starts: transformers' reference tokens for each target (a
    serve.ModelTarget), or why there is none. Raises ParityError when transformers cannot
    load a folder (serving it would be unchecked)."""
    prepared: Prepared = {}
    for t in targets:
        if not enabled:
            prepared[t.served_name] = ParityResult(status="disabled")
            continue
        folder = local_folder(t.model, t.revision)
        reason = skip_reason(folder)
        if reason:
            echo(f"Parity check skipped for {t.served_name}: {reason}")
            prepared[t.served_name] = ParityResult(status="skipped", reason=reason)
            continue
        started = time.monotonic()
        prepared[t.served_name] = (reference_tokens(folder), time.monotonic() - started, folder)
    return prepared


def verify(
    workers: dict[str, str], prepared: Prepared, headers: dict[str, str], echo: Callable[[str], None] = lambda s: None
) -> dict[str, ParityResult]:
    """After the servers answer: check each served model (at its own vLLM's base URL).
    Raises ParityError on the first mismatch."""
    results = {}
    for name, item in prepared.items():
        if isinstance(item, ParityResult):
            results[name] = item
            continue
        refs, reference_s, folder = item
        decode = _decoder(folder)
        result = check_served(workers[name], name, refs, headers, decode)
        result.seconds += reference_s
        echo(f"Parity check passed for {name}: {result.summary} ({result.seconds:.0f} s)")
        results[name] = result
    return results


def _decoder(folder: Path) -> Callable[[list[int]], str] | None:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return lambda ids: str(tokenizer.decode(ids))  # one sequence: a str
    except Exception:  # noqa: BLE001 - the error message then shows token ids
        return None


if __name__ == "__main__":  # the child process of reference_tokens
    import logging

    logging.disable(logging.WARNING)
    print(json.dumps(_compute(sys.argv[1])))
