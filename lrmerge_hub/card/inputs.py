"""What a model card is made from, read from a merged output folder (see build.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard

from ..metadata import is_language_code
from ..errors import CardError, RecipeError, shown
from .eval_results import Score, read_scores
from ..recipe.yaml_file import read_recipe_yaml

CARD_FILE = "README.md"


@dataclass(frozen=True)
class License:
    """A Hub license id, with the name and link the Hub wants for `other`."""

    id: str
    name: str | None = None
    link: str | None = None

    @property
    def label(self) -> str:
        return f"other ({self.name})" if self.id == "other" and self.name else self.id


@dataclass(frozen=True)
class SourceInfo:
    """One merged model as the card shows it (from merge_report.json)."""

    name: str  # the recipe's name: Hub id, or folder name for a local model
    role: str  # base, language or task
    repo_id: str | None
    revision: str | None
    hub_id: str | None  # the Hub id a local folder is listed by
    params: dict[str, Any]
    retention: dict[str, Any] | None
    license: License | None

    @property
    def listed_id(self) -> str | None:
        """The Hub id the card lists this source by; None keeps it out of `base_model`."""
        return self.repo_id or self.hub_id

    @property
    def sanitized(self) -> str:
        return self.name.replace("/", "__")


@dataclass
class CardInputs:
    """Everything a card is made from, read from the merged output folder."""

    recipe: dict[str, Any]
    recipe_text: str
    report: dict[str, Any]
    sources: list[SourceInfo]
    scores: list[Score]
    has_chat_template: bool
    sweep: dict[str, Any] | None = None  # sweep.json, when `lrmerge sweep` chose this model
    notes: list[str] = field(default_factory=list)
    extra_sections: list[tuple[str, str]] = field(default_factory=list)


def license_from_metadata(meta: Any) -> License | None:
    """A License from a card's metadata mapping or a bare id; None when there is none."""
    if isinstance(meta, str) and meta.strip():
        return License(meta.strip())
    if not isinstance(meta, dict) or not isinstance(meta.get("license"), str):
        return None
    name, link = meta.get("license_name"), meta.get("license_link")
    return License(meta["license"], name if isinstance(name, str) else None, link if isinstance(link, str) else None)


def read_source_license(folder: Path) -> License | None:
    """The license a source folder's README.md declares in its YAML front matter, if any."""
    readme = Path(folder) / CARD_FILE
    if not readme.is_file():
        return None
    try:
        meta = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True).data.to_dict()
    except (ValueError, yaml.YAMLError):
        return None
    return license_from_metadata(meta)


# merge_report.json source entry keys and the type each must have when present
SOURCE_TYPES = {
    "model": str,
    "role": str,
    "repo_id": str,
    "revision": str,
    "hub_id": str,
    "params": dict,
    "retention": dict,
}


