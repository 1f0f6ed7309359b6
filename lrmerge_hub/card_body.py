"""The values the card template renders (pure): summary words, tables and links."""

from __future__ import annotations

import json
import re
from typing import Any

from .card_inputs import CardInputs, SourceInfo, languages_of, recipe_license, resolve_license
from .card_rules import language_name
from .eval_results import MERGED, Score
from .merge.methods import METHODS, PAPERS

HUB = "https://huggingface.co"
LOW_RESOURCE_PAPER = PAPERS["lowres"]


def method_papers(method: str) -> list[tuple[str, str]]:
    """The method's papers from the registry, then Tao et al. (the idea of the project)."""
    known = METHODS.get(method)
    papers = list(known.papers) if known else []
    return papers + ([LOW_RESOURCE_PAPER] if LOW_RESOURCE_PAPER not in papers else [])


def _join(words: list[str], last: str = "and") -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" {last} " + words[-1]


def _model_link(s: SourceInfo) -> str:
    if s.repo_id:
        return f"[{s.repo_id}]({HUB}/{s.repo_id})"
    if s.hub_id:
        return f"[{s.hub_id}]({HUB}/{s.hub_id}) (merged from a local copy)"
    return f"`{s.name}` (a local model, not on the Hub)"


def _revision(s: SourceInfo) -> str:
    if not s.repo_id:
        return "local files"
    if not s.revision:
        return "not pinned"
    if re.fullmatch(r"[0-9a-f]{40}", s.revision):
        return f"[`{s.revision[:12]}`]({HUB}/{s.repo_id}/tree/{s.revision})"
    return f"`{s.revision}`"


def _value(v: Any) -> str:
    """A parameter value as the recipe YAML writes it (true, not True)."""
    return json.dumps(v) if isinstance(v, bool) or v is None else str(v)


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "?"


def _percent(part: Any, whole: Any) -> str:
    return f"{100 * part / whole:.1f}%" if isinstance(part, (int, float)) and whole else "?"


def _size(parameters: Any) -> str:
    if not isinstance(parameters, int) or parameters <= 0:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{unit}-parameter "
    return f"{parameters}-parameter "


def _limit_words(limits: list[float]) -> str:
    """How much of each task was evaluated, in words; "" for all of it."""
    words = [f"{limit:.0%} of the examples" if limit < 1 else f"the first {int(limit)} examples" for limit in limits]
    return " or ".join(words)


def _format_score(s: Score | None) -> str:
    if s is None:
        return "–"
    return f"{s.value:.4f} ± {s.stderr:.4f}" if s.stderr is not None else f"{s.value:.4f}"


def baseline_label(key: str, sources: list[SourceInfo]) -> str:
    """A column title for eval/sources/<key>: the source's role and name when the key names one."""
    by_role = [s for s in sources if s.role == key]
    match = by_role if len(by_role) == 1 else [s for s in sources if key in (s.sanitized, s.name, s.listed_id)]
    if len(match) == 1:
        return f"{match[0].role}: {match[0].listed_id or match[0].name}"
    return key


def evaluation_table(scores: list[Score], sources: list[SourceInfo]) -> dict[str, Any]:
    """Header and rows of the evaluation table: the merged model beside any evaluated sources."""
    baseline_keys = sorted({s.model for s in scores if s.model != MERGED})
    by_key = {(s.model, s.task, s.label): s for s in scores}
    rows = []
    for s in scores:
        if s.model != MERGED:
            continue
        cells = [f"`{s.task}`", s.label, "–" if s.n_shot is None else str(s.n_shot), f"**{_format_score(s)}**"]
        cells += [_format_score(by_key.get((k, s.task, s.label))) for k in baseline_keys]
        rows.append(cells)
    header = ["Task", "Metric", "Shots", "This model"] + [baseline_label(k, sources) for k in baseline_keys]
    return {"header": header, "rows": rows}


