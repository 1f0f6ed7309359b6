"""mergekit 0.1.5 configs, read as they are and written from our recipes (pure).

A YAML mapping with `merge_method` is a mergekit config. `from_mergekit` turns it into the
mapping of our recipe format with the same meaning: `models` (each `model` and its
`parameters`), `base_model`, `parameters` at the top (per-model ones there are every
model's fallback, as in mergekit's precedence), gradients and filters (merge.tensor_params,
evaluated as mergekit evaluates them), `dtype`/`out_dtype`, `tokenizer_source` and
`tokenizer: {source: ...}`. lrmerge computes in float32 whatever `dtype` says; mergekit
computes in `dtype` (or the inputs' dtype), so the two give the same bits when mergekit
computes in float32. A key we do not support is an error naming it, never ignored.
`to_mergekit` writes the mergekit config of a recipe that has one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import RecipeError, shown
from ..merge.methods import METHODS

MERGEKIT_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "slices",
    "modules",
)
# not (yet) supported: an error naming the key
UNSUPPORTED = {
    "modules": "modules are not supported; list whole models under `models`",
}
# read as they are: the same key with the same meaning in our recipe
SHARED_KEYS = ("chat_template",)
# our recipe's keys that may sit beside a mergekit config's (they have no mergekit meaning)
OUR_KEYS = ("languages", "license", "license_name", "license_link", "output", "device", "push", "eval")
DTYPES = ("float32", "bfloat16", "float16")
MERGEKIT_ONLY_IN_OURS = ("slack_ties", "layer_swap")  # our methods mergekit does not have


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _model_name(value: Any, where: str) -> str:
    if isinstance(value, dict):
        raise RecipeError(f"{where}: a model with a LoRA ({shown(value)}) is not supported; merge the LoRA first")
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: must be a local folder or a Hub id (got {shown(value)})")
    if "+" in value:
        raise RecipeError(
            f"{where}: {shown(value)} names a LoRA (model+lora), which is not supported; merge the LoRA first"
        )
    return value.strip()


def _conditions(setting: Any) -> list[Any]:
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return list(setting)
    return [{"value": setting}]


def _with_fallback(own: Any, fallback: Any) -> Any:
    """A model's setting with the top-level one behind it: mergekit falls back to the next
    scope when no filter of a model's own list matches."""
    if own is None:
        return fallback
    if fallback is None:
        return own
    if isinstance(own, dict) or (isinstance(own, list) and own and all(isinstance(e, dict) for e in own)):
        return _conditions(own) + _conditions(fallback)
    return own


def from_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """Our recipe mapping for a mergekit 0.1.5 config. Raises RecipeError naming the key."""
    for key in data:
        if key not in MERGEKIT_KEYS and key not in OUR_KEYS:
            raise RecipeError(
                f"{key}: not a mergekit 0.1.5 config key (allowed: {', '.join(MERGEKIT_KEYS)}; "
                f"and ours: {', '.join(OUR_KEYS)})"
            )
        if key in UNSUPPORTED:
            raise RecipeError(f"{key}: {UNSUPPORTED[key]}")
    sliced = data.get("slices") is not None
    if sliced:
        if data.get("models") is not None:
            raise RecipeError("slices: give either models or slices, not both")
        if _is_whole_slice(data["slices"]):
            data, sliced = _whole_slice(data), False
    name = data["merge_method"]
    if not isinstance(name, str) or name not in METHODS or name in MERGEKIT_ONLY_IN_OURS:
        known = sorted(m for m in METHODS if m not in MERGEKIT_ONLY_IN_OURS)
        raise RecipeError(f"merge_method: unknown method {shown(name)} (allowed: {', '.join(known)})")
    method = METHODS[name]
    out: dict[str, Any] = {"method": name}
    out.update({k: data[k] for k in OUR_KEYS + SHARED_KEYS if k in data})
    if data.get("_layers") is not None:
        out["layers"] = data["_layers"]

    top = data.get("parameters") or {}
    if not isinstance(top, dict):
        raise RecipeError("parameters: must be a mapping of parameter names to values")
    for key in top:
        if key not in method.model_params and key not in method.global_params:
            allowed = ", ".join(list(method.model_params) + list(method.global_params)) or "none"
            raise RecipeError(f"parameters.{key}: not a parameter of {name} (allowed: {allowed})")
    out["parameters"] = {k: v for k, v in top.items() if k in method.global_params}

    base = _model_name(data["base_model"], "base_model") if data.get("base_model") is not None else None
    if sliced:
        out["slices"] = [_slice(sl, i, top, method, base) for i, sl in enumerate(data["slices"])]
        if base is not None:  # the model whose config.json and tokenizer the output takes
            out["base"] = base
    else:
        models, base = _models(data.get("models"), "models", top, method, base, add_base=True)
        out["models"] = models
        if base is not None:
            out["base"] = base
    _dtype_and_tokenizer(data, out, base)
    return out


