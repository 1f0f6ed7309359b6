"""The Hub's rules for names and model-card metadata, checked offline.

The Hub checks a card's YAML when it is pushed (`POST /api/validate-yaml`); these checks
cover the keys we write so a bad card fails here, before anything is written or pushed:
`language`, `license` (+ `license_name`/`license_link`), `library_name`, `pipeline_tag`,
`base_model`, `base_model_relation`, `tags` and `model-index`.

The recipe, the Hub code, the card and the server all check names with these (a Hub id, a
revision, a language code, a license), so this module sits below all of them.

Language codes are looked up in ISO 639 (1, 2/B, 3 and the 639-5 families) with
`pycountry`, which ships the tables, so no network is needed. License identifiers are the
Hub's list (docs/hub/repositories-licenses.md of huggingface/hub-docs).
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

import pycountry

from .errors import shown

# Values the Hub accepts besides ISO 639 codes.
SPECIAL_LANGUAGES = ("code", "multilingual")

# The Hub's license identifiers (the `license:` values it shows and filters by).
HUB_LICENSES = frozenset(
    """
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0
odc-by odbl openmdw-1.0 openmdw-1.1 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr
deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2
llama3.3 llama4 grok2-community gemma unknown other
""".split()
)

BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
# huggingface_hub's validate_repo_id rules, in ASCII (its regex's \w also takes any Unicode
# letter): 'namespace/name', each 1-96 of [A-Za-z0-9_.-], not starting or ending with '.' or '-',
# no '--' or '..', not ending in '.git'. Checked with fullmatch: `$` would let 'org/name\n' pass.
HUB_ID_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_MODEL_ID = re.compile(rf"{HUB_ID_PART}/{HUB_ID_PART}")
# A branch, tag or commit as the Hub names them (refs/pr/1 included); no '..' (git refuses it,
# and it would climb out of the HF cache's refs/ folder).
HUB_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}")
LICENSE_NAME = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
# Pipeline tags a merged causal LM can carry; others are not ours to write.
PIPELINE_TAGS = ("text-generation", "text2text-generation", "image-text-to-text")


def is_repo_id(value: Any) -> TypeGuard[str]:
    """True for a Hub model id 'namespace/name' that the Hub and huggingface_hub accept."""
    return (
        isinstance(value, str)
        and HUB_MODEL_ID.fullmatch(value) is not None
        and "--" not in value
        and ".." not in value
        and not value.endswith(".git")
    )


def is_revision(value: Any) -> bool:
    """True for a branch, tag or commit name a Hub id may carry after '@'."""
    return (
        isinstance(value, str)
        and HUB_REVISION.fullmatch(value) is not None
        and ".." not in value
        and "//" not in value
        and not value.endswith(("/", ".lock"))
    )


def is_https_url(value: Any) -> bool:
    """True for a plain https URL: a host name and a path of URL characters, nothing that
    Markdown, HTML or YAML would read as syntax (no spaces, quotes, brackets, backticks)."""
    return (
        isinstance(value, str)
        and re.fullmatch(
            r"https://[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?(?:[/?#][A-Za-z0-9._~%!$&*+,;=:@/?#-]*)?",
            value,
        )
        is not None
    )


def _iso639(code: str) -> Any:
    """The pycountry record for an ISO 639 code, or None."""
    if not isinstance(code, str) or not re.fullmatch(r"[a-z]{2,3}", code):
        return None
    if len(code) == 2:
        return pycountry.languages.get(alpha_2=code)
    return (
        pycountry.languages.get(alpha_3=code)
        or pycountry.languages.get(bibliographic=code)
        or pycountry.language_families.get(alpha_3=code)
    )


def is_language_code(code: str) -> bool:
    """True for an ISO 639-1/2/3 (or 639-5 family) code, or a Hub special value."""
    return code in SPECIAL_LANGUAGES or _iso639(code) is not None


def language_name(code: str) -> str:
    """English name of an ISO 639 code ("bo" -> "Tibetan"). Raises KeyError if unknown."""
    record = _iso639(code)
    if record is None:
        raise KeyError(code)
    # "Swahili (macrolanguage)" reads as "Swahili" everywhere people look for it
    return record.name.replace(" (macrolanguage)", "")


def language_tag(code: str) -> str:
    """A Hub tag for a language: its name, lower case, words joined by '-' ("tibetan")."""
    name = re.sub(r"\s*\(.*?\)", "", language_name(code))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _str_list(value: Any) -> list | None:
    """A string or a list of strings as a list; None when it is neither."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return value
    return None


