"""Fake merged output folders for the card tests: recipe.yaml, merge_report.json and
lm-eval results files, no weights (the card reads nothing else)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

BASE = "meta-llama/Llama-2-7b-hf"
TASK = "pkupie/Llama-2-7b-FLAN-step884"
LANGUAGE_MODELS = {"bo": "pkupie/Llama-2-7b-bod", "ug": "pkupie/Llama-2-7b-uig", "mn": "pkupie/Llama-2-7b-mon"}
SHA = {
    BASE: "01c7f73d771dfac7d292323805ebc428287df4f9",
    TASK: "5b0a2f5b3c3e1bd2f1c0c7cc1f26a8b5bd2d6b30",
    LANGUAGE_MODELS["bo"]: "9d2f3b4c5a6e7f8091a2b3c4d5e6f708192a3b4c",
    LANGUAGE_MODELS["ug"]: "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d",
    LANGUAGE_MODELS["mn"]: "2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e",
}
RECIPE_SHA = "3f1c9a0e5b7d2c4a6e8f0b1d3c5a7e9f1b3d5c7a9e1f3b5d7c9a1e3f5b7d9c1a"


def recipe_dict(
    languages: list[str], *, license_: Any = None, local_task: str | None = None, hub_id: str | None = None
) -> dict[str, Any]:
    """A normalized recipe as `Recipe.to_dict()` writes it."""
    models: list[dict[str, Any]] = [
        {
            "model": LANGUAGE_MODELS.get(code, f"pkupie/Llama-2-7b-{code}"),
            "role": "language",
            "weight": 1.0,
            "density": 0.2,
            "slack": 0.0,
        }
        for code in languages
    ]
    task: dict[str, Any] = {"model": local_task or TASK, "role": "task", "weight": 1.0, "density": 0.2, "slack": 0.5}
    if hub_id:
        params = {k: task[k] for k in ("weight", "density", "slack")}
        task = {"model": task["model"], "role": "task", "hub_id": hub_id, **params}
    models.append(task)
    recipe: dict[str, Any] = {
        "method": "slack_ties",
        "base": BASE,
        "models": models,
        "parameters": {"lambda": 1.0, "normalize": True},
        "languages": list(languages),
    }
    if isinstance(license_, dict):
        recipe.update(license_)
    elif license_:
        recipe["license"] = license_
    recipe["dtype"] = "bfloat16"
    return recipe


def report_dict(recipe: dict[str, Any], *, licenses: dict[str, Any] | None = None) -> dict[str, Any]:
    """A merge_report.json for the recipe, as the engine writes it (see notes/contracts.md)."""
    licenses = licenses or {}

    def entry(name: str) -> dict[str, Any]:
        is_hub = "/" in name
        out = {"model": name, "repo_id": name if is_hub else None, "revision": SHA.get(name) if is_hub else None}
        if name in licenses:
            out["license"] = licenses[name]
        return out

    models = []
    for i, m in enumerate(recipe["models"]):
        e = entry(m["model"])
        e.update(
            {
                "hub_id": m.get("hub_id"),
                "role": m["role"],
                "params": {k: m[k] for k in ("weight", "density", "slack")},
                "retention": {
                    "total": 6738415616,
                    "kept": 1347683123,
                    "agreed": 1000000000 - i * 150000000,
                    "fraction": round((1000000000 - i * 150000000) / 1347683123, 4),
                },
            }
        )
        models.append(e)
    return {
        "tool": {"name": "lrmerge-hub", "version": "0.1.0"},
        "created_at": "2026-11-25T03:30:00Z",
        "recipe_sha256": RECIPE_SHA,
        "method": recipe["method"],
        "parameters": recipe["parameters"],
        "dtype": "bfloat16",
        "languages": recipe["languages"],
        "license": recipe.get("license"),
        "base": entry(recipe["base"]),
        "models": models,
        "tokenizer_source": recipe["models"][0]["model"],
        "vocab": {"base_rows": 32000, "output_rows": 32000},
        "stats": {
            "tensors": 291,
            "parameters": 6738415616,
            "bytes_read": 0,
            "bytes_written": 0,
            "seconds": 0.0,
            "peak_rss_bytes": 0,
            "device": "cpu",
        },
    }


def make_merged_folder(
    root: Path,
    languages: list[str],
    *,
    name: str = "llama2-merged",
    license_: Any = None,
    licenses: dict[str, Any] | None = None,
    local_task: str | None = None,
    hub_id: str | None = None,
    chat_template: bool = True,
) -> Path:
    """A merged output folder with recipe.yaml and merge_report.json (no weights)."""
    out = root / name
    out.mkdir(parents=True)
    recipe = recipe_dict(languages, license_=license_, local_task=local_task, hub_id=hub_id)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    (out / "merge_report.json").write_text(json.dumps(report_dict(recipe, licenses=licenses), indent=2))
    tokenizer_config = {"tokenizer_class": "LlamaTokenizer"}
    if chat_template:
        tokenizer_config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return out


def lm_eval_results(
    task: str,
    metrics: dict[str, float],
    *,
    date: float = 1795577400.0,
    dataset_path: str = "facebook/belebele",
    dataset_name: str | None = "bod_Tibt",
    n_shot: int = 0,
    model_args: str = "model=merged,base_url=http://127.0.0.1:8000/v1/completions",
) -> dict[str, Any]:
    """An lm-eval 0.4 results JSON for one task, with the keys lm-eval writes."""
    result: dict[str, Any] = {"alias": task}
    for metric, value in metrics.items():
        result[f"{metric},none"] = value
        result[f"{metric}_stderr,none"] = 0.0123
    return {
        "results": {task: result},
        "group_subtasks": {task: []},
        "configs": {
            task: {
                "task": task,
                "dataset_path": dataset_path,
                "dataset_name": dataset_name,
                "test_split": "test",
                "num_fewshot": n_shot,
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
            }
        },
        "versions": {task: 0.0},
        "n-shot": {task: n_shot},
        "higher_is_better": {task: {m: True for m in metrics}},
        "n-samples": {task: {"original": 900, "effective": 900}},
        "config": {"model": "local-completions", "model_args": model_args, "batch_size": 1},
        "git_hash": None,
        "date": date,
        "lm_eval_version": "0.4.13",
        "model_name": "merged",
        "model_name_sanitized": "merged",
    }


def write_results(
    model_dir: Path, data: dict[str, Any], *, under: str = "merged", stamp: str = "2026-11-25T03-30-00.000000"
) -> Path:
    """Write results the way `lm-eval --output_path eval/...` lays them out."""
    path = model_dir / "eval" / under / f"results_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