def _models(
    models_raw: Any, at: str, top: dict[str, Any], method: Any, base: str | None, add_base: bool
) -> tuple[list[dict[str, Any]], str | None]:
    """Our `models` (settings with mergekit's fallbacks) and base for a list of mergekit model
    entries; `add_base`: mergekit's linear averages a base missing from the list in."""
    name = method.name
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError(f"{at}: must be a non-empty list of {{model: ..., parameters: {{...}}}}")
    entries = []
    for i, entry in enumerate(models_raw):
        where = f"{at}[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{where}: must be a mapping with 'model' (and optional 'parameters')")
        for key in entry:
            if key not in ("model", "parameters"):
                raise RecipeError(f"{where}.{key}: not a key of a mergekit model entry (allowed: model, parameters)")
        own = entry.get("parameters") or {}
        if not isinstance(own, dict):
            raise RecipeError(f"{where}.parameters: must be a mapping of parameter names to values")
        for key in own:
            if key in method.global_params:
                raise RecipeError(
                    f"{where}.parameters.{key}: a global parameter of {name} (mergekit ignores it "
                    "here); set it under the top-level parameters"
                )
        entries.append((_model_name(entry["model"], f"{where}.model"), own, where))

    takes_base_as_input = not method.needs_base and name == "linear"
    if base is not None and takes_base_as_input:  # mergekit's linear averages the base in as one more input
        if add_base and all(model != base for model, _, _ in entries):
            entries.append((base, {}, "base_model"))
        base = None
    models = []
    for model, own, where in entries:
        if model == base:  # mergekit lists the base among the inputs; it stays the base
            continue
        entry = {"model": model}
        for key in method.model_params:
            setting = _with_fallback(own.get(key), top.get(key))
            if setting is not None:
                entry[key] = setting
        extra = [k for k in own if k not in method.model_params and k not in method.global_params]
        if extra:
            allowed = ", ".join(method.model_params) or "none"
            raise RecipeError(f"{where}.parameters.{extra[0]}: not a parameter of {name} (allowed: {allowed})")
        models.append(entry)
    return models, base


def _dtype_and_tokenizer(data: dict[str, Any], out: dict[str, Any], base: str | None) -> None:
    dtype, out_dtype = data.get("dtype"), data.get("out_dtype")
    for key, value in (("dtype", dtype), ("out_dtype", out_dtype)):
        if value is not None and value not in DTYPES:
            raise RecipeError(f"{key}: must be one of {', '.join(DTYPES)} (got {shown(value)})")
    if out_dtype or dtype:
        out["dtype"] = out_dtype or dtype

    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise RecipeError("tokenizer_source: give either tokenizer_source or tokenizer, not both")
    source = data.get("tokenizer_source")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict):
            raise RecipeError("tokenizer: must be a mapping like {source: base}")
        for key in tokenizer:
            if key not in ("source", "pad_to_multiple_of", "tokens"):
                raise RecipeError(
                    f"tokenizer.{key}: not a key of mergekit's tokenizer (source, pad_to_multiple_of, tokens)"
                )
        source = tokenizer.get("source", "union")
    # mergekit aligns every model's embeddings to the output vocabulary (merge.vocabulary);
    # tokenizer_source: base alone keeps the base's rows, the same bits
    aligned = tokenizer is not None and (tokenizer.get("pad_to_multiple_of") or tokenizer.get("tokens"))
    if source is None:
        return
    if base is not None and source == base:
        source = "base"
    if source == "base" and not aligned:
        out["tokenizer_source"] = "base"
        return
    what = {"union": "union", "base": "the base's tokenizer"}.get(source, "a model's tokenizer")
    if out.get("slices") is not None:
        raise RecipeError(f"tokenizer_source: {what} with slices is not supported yet (base alone is)")
    if data.get("base_model") is not None and base is None:  # linear: mergekit's base still picks rows
        raise RecipeError(f"tokenizer_source: {what} with linear and a base_model is not supported yet")
    if source == "union" or source == "base":
        if base is None:  # mergekit starts from a model picked in hash order
            raise RecipeError(f"tokenizer_source: {source} without a base_model is not supported")
    else:
        source = _model_name(source, "tokenizer_source")
        if all(m["model"] != source for m in out["models"]):
            raise RecipeError(f"tokenizer_source: {shown(source)} must be one of the models")
    out["tokenizer"] = {"source": source}
    if tokenizer is not None and tokenizer.get("pad_to_multiple_of"):  # mergekit: 0 or null pads nothing
        out["tokenizer"]["pad_to_multiple_of"] = tokenizer["pad_to_multiple_of"]
    if tokenizer is not None and tokenizer.get("tokens"):
        out["tokenizer"]["tokens"] = _tokens(tokenizer["tokens"], base)