def sweep_section(table: Any, limit: int = 20) -> tuple[str, str] | None:
    """An extra section for `sweep.json` (written by `lrmerge sweep`): the ranked grid points."""
    if not isinstance(table, dict) or not isinstance(table.get("points"), list) or not table["points"]:
        return None
    points = [p for p in table["points"] if isinstance(p, dict)][:limit]
    metric = table.get("metric") or "score"
    models = list(dict.fromkeys(m for p in points for m in (p.get("retention") or {})))
    lines = [
        f"The parameters above were chosen by a sweep over {len(table['points'])} grid points, ranked by "
        f"`{metric}`; this model is the best point, `{table.get('best')}`.",
        "",
        "| Point | " + metric + "".join(f" | Retention of {m}" for m in models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for p in points:
        score = p.get("score")
        cells = [f"`{p.get('name')}`", f"{score:.4f}" if isinstance(score, (int, float)) else "–"]
        cells += [_percent((p.get("retention") or {}).get(m), 1) for m in models]
        lines.append("| " + " | ".join(cells) + " |")
    if len(table["points"]) > limit:
        lines.append(f"\n({len(table['points']) - limit} more points in `sweep.json`.)")
    return "Parameter sweep", "\n".join(lines)


def card_context(inputs: CardInputs, *, model_name: str, model_id: str) -> dict[str, Any]:
    """The values the Jinja template renders (pure)."""
    recipe, report, sources = inputs.recipe, inputs.report, inputs.sources
    codes = languages_of(recipe, report)
    names = [f"{language_name(c)} (`{c}`)" for c in codes]
    plain_names = [language_name(c) for c in codes]
    method = str(report.get("method") or recipe.get("method") or "slack_ties")
    license_, license_note = resolve_license(recipe_license(recipe, report), sources)
    roles = {role: [s for s in sources if s.role == role] for role in ("base", "language", "task")}
    merged_scores = [s for s in inputs.scores if s.model == MERGED]
    vocab = report.get("vocab") or {}
    dates = sorted({s.date for s in merged_scores})
    versions = sorted({s.lm_eval_version for s in merged_scores if s.lm_eval_version})
    return {
        "model_name": model_name,
        "model_id": model_id,
        "languages": names,
        "language_list": _join(names) if names else "",
        "language_plain": _join(plain_names) if plain_names else "the target language",
        "language_or": _join(plain_names, "or") if plain_names else "the target language",
        "language_count": len(roles["language"]),
        "merged_count": len(roles["language"]) + len(roles["task"]),
        "size": _size((report.get("stats") or {}).get("parameters")),
        "method": method,
        "method_name": METHODS[method].title if method in METHODS else method,
        "method_summary": METHODS[method].doc if method in METHODS else "",
        "papers": method_papers(method),
        "parameters": {k: _value(v) for k, v in (report.get("parameters") or {}).items()},
        "base": roles["base"],
        "base_text": _join([f"`{s.listed_id or s.name}`" for s in roles["base"]]) if roles["base"] else "",
        "language_text": _join([f"`{s.listed_id or s.name}`" for s in roles["language"]]) if roles["language"] else "",
        "task_text": _join([f"`{s.listed_id or s.name}`" for s in roles["task"]]) if roles["task"] else "",
        "sources": [
            {"role": s.role, "link": _model_link(s), "revision": _revision(s),
             "params": ", ".join(f"{k}={_value(v)}" for k, v in s.params.items()) or "–",
             "license": s.license.label if s.license else "not stated"}
            for s in sources
        ],
        "retention": [
            {"role": s.role, "name": s.listed_id or s.name,
             "kept": f"{_count(s.retention.get('kept'))} of {_count(s.retention.get('total'))} "
                     f"({_percent(s.retention.get('kept'), s.retention.get('total'))})",
             "agreed": f"{_count(s.retention.get('agreed'))} "
                       f"({_percent(s.retention.get('agreed'), s.retention.get('kept'))} of kept)"}
            for s in sources if isinstance(s.retention, dict)
        ],
        "license": license_.label if license_ else None,
        "license_note": license_note,
        "evaluation": evaluation_table(inputs.scores, sources),
        "eval_dates": dates,
        "lm_eval_versions": versions,
        "eval_limit": _limit_words(sorted({s.limit for s in merged_scores if s.limit is not None})),
        "eval_commands": list(dict.fromkeys(f"python {s.command}" if s.command.startswith("-m ") else s.command
                                            for s in merged_scores if s.command)),
        "eval_datasets": sorted({(s.task, s.dataset_id) for s in merged_scores if s.dataset_id}),
        "has_chat_template": inputs.has_chat_template,
        "vocab_added": (vocab.get("output_rows") or 0) - (vocab.get("base_rows") or 0),
        "tokenizer_source": report.get("tokenizer_source"),
        "dtype": report.get("dtype"),
        "tool_version": (report.get("tool") or {}).get("version", "?"),
        "created_at": report.get("created_at", "?"),
        "recipe_sha256": report.get("recipe_sha256", "?"),
        "recipe_yaml": inputs.recipe_text.rstrip("\n"),
        "extra_sections": inputs.extra_sections + [s for s in [sweep_section(inputs.sweep)] if s],
    }