def _check_model_index(index: Any) -> list[str]:
    if not isinstance(index, list) or not index:
        return ["model-index: must be a non-empty list of {name, results}"]
    problems = []
    for i, entry in enumerate(index):
        where = f"model-index[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            problems.append(f"{where}.name: required (a string)")
            continue
        results = entry.get("results")
        if not isinstance(results, list):
            problems.append(f"{where}.results: must be a list")
            continue
        for j, result in enumerate(results):
            rw = f"{where}.results[{j}]"
            if not isinstance(result, dict):
                problems.append(f"{rw}: must be a mapping")
                continue
            task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
            if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                problems.append(f"{rw}.task.type: required (a string)")
            if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                problems.append(f"{rw}.dataset: type and name are required (strings)")
            if not isinstance(metrics, list) or not metrics:
                problems.append(f"{rw}.metrics: must be a non-empty list")
            else:
                for k, metric in enumerate(metrics):
                    ok = (
                        isinstance(metric, dict)
                        and isinstance(metric.get("type"), str)
                        and (
                            isinstance(metric.get("value"), (int, float, str))
                            and not isinstance(metric.get("value"), bool)
                        )
                    )
                    if not ok:
                        problems.append(f"{rw}.metrics[{k}]: type (string) and value (number) are required")
            source = result.get("source")
            if source is not None and not (isinstance(source, dict) and isinstance(source.get("url"), str)):
                problems.append(f"{rw}.source: must be a mapping with a url")
    return problems


def check_metadata(meta: Any) -> list[str]:
    """Problems the Hub would report for the keys lrmerge writes; [] when the metadata passes.

    Keys lrmerge does not write (a user's `datasets`, `widget`, ...) are left to the Hub.
    """
    if not isinstance(meta, dict):
        return ["metadata: the YAML block must be a mapping"]
    problems: list[str] = []

    if "language" in meta:
        codes = _str_list(meta["language"])
        if codes is None:
            problems.append("language: must be an ISO 639 code or a list of them")
        else:
            problems += [f"language: unknown ISO 639 code {shown(c)}" for c in codes if not is_language_code(c)]

    license_ = meta.get("license")
    if "license" in meta and not (isinstance(license_, str) and license_ in HUB_LICENSES):
        problems.append(f"license: {shown(license_)} is not a Hub license id (use one of the Hub's ids, or 'other')")
    if license_ == "other":
        name, link = meta.get("license_name"), meta.get("license_link")
        if not isinstance(name, str) or not LICENSE_NAME.match(name):
            problems.append("license_name: required with license 'other', lower case without spaces (e.g. my-license)")
        if not is_https_url(link):
            problems.append(
                f"license_link: required with license 'other': a plain https:// URL of the license (got {shown(link)})"
            )
    elif "license_name" in meta or "license_link" in meta:
        problems.append("license_name/license_link: only used with license 'other'")

    for key in ("library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f"{key}: must be a string")
    if isinstance(meta.get("pipeline_tag"), str) and meta["pipeline_tag"] not in PIPELINE_TAGS:
        problems.append(f"pipeline_tag: {shown(meta['pipeline_tag'])} is not a text-generation pipeline tag")

    if "base_model" in meta:
        models = _str_list(meta["base_model"])
        if models is None:
            problems.append("base_model: must be a Hub model id or a list of them")
        else:
            problems += [
                f"base_model: {shown(m)} is not a Hub model id 'org/name'" for m in models if not is_repo_id(m)
            ]
            if len(set(models)) != len(models):
                problems.append("base_model: lists a model twice")
    if "base_model_relation" in meta:
        if meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
            problems.append(f"base_model_relation: must be one of {', '.join(BASE_MODEL_RELATIONS)}")
        if "base_model" not in meta:
            problems.append("base_model_relation: needs base_model")

    if "tags" in meta and (_str_list(meta["tags"]) is None or isinstance(meta["tags"], str)):
        problems.append("tags: must be a list of strings")

    if "model-index" in meta:
        problems += _check_model_index(meta["model-index"])
    return problems