def _tokens(tokens: Any, base: str | None) -> Any:
    """mergekit's `tokenizer.tokens` with its models named as ours (the base as `base`)."""
    if not isinstance(tokens, dict):
        return tokens  # the recipe's own check words the error

    def name(model: Any) -> Any:
        if isinstance(model, str) and model.strip() == base:
            return "base"
        return _model_name(model, "tokenizer.tokens: a source's model") if isinstance(model, str | dict) else model

    out = {}
    for token, entry in tokens.items():
        if isinstance(entry, dict) and isinstance(entry.get("source"), str):
            entry = {**entry, "source": name(entry["source"])}
        elif isinstance(entry, dict) and isinstance(entry.get("source"), dict) and "model" in entry["source"]:
            entry = {**entry, "source": {**entry["source"], "model": name(entry["source"]["model"])}}
        out[token] = entry
    return out


SLICE_KEYS = ("sources", "parameters", "base_model")
SOURCE_KEYS = ("model", "layer_range", "parameters")


def _is_whole_slice(slices: Any) -> bool:
    """One slice whose sources all start at layer 0: read as `models` (`_whole_slice`)."""
    return (
        isinstance(slices, list)
        and len(slices) == 1
        and isinstance(slices[0], dict)
        and isinstance(slices[0].get("sources"), list)
        and all(isinstance(s, dict) and _layer_range(s.get("layer_range"))[0] == 0 for s in slices[0]["sources"])
    )


def _layer_range(value: Any) -> tuple[int, int] | tuple[None, None]:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
        and 0 <= value[0] < value[1]
    )
    return (value[0], value[1]) if ok else (None, None)


def _slice(sl: Any, i: int, top: dict[str, Any], method: Any, base: str | None) -> dict[str, Any]:
    """Our slice for mergekit slice `i`: its sources with `layers`, the base among them (the
    slice's base_model, else the config's) first, the parameters with mergekit's fallbacks
    (a source's, then the slice's, then the top level's)."""
    where = f"slices[{i}]"
    if not isinstance(sl, dict):
        raise RecipeError(f"{where}: must be a mapping like {{sources: [...]}}")
    for key in sl:
        if key not in SLICE_KEYS:
            raise RecipeError(f"{where}.{key}: not supported (allowed: {', '.join(SLICE_KEYS)})")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{where}.sources: must be a non-empty list of {{model: ..., layer_range: [start, end]}}")
    spans, entries = {}, []
    for j, src in enumerate(sources):
        at = f"{where}.sources[{j}]"
        if not isinstance(src, dict) or "model" not in src:
            raise RecipeError(f"{at}: must be a mapping with model and layer_range")
        for key in src:
            if key not in SOURCE_KEYS:
                raise RecipeError(f"{at}.{key}: not supported (allowed: {', '.join(SOURCE_KEYS)})")
        span = _layer_range(src.get("layer_range"))
        if span[0] is None:
            raise RecipeError(
                f"{at}.layer_range: must be [start, end] with 0 <= start < end (got {shown(src.get('layer_range'))})"
            )
        model = _model_name(src["model"], f"{at}.model")
        spans[model] = list(span)
        entries.append({"model": model, **({"parameters": src["parameters"]} if "parameters" in src else {})})
    params = dict(top)
    own = sl.get("parameters") or {}
    if not isinstance(own, dict):
        raise RecipeError(f"{where}.parameters: must be a mapping of parameter names to values")
    for key, value in own.items():  # the slice's settings come before the top level's
        if key not in method.model_params and key not in method.global_params:
            raise RecipeError(f"{where}.parameters.{key}: not a parameter of {method.name}")
        params[key] = _with_fallback(value, params.get(key))
    if sl.get("base_model") is not None:
        base = _model_name(sl["base_model"], f"{where}.base_model")
    models, base = _models(entries, f"{where}.sources", params, method, base, add_base=False)
    base = base if base in spans else None
    out: dict[str, Any] = {
        "sources": ([{"model": base, "layers": spans[base]}] if base else [])
        + [{**m, "layers": spans[m["model"]]} for m in models],
        "parameters": {k: v for k, v in params.items() if k in method.global_params},
    }
    if base is not None:
        out["base"] = base
    return out


