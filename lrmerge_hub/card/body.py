"""The values the card template renders (pure): summary words, tables and links.

Every string that comes from a file (names, ids, revisions, task names, commands) is
escaped here for the place it lands: Markdown text or a table cell (`md_text`), a code
span (`code_span`), a Python string literal (`py_string`), a shell word (`shell_word`), or
a fenced block whose fence is longer than any backtick run inside (`fence_for`). Links
are made only to ids that match the Hub's rules. The YAML metadata is written by
huggingface_hub's YAML dumper, which quotes what needs it.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from .inputs import CardInputs, SourceInfo, languages_of, recipe_license, resolve_license
from ..metadata import HUB_ID_PART, is_repo_id, language_name
from ..errors import shown
from .eval_results import MERGED, Score
from ..merge.methods import METHODS, PAPERS

# Characters that can start Markdown syntax inside a line: emphasis, code, links and images
# (no `[`, so `(`, `)` and `!` stay plain), HTML, entities, strikethrough, table cells; `_` only
# where it can open or close emphasis (between two letters or digits it cannot: acc_norm).
MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]<>#|~&]|(?<![^\W_])_|_(?![^\W_])")
AUTOLINK_BAIT = re.compile(r"://|www\.|@", re.IGNORECASE)  # what GitHub-flavoured Markdown links by itself
DATASET_ID = re.compile(rf"(?:{HUB_ID_PART}/)?{HUB_ID_PART}")


def _one_line(value: Any) -> str:
    """A value as one line of text: line breaks and other control characters become spaces."""
    text = value if isinstance(value, str) else _value(value)
    return re.sub(r"[\x00-\x1f\x7f\u2028\u2029]+", " ", text)


def code_span(value: Any, *, in_table: bool = False) -> str:
    """An inline code span showing `value` literally: the backtick fence is longer than any
    backtick run inside, and in a table a `|` is escaped (GFM splits cells on it even there)."""
    text = _one_line(value)
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    if text.startswith("`") or text.endswith("`") or not text.strip():
        text = f" {text} "
    if in_table:
        text = text.replace("|", "\\|")
    return f"{ticks}{text}{ticks}"


def md_text(value: Any, *, in_table: bool = False) -> str:
    """`value` as literal Markdown text (also safe in a table cell): every character that
    could start emphasis, a link, an image, HTML or a cell break is backslash-escaped; text
    that GitHub-flavoured Markdown would turn into a link by itself is shown as code."""
    text = _one_line(value)
    if AUTOLINK_BAIT.search(text):
        return code_span(text, in_table=in_table)
    return MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def py_string(value: str) -> str:
    """A Python string literal that evaluates to `value` (JSON's escapes are Python's);
    backticks are escaped too, so it cannot close a Markdown code fence."""
    return json.dumps(value).replace("`", "\\x60")


def shell_word(value: str) -> str:
    """`value` as one shell word (quoted when it needs it)."""
    return shlex.quote(value)


def fence_for(*blocks: str) -> str:
    """A code fence longer than any backtick run in the blocks it encloses (at least ```)."""
    longest = max((len(run) for block in blocks for run in re.findall(r"`+", block)), default=0)
    return "`" * max(3, longest + 1)


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
    """The source's Hub page as a link; a name that is not a Hub id is shown as code."""
    if is_repo_id(s.repo_id):
        return f"[{md_text(s.repo_id)}]({HUB}/{s.repo_id})"
    if is_repo_id(s.hub_id):
        return f"[{md_text(s.hub_id)}]({HUB}/{s.hub_id}) (merged from a local copy)"
    return f"{code_span(s.name, in_table=True)} (a local model, not on the Hub)"


def _revision(s: SourceInfo) -> str:
    if not s.repo_id:
        return "local files"
    if not s.revision:
        return "not pinned"
    if is_repo_id(s.repo_id) and isinstance(s.revision, str) and re.fullmatch(r"[0-9a-f]{40}", s.revision):
        return f"[`{s.revision[:12]}`]({HUB}/{s.repo_id}/tree/{s.revision})"
    return code_span(s.revision, in_table=True)


def mergekit_config_yaml(config: Any) -> str:
    """The report's mergekit config as YAML for the card ('' when the merge has none)."""
    if not isinstance(config, dict) or not config:
        return ""
    import yaml

    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip("\n")


def _value(v: Any) -> str:
    """A parameter value as the recipe YAML writes it (true, not True); anything but a
    string or a number is shown briefly."""
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (str, float)) or isinstance(v, int) and v.bit_length() <= 64:
        return str(v)
    return shown(v)


