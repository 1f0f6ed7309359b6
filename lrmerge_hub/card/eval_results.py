"""Read lm-eval results JSON files from a merged model's `eval/` folder.

The layout the card expects is described at the top of `card/build.py`. This reader is tolerant:
files it cannot parse, tasks without numeric metrics and stderr entries are skipped, and
the reason is returned as a note instead of failing the card.

Nothing from a results file that could name the machine (`config.model_args`, local
`data_files`, paths) is kept: only task names, Hub dataset ids, metric names and numbers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MERGED = "merged"  # the model key of the merged model's own results
SOURCES_DIR = "sources"  # eval/sources/<role-or-name>/... holds the sources' baselines

# `datasets` builders that read local files: such a dataset_path names no Hub dataset.
LOCAL_BUILDERS = frozenset(
    {
        "json",
        "csv",
        "parquet",
        "text",
        "arrow",
        "pandas",
        "sql",
        "generator",
        "webdataset",
        "imagefolder",
        "audiofolder",
        "videofolder",
    }
)
HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FILE_TIME = re.compile(r"results_(\d{4}-\d{2}-\d{2}T\d{2}[-:]\d{2}[-:]\d{2}(?:\.\d+)?)")


@dataclass(frozen=True)
class Score:
    """One metric of one task for one model, as lm-eval reported it."""

    model: str  # MERGED, or the folder key under eval/sources/
    task: str
    metric: str  # "acc", "acc_norm", "exact_match" (the model-index's metric type)
    filter: str | None  # lm-eval's filter ("strict-match"), None for its "none"
    value: float
    stderr: float | None
    n_shot: int | None
    dataset_id: str | None  # a Hub dataset id, None for local (json/csv) tasks
    dataset_config: str | None
    dataset_split: str | None
    date: str  # ISO 8601, UTC
    lm_eval_version: str | None
    primary: bool  # the task's first metric (the one a one-number summary shows)
    limit: int | float | None = None  # lm-eval's --limit: only that many (or that share of) examples
    command: str | None = None  # the lm-eval command `lrmerge eval` recorded (paths already redacted)
    check: str | None = None  # the parity check of a served model, as `lrmerge eval` recorded it

    @property
    def label(self) -> str:
        """The metric with its filter: "exact_match (strict-match)"."""
        return f"{self.metric} ({self.filter})" if self.filter else self.metric

    def described(self) -> str:
        """The label with the shots: "acc (0-shot)", "exact_match (strict-match, 8-shot)"."""
        details = [d for d in (self.filter, f"{self.n_shot}-shot" if self.n_shot is not None else None) if d]
        return f"{self.metric} ({', '.join(details)})" if details else self.metric


def _hub_dataset_id(path: Any) -> str | None:
    """The Hub id a task's `dataset_path` names, or None for local builders and paths."""
    if not isinstance(path, str) or path in LOCAL_BUILDERS or not HUB_DATASET_ID.match(path):
        return None
    return path


def _file_time(data: dict[str, Any], path: Path) -> float:
    """When the evaluation ran: lm-eval's `date` (unix seconds), else the file name, else mtime."""
    date = data.get("date")
    if isinstance(date, (int, float)) and math.isfinite(date):
        return float(date)
    match = FILE_TIME.search(path.name)
    if match:
        stamp = match.group(1)
        day, _, clock = stamp.partition("T")
        try:
            parsed = datetime.fromisoformat(f"{day}T{clock.replace('-', ':')}")
            return parsed.replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            pass
    return path.stat().st_mtime


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def model_key(eval_dir: Path, path: Path, data: dict[str, Any] | None = None) -> str:
    """Which model a results file belongs to: the role `lrmerge eval` recorded under the
    key `lrmerge`, else the folder under eval/sources/, else MERGED."""
    recorded = (data or {}).get("lrmerge")
    role = recorded.get("role") if isinstance(recorded, dict) else None
    if isinstance(role, str) and role:
        return MERGED if role == MERGED else role
    parts = path.relative_to(eval_dir).parts
    if len(parts) >= 3 and parts[0] == SOURCES_DIR:
        return parts[1]
    return MERGED


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