def _whole_slice(data: dict[str, Any]) -> dict[str, Any]:
    """A config whose one slice takes every layer of each source, as the same config with
    `models` (the slice's parameters become the top level's first fallback); the layer count
    the ranges name is checked against the models when they are read. Several slices, or a
    part of a model's layers, make a frankenmerge: an error naming the key."""
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise RecipeError("slices: must be a non-empty list of {sources: [...]}")
    if len(slices) > 1:
        raise RecipeError(
            f"slices: {len(slices)} slices make a frankenmerge, which is not supported yet "
            "(one slice taking every layer of each model is)"
        )
    out_slice = slices[0]
    if not isinstance(out_slice, dict):
        raise RecipeError("slices[0]: must be a mapping like {sources: [...]}")
    for key in out_slice:
        if key not in SLICE_KEYS:
            raise RecipeError(f"slices[0].{key}: not supported (allowed: {', '.join(SLICE_KEYS)})")
    sources = out_slice.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError("slices[0].sources: must be a non-empty list of {model: ..., layer_range: [0, N]}")
    ranges, models = set(), []
    for i, src in enumerate(sources):
        where = f"slices[0].sources[{i}]"
        if not isinstance(src, dict) or "model" not in src:
            raise RecipeError(f"{where}: must be a mapping with model and layer_range")
        for key in src:
            if key not in SOURCE_KEYS:
                raise RecipeError(f"{where}.{key}: not supported (allowed: {', '.join(SOURCE_KEYS)})")
        lr = src.get("layer_range")
        if not (
            isinstance(lr, list)
            and len(lr) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            and 0 <= lr[0] < lr[1]
        ):
            raise RecipeError(f"{where}.layer_range: must be [start, end] with 0 <= start < end (got {shown(lr)})")
        if lr[0] != 0:
            raise RecipeError(
                f"{where}.layer_range: {lr} starts past layer 0; slices of layers (frankenmerges) are not supported yet"
            )
        ranges.add(lr[1])
        models.append({"model": src["model"], **({"parameters": src["parameters"]} if "parameters" in src else {})})
    if len(ranges) > 1:
        raise RecipeError(
            "slices[0].sources: layer ranges of different lengths; every source of a slice "
            "takes the same number of layers"
        )
    params = dict(data.get("parameters") or {})
    slice_params = out_slice.get("parameters") or {}
    if not isinstance(slice_params, dict) or not isinstance(params, dict):
        raise RecipeError("slices[0].parameters: must be a mapping of parameter names to values")
    for key, value in slice_params.items():  # the slice's settings come before the top level's
        params[key] = _with_fallback(value, params.get(key))
    whole = {k: v for k, v in data.items() if k != "slices"}
    whole.update(models=models, parameters=params, _layers=ranges.pop())
    if out_slice.get("base_model") is not None:
        whole["base_model"] = out_slice["base_model"]
    return whole


def to_mergekit(recipe: Any, as_written: bool = False) -> dict[str, Any] | None:
    """The mergekit 0.1.5 config of a recipe (None when mergekit has no equivalent: our own
    methods, or a nonzero slack). Models are named as in recipe.yaml (`./folder` for a local
    absolute path), or exactly as written with `as_written`."""

    def named(ref: Any) -> str:
        return ref.spec if as_written else ref.portable

    name = recipe.method
    if name == "slack_ties" and all(m.params.get("slack") == 0.0 and "slack" not in m.settings for m in recipe.models):
        name = "ties"  # slack 0 is exactly ties (without rescale: mergekit's default)
    if name in MERGEKIT_ONLY_IN_OURS:
        return None
    method = METHODS[name]
    config: dict[str, Any] = {"merge_method": name}
    if recipe.base is not None:
        config["base_model"] = named(recipe.base)
    if recipe.slices is None:
        models = _mergekit_models(recipe, method, named)
        if models is None:
            return None
        config["models"] = models
        params = _mergekit_params(recipe, method)
        if params:
            config["parameters"] = params
    else:
        config["slices"] = []
        for sl in recipe.slices:
            models = _mergekit_models(sl.part, method, named)
            if models is None:
                return None
            if sl.part.base is not None:  # mergekit lists the base among a slice's sources
                models.insert(0, {"model": named(sl.part.base)})
            out: dict[str, Any] = {
                "sources": [{**m, "layer_range": list(r)} for m, r in zip(models, sl.ranges, strict=True)]
            }
            if sl.part.base is not None:
                out["base_model"] = named(sl.part.base)
            params = _mergekit_params(sl.part, method)
            if params:
                out["parameters"] = params
            config["slices"].append(out)
    config["dtype"] = "float32"
    if recipe.dtype:
        config["out_dtype"] = recipe.dtype
    if recipe.chat_template is not None:
        config["chat_template"] = recipe.chat_template
    if recipe.tokenizer_source == "base":
        config["tokenizer_source"] = "base"
    elif recipe.tokenizer_source:  # ours copies the rows past the shared ones; mergekit aligns them
        return None
    if recipe.tokenizer:
        source = recipe.tokenizer
        if source not in ("union", "base"):
            source = named(next(m.ref for m in recipe.models if m.ref.spec == source))
        if recipe.pad_to_multiple_of or recipe.tokens:
            config["tokenizer"] = {"source": source}
            if recipe.pad_to_multiple_of:
                config["tokenizer"]["pad_to_multiple_of"] = recipe.pad_to_multiple_of
            if recipe.tokens:

                def model_name(key: str) -> str:
                    if key == "base":
                        return named(recipe.base)
                    return named(next(m.ref for m in recipe.models if m.ref.spec == key))

                config["tokenizer"]["tokens"] = {t: row.to_dict(model_name) for t, row in recipe.tokens.items()}
        else:
            config["tokenizer_source"] = source
    return config