def _is_number(n: Any) -> bool:
    return isinstance(n, (int, float)) and not isinstance(n, bool)


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "?"


def _percent(part: Any, whole: Any) -> str:
    if not (_is_number(part) and _is_number(whole)) or not whole:
        return "?"
    try:
        return f"{100 * part / whole:.1f}%"
    except OverflowError:
        return "?"


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    """A sub-mapping of the merge report; {} when it is absent or not a mapping."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


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
        cells = [
            code_span(s.task, in_table=True),
            md_text(s.label, in_table=True),
            "–" if s.n_shot is None else md_text(s.n_shot, in_table=True),
            f"**{_format_score(s)}**",
        ]
        cells += [_format_score(by_key.get((k, s.task, s.label))) for k in baseline_keys]
        rows.append(cells)
    header = ["Task", "Metric", "Shots", "This model"] + [
        md_text(baseline_label(k, sources), in_table=True) for k in baseline_keys
    ]
    return {"header": header, "rows": rows}


def sweep_section(table: Any, limit: int = 20) -> tuple[str, str] | None:
    """An extra section for `sweep.json` (written by `lrmerge sweep`): the ranked grid points."""
    if not isinstance(table, dict) or not isinstance(table.get("points"), list) or not table["points"]:
        return None
    points = [p for p in table["points"] if isinstance(p, dict)][:limit]
    metric = table.get("metric") or "score"
    models = list(dict.fromkeys(m for p in points for m in _mapping(p, "retention")))
    lines = [
        f"The parameters above were chosen by a sweep over {len(table['points'])} grid points, ranked by "
        f"{code_span(metric)}; this model is the best point, {code_span(table.get('best'))}.",
        "",
        (
            "| Point | "
            + md_text(metric, in_table=True)
            + "".join(f" | Retention of {md_text(m, in_table=True)}" for m in models)
            + " |"
        ),
        "|---|---|" + "---|" * len(models),
    ]
    for p in points:
        score = p.get("score")
        cells = [code_span(p.get("name"), in_table=True), f"{score:.4f}" if _is_number(score) else "–"]
        cells += [_percent(_mapping(p, "retention").get(m), 1) for m in models]
        lines.append("| " + " | ".join(cells) + " |")
    if len(table["points"]) > limit:
        lines.append(f"\n({len(table['points']) - limit} more points in `sweep.json`.)")
    return "Parameter sweep", "\n".join(lines)


def _dataset_link(task: str, dataset: str) -> str:
    link = f"[{md_text(dataset)}]({HUB}/datasets/{dataset})" if DATASET_ID.fullmatch(dataset) else code_span(dataset)
    return f"{code_span(task)}: {link}"


def card_context(inputs: CardInputs, *, model_name: str, model_id: str) -> dict[str, Any]:
    """The values the Jinja template renders (pure), each escaped for where it lands."""
    recipe, report, sources = inputs.recipe, inputs.report, inputs.sources
    codes = languages_of(recipe, report)
    names = [f"{language_name(c)} (`{c}`)" for c in codes]
    plain_names = [language_name(c) for c in codes]
    method = str(report.get("method") or recipe.get("method") or "slack_ties")
    license_, license_note = resolve_license(recipe_license(recipe, report), sources)
    roles = {role: [s for s in sources if s.role == role] for role in ("base", "language", "task")}
    merged_scores = [s for s in inputs.scores if s.model == MERGED]
    vocab = _mapping(report, "vocab")
    rows = {key: r if isinstance(r := vocab.get(key), int) else 0 for key in ("output_rows", "base_rows")}
    dates = sorted({s.date for s in merged_scores})
    versions = sorted({s.lm_eval_version for s in merged_scores if s.lm_eval_version})
    commands = list(
        dict.fromkeys(
            f"python {s.command}" if s.command.startswith("-m ") else s.command for s in merged_scores if s.command
        )
    )
    recipe_yaml = inputs.recipe_text.rstrip("\n")
    mergekit_yaml = mergekit_config_yaml(report.get("mergekit_config"))
    usage = {
        "model_id_py": py_string(model_id),
        "model_id_sh": shell_word(model_id),
        "model_name_sh": shell_word(model_name),
        "curl_chat": shell_word(
            json.dumps({"model": model_name, "messages": [{"role": "user", "content": "..."}], "max_tokens": 256})
        ),
        "curl_completion": shell_word(json.dumps({"model": model_name, "prompt": "...", "max_tokens": 256})),
    }

    def listed(role: str) -> str:
        return _join([code_span(s.listed_id or s.name) for s in roles[role]]) if roles[role] else ""

    return {
        "model_name": md_text(model_name),
        **usage,
        "fence": fence_for(recipe_yaml, mergekit_yaml, *commands, *usage.values()),
        "languages": names,
        "language_list": _join(names) if names else "",
        "language_plain": _join(plain_names) if plain_names else "the target language",
        "language_or": _join(plain_names, "or") if plain_names else "the target language",
        "language_count": len(roles["language"]),
        "merged_count": len(roles["language"]) + len(roles["task"]),
        "size": _size(_mapping(report, "stats").get("parameters")),
        "method": method,
        "method_name": md_text(METHODS[method].title if method in METHODS else method),
        "method_summary": md_text(METHODS[method].doc) if method in METHODS else "",
        "papers": method_papers(method),
        "parameters": [code_span(f"{k}={_value(v)}") for k, v in _mapping(report, "parameters").items()],
        "base": roles["base"],
        "base_text": listed("base"),
        "language_text": listed("language"),
        "task_text": listed("task"),
        "sources": [
            {
                "role": md_text(s.role, in_table=True),
                "link": _model_link(s),
                "revision": _revision(s),
                "params": md_text(", ".join(f"{k}={_value(v)}" for k, v in s.params.items()) or "–", in_table=True),
                "license": md_text(s.license.label, in_table=True) if s.license else "not stated",
            }
            for s in sources
        ],
        "retention": [
            {
                "role": md_text(s.role, in_table=True),
                "name": md_text(s.listed_id or s.name, in_table=True),
                "kept": f"{_count(s.retention.get('kept'))} of {_count(s.retention.get('total'))} "
                f"({_percent(s.retention.get('kept'), s.retention.get('total'))})",
                "agreed": f"{_count(s.retention.get('agreed'))} "
                f"({_percent(s.retention.get('agreed'), s.retention.get('kept'))} of kept)",
            }
            for s in sources
            if isinstance(s.retention, dict)
        ],
        "license": code_span(license_.label) if license_ else None,
        "license_note": license_note,
        "evaluation": evaluation_table(inputs.scores, sources),
        "eval_dates": [md_text(d) for d in dates],
        "lm_eval_versions": [md_text(v) for v in versions],
        "eval_limit": _limit_words(sorted({s.limit for s in merged_scores if s.limit is not None})),
        "eval_commands": commands,
        "eval_checks": [md_text(c) for c in dict.fromkeys(s.check for s in merged_scores if s.check)],
        "eval_datasets": [
            _dataset_link(task, ds)
            for task, ds in sorted({(s.task, s.dataset_id) for s in merged_scores if s.dataset_id})
        ],
        "has_chat_template": inputs.has_chat_template,
        "vocab_added": rows["output_rows"] - rows["base_rows"],
        "tokenizer_source": code_span(report["tokenizer_source"]) if report.get("tokenizer_source") else None,
        "dtype": code_span(report["dtype"]) if report.get("dtype") else None,
        "tool_version": md_text(_mapping(report, "tool").get("version", "?")),
        "created_at": md_text(report.get("created_at", "?")),
        "recipe_sha256": code_span(report.get("recipe_sha256", "?")),
        "recipe_yaml": recipe_yaml,
        "mergekit_yaml": mergekit_yaml,
        "extra_sections": inputs.extra_sections + [s for s in [sweep_section(inputs.sweep)] if s],
    }