def _source_entries(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's base and models entries, each checked to be what the engine writes."""
    models = report.get("models") or []
    if not isinstance(models, list):
        raise CardError("merge_report.json: models must be a list; merge again")
    entries = ([("base", report["base"])] if report.get("base") else []) + [
        (f"models[{i}]", m) for i, m in enumerate(models)
    ]
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise CardError(f"merge_report.json: {where} must be an object; merge again")
        for key, kind in SOURCE_TYPES.items():
            if entry.get(key) is not None and not isinstance(entry[key], kind):
                raise CardError(
                    f"merge_report.json: {where}.{key} must be a {kind.__name__} (got {shown(entry[key])}); merge again"
                )
    return [dict(entry, role="base") if where == "base" else entry for where, entry in entries]


def _sources_from_report(report: dict[str, Any], source_dirs: dict[str, Path]) -> list[SourceInfo]:
    sources = []
    for entry in _source_entries(report):
        name = str(entry.get("model"))
        license_ = license_from_metadata(entry.get("license"))
        if license_ is None and name in source_dirs:
            license_ = read_source_license(source_dirs[name])
        sources.append(
            SourceInfo(
                name=name,
                role=entry.get("role") or "task",
                repo_id=entry.get("repo_id"),
                revision=entry.get("revision"),
                hub_id=entry.get("hub_id"),
                params=dict(entry.get("params") or {}),
                retention=entry.get("retention"),
                license=license_,
            )
        )
    return sources


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def read_inputs(model_dir: Path, *, source_dirs: dict[str, Path] | None = None) -> CardInputs:
    """Read recipe.yaml, merge_report.json and eval/ from a merged output folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CardError(f"{model_dir.name}: not a folder; pass the merged model's output folder")
    try:
        report = json.loads((model_dir / "merge_report.json").read_text(encoding="utf-8"))
        recipe_raw = (model_dir / "recipe.yaml").read_bytes()
        recipe = read_recipe_yaml(recipe_raw, "recipe.yaml")
        recipe_text = recipe_raw.decode("utf-8-sig")
    except FileNotFoundError as e:
        raise CardError(
            f"{model_dir.name}/{Path(e.filename).name}: missing; run `lrmerge merge` to make this folder"
        ) from None
    except RecipeError as e:
        raise CardError(f"{model_dir.name}: {e}; merge again") from None
    except (ValueError, RecursionError) as e:
        raise CardError(
            f"{model_dir.name}: merge_report.json is unreadable ({type(e).__name__}); merge again"
        ) from None
    if not isinstance(report, dict) or not isinstance(recipe, dict):
        raise CardError(f"{model_dir.name}: merge_report.json and recipe.yaml must hold mappings; merge again")
    scores, notes = read_scores(model_dir / "eval")
    sweep = None
    if (model_dir / "sweep.json").is_file():
        try:
            sweep = json.loads((model_dir / "sweep.json").read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            notes.append("sweep.json: skipped, not readable JSON")
    return CardInputs(
        recipe=recipe,
        recipe_text=recipe_text,
        report=report,
        sources=_sources_from_report(report, dict(source_dirs or {})),
        scores=scores,
        has_chat_template=_has_chat_template(model_dir),
        sweep=sweep if isinstance(sweep, dict) else None,
        notes=notes,
    )


def resolve_license(recipe_license: License | None, sources: list[SourceInfo]) -> tuple[License | None, str | None]:
    """The card's license and, when none can be stated, a note saying why.

    The recipe's license wins. Otherwise the sources' licenses are inherited when every
    source declares one and they agree; when they disagree that is an error.
    """
    if recipe_license is not None:
        return recipe_license, None
    known = {s.name: s.license for s in sources if s.license is not None}
    distinct = {(lic.id, lic.name) for lic in known.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{name}: {lic.label}" for name, lic in known.items())
        raise CardError(
            f"license: the sources' licenses disagree ({listing}); set `license:` in the recipe "
            "to the license the merged model is released under"
        )
    unknown = [s.name for s in sources if s.license is None]
    if unknown:
        return None, (
            f"license: not stated, the license of {', '.join(unknown)} is not known; set `license:` in the recipe"
        )
    return (next(iter(known.values())), None) if known else (None, None)


def recipe_license(recipe: dict[str, Any], report: dict[str, Any]) -> License | None:
    """The license the recipe sets (`license`, with `license_name`/`license_link` for other)."""
    return license_from_metadata(recipe) or license_from_metadata(report.get("license"))


def languages_of(recipe: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """The recipe's ISO 639 codes, each checked; an unknown code is an error naming it."""
    codes = recipe.get("languages", report.get("languages")) or []
    if isinstance(codes, str):
        codes = [codes]
    if not isinstance(codes, list):
        raise CardError(f"languages: must be a list of ISO 639 codes (got {shown(codes)})")
    for code in codes:
        if not isinstance(code, str) or not is_language_code(code) or code in ("code", "multilingual"):
            raise CardError(
                f"languages: unknown ISO 639 code {shown(code)}; use ISO 639-1 or 639-3 codes like bo, ug, khk"
            )
    return list(codes)


def source_dirs_for(recipe: Any, sources: dict[str, Any]) -> dict[str, Path]:
    """Each source's merge-report name mapped to its local folder, for `read_inputs(source_dirs=)`.

    `recipe` is the Recipe that was merged and `sources` the engine's {model spec or "base":
    Source}; a pipeline passes these so that licenses in the sources' README.md reach the card.
    """
    from ..merge.plan import BASE

    refs = ([(BASE, recipe.base)] if recipe.base is not None else []) + [(m.ref.spec, m.ref) for m in recipe.models]
    return {(ref.display if ref.is_local else ref.spec): Path(sources[key].path) for key, ref in refs if key in sources}