def _mergekit_models(recipe: Any, method: Any, named: Any) -> list[dict[str, Any]] | None:
    """mergekit's model entries of a recipe's models (None: a nonzero slack, which it lacks)."""
    models = []
    for m in recipe.models:
        values = {**m.params, **m.settings}
        if "slack" in values:
            if values.pop("slack") != 0.0 or "slack" in m.settings:
                return None
        params = {
            k: _explicit(v, method.model_params[k].default) for k, v in values.items() if k in method.model_params
        }
        models.append({"model": named(m.ref), **({"parameters": params} if params else {})})
    return models


def _mergekit_params(recipe: Any, method: Any) -> dict[str, Any]:
    params = {
        k: _explicit(v, method.global_params[k].default) if k in method.global_params else v
        for k, v in {**recipe.parameters, **recipe.settings}.items()
    }
    if recipe.method in ("slerp", "nearswap"):
        params.setdefault("t", 0.5)
    return params


def _explicit(setting: Any, default: Any) -> Any:
    """A filter list with our fallback written out: where no filter matches, lrmerge takes
    the declared default and mergekit (for a required parameter) stops."""
    conds = (
        setting
        if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting)
        else [setting]
        if isinstance(setting, dict)
        else None
    )
    if conds is None or conds[-1].get("filter") in (None, "*"):
        return setting
    return conds + [{"value": default}]


def convert(recipe: Any, to: str) -> str:
    """A recipe (read from either format) written as YAML in format `to`: "mergekit" or
    "lrmerge", models named as written. Raises RecipeError when mergekit has no equivalent."""
    import yaml

    if to == "mergekit":
        config = to_mergekit(recipe, as_written=True)
        if config is None:
            raise RecipeError(
                f"method: {recipe.method} with these parameters has no mergekit 0.1.5 equivalent "
                "(slack_ties with a nonzero slack, layer_swap)"
            )
        return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    data = recipe.to_dict(as_written=True)
    if recipe.output is not None and isinstance(recipe.raw.get("output"), str):
        data["output"] = recipe.raw["output"]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# a fenced YAML block of a model card (mergekit's card puts its config in one)
CARD_YAML_BLOCK = re.compile(r"^(`{3,}|~{3,})[ \t]*ya?ml[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)


def config_from_card(text: str, name: str) -> dict[str, Any]:
    """The first YAML block of a model card that is a mergekit config (has `merge_method`).
    Raises RecipeError when there is none."""
    from .yaml_file import read_recipe_yaml

    for match in CARD_YAML_BLOCK.finditer(text):
        try:
            data = read_recipe_yaml(match.group(2).encode("utf-8"), name)
        except RecipeError:
            continue
        if is_mergekit_config(data):
            return data
    raise RecipeError(f"recipe: {name} holds no mergekit config (a ```yaml block with merge_method)")


def card_from_hub(spec: str) -> str:
    """The README.md of the Hub model `org/name[@revision]` (the token from the environment)."""
    from huggingface_hub import hf_hub_download

    from ..hub.errors import hub_errors

    repo_id, _, revision = spec.partition("@")
    with hub_errors(f"read the model card of {repo_id}"):
        path = hf_hub_download(repo_id, "README.md", revision=revision or None)
    return Path(path).read_text(encoding="utf-8", errors="replace")