NOT_METRICS = ("alias", "sample_len")  # lm-eval bookkeeping next to the metrics


def is_metric(name: str) -> bool:
    """Whether a key of lm-eval's `results.<task>` (before the ',filter') is a score."""
    return name not in NOT_METRICS and not name.endswith("_stderr")


def parity_summary(recorded: Any) -> str | None:
    """The one-line summary of the parity check recorded beside a score (lrmerge_hub.serve.parity),
    None when the file has none (hf backend, or results from elsewhere)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("summary"), str):
        return None
    summary = " ".join(recorded["summary"].split())[:300]
    return summary or None


def scores_from_results(data: dict[str, Any], model: str, seconds: float) -> list[Score]:
    """The scores in one parsed lm-eval results JSON (pure)."""
    configs = c if isinstance(c := data.get("configs"), dict) else {}
    n_shots = n if isinstance(n := data.get("n-shot"), dict) else {}
    version = data.get("lm_eval_version") if isinstance(data.get("lm_eval_version"), str) else None
    ours = o if isinstance(o := data.get("lrmerge"), dict) else {}
    config_limit = (data.get("config") or {}).get("limit") if isinstance(data.get("config"), dict) else None
    limit = _number(config_limit if config_limit is not None else ours.get("limit"))
    command = ours.get("command") if isinstance(ours.get("command"), str) else None
    check = parity_summary(ours.get("parity"))
    scores = []
    results = data.get("results")
    for task, metrics in results.items() if isinstance(results, dict) else []:
        if not isinstance(metrics, dict):
            continue
        config = c if isinstance(c := configs.get(task), dict) else {}
        n_shot = n_shots.get(task, config.get("num_fewshot"))
        first = True
        for key, raw in metrics.items():
            name, _, filt = key.partition(",")
            value = _number(raw)
            if value is None or not is_metric(name):
                continue
            stderr = _number(metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr"))
            scores.append(
                Score(
                    model=model,
                    task=task,
                    metric=name,
                    filter=None if filt in ("", "none") else filt,
                    value=value,
                    stderr=stderr,
                    n_shot=n_shot if isinstance(n_shot, int) and not isinstance(n_shot, bool) else None,
                    dataset_id=_hub_dataset_id(config.get("dataset_path")),
                    dataset_config=config.get("dataset_name") if isinstance(config.get("dataset_name"), str) else None,
                    dataset_split=config.get("test_split") if isinstance(config.get("test_split"), str) else None,
                    date=_iso(seconds),
                    lm_eval_version=version,
                    primary=first,
                    limit=(int(limit) if limit is not None and limit.is_integer() else limit),
                    command=command,
                    check=check,
                )
            )
            first = False
    return scores


def read_scores(eval_dir: Path) -> tuple[list[Score], list[str]]:
    """Every score under `eval_dir`, the newest file winning per (model, task); and notes
    on the files that were skipped. A missing folder gives no scores."""
    if not eval_dir.is_dir():
        return [], []
    notes: list[str] = []
    newest: dict[tuple[str, str], tuple[float, list[Score]]] = {}
    for path in sorted(eval_dir.rglob("results_*.json")):
        rel = path.relative_to(eval_dir).as_posix()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            notes.append(f"eval/{rel}: skipped, not readable JSON ({type(e).__name__})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            notes.append(f"eval/{rel}: skipped, no 'results' mapping (not an lm-eval results file)")
            continue
        model = model_key(eval_dir, path, data)
        seconds = _file_time(data, path)
        by_task: dict[str, list[Score]] = {}
        for score in scores_from_results(data, model, seconds):
            by_task.setdefault(score.task, []).append(score)
        for task, task_scores in by_task.items():
            seen = newest.get((model, task))
            if seen is None or seconds >= seen[0]:
                newest[(model, task)] = (seconds, task_scores)
    scores = [
        s
        for _, task_scores in sorted(newest.values(), key=lambda v: (v[1][0].model, v[1][0].task))
        for s in task_scores
    ]
    return scores, notes
