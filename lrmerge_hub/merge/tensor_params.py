"""Parameters per tensor: gradients over layers and filters on tensor names (pure).

A parameter of a recipe (per model or global) is a value, or a *setting* with mergekit
0.1.5's meaning:

- a gradient, a list of numbers `[v_0, ..., v_k]`: the layer at position t in [0, 1] gets
  the piecewise linear interpolation at t (x = t·k, i = floor(x), (1 − f)·v_i + f·v_{i+1}
  with f = x − i, in float64); a list of booleans or strings takes v_{floor(t·k)};
- a filter list `[{filter: TEXT, value: SETTING}, ...]`: the first entry whose filter is
  absent, `*`, or a substring of the tensor name gives the value (itself a value or a
  gradient); when none matches, the parameter falls back to its default.

t is layer / (L − 1) for the tensors of layer `layer` of a model with L layers (1 when the
model has one layer), and 0 for every tensor outside the layers (embeddings, final norm,
output head): mergekit's positions. The values are resolved here, before a tensor's kernel
is called, so the fused paths see plain numbers.
"""

from __future__ import annotations

import re
from typing import Any, Callable

# `model.layers.12.mlp.up_proj.weight`, GPT-2's `transformer.h.3.attn...`, `blocks.7...`
LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
SCALARS = (bool, int, float, str)


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name, or None for a tensor outside the layers."""
    m = LAYER_NAME.search(name)
    return int(m.group(1)) if m else None


def layer_count(config: dict[str, Any]) -> int | None:
    """The number of decoder layers a model's config.json declares (None: not declared)."""
    for cfg in (config, text if isinstance(text := config.get("text_config"), dict) else {}):
        for key in LAYER_COUNT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def with_layer(name: str, layer: int) -> str:
    """The name of the same tensor in another layer (`model.layers.3.mlp...` -> layer 7)."""
    m = LAYER_NAME.search(name)
    if m is None:
        raise ValueError(f"{name} is not a tensor of a layer")
    return f"{name[: m.start(1)]}{layer}{name[m.end(1) :]}"


def set_layer_count(config: dict[str, Any], layers: int) -> dict[str, Any]:
    """A copy of config.json declaring `layers` decoder layers (a sliced output's count)."""
    out = dict(config)
    inner = dict(out["text_config"]) if isinstance(out.get("text_config"), dict) else None
    for cfg in (out, inner or {}):
        for key in LAYER_COUNT_KEYS:
            if key in cfg:
                cfg[key] = layers
    if inner is not None:
        out["text_config"] = inner
    return out


def position(layer: int | None, num_layers: int | None) -> float:
    """mergekit's t of a tensor: layer / (L − 1) inside the layers, 1 for a one-layer model,
    0 outside the layers."""
    if layer is None or not num_layers:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def is_setting(value: Any) -> bool:
    """A gradient or a filter list (anything but a plain value)."""
    return isinstance(value, (list, dict))


def evaluate(setting: Any, name: str, t: float) -> Any:
    """The value of a setting for tensor `name` at position t (None: no filter matched)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, SCALARS):
        return setting
    if not setting:
        return None
    if all(isinstance(e, SCALARS) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (name and f in name):
            return evaluate(cond["value"], name, t)
    return None


def check_setting(setting: Any, check: Callable[[Any], str | None], integer: bool) -> str | None:
    """Why a setting is malformed, or None: every leaf value must pass `check` (a gradient's
    interpolations lie between its endpoints, so checking the endpoints checks them all);
    integer parameters take filters but no numeric gradients."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, SCALARS):
        return check(setting)
    if not isinstance(setting, list) or not setting:
        return "must be a value, a gradient (a list of values) or a list of {filter: ..., value: ...}"
    if all(isinstance(e, SCALARS) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if numeric and integer and len(setting) > 1:
            return "a whole-number parameter takes no gradient (use filters, or one value)"
        for e in setting:
            problem = check(e)
            if problem:
                return f"{problem} (in the gradient, got {e!r})"
        return None
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            return f"[{i}] must be {{filter: TEXT, value: ...}} (filter optional)"
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            return f"[{i}].filter must be text (a part of tensor names)"
        if isinstance(cond["value"], dict) or (
            isinstance(cond["value"], list) and not all(isinstance(e, SCALARS) for e in cond["value"])
        ):
            return f"[{i}].value must be a value or a gradient"
        problem = check_setting(cond["value"], check, integer)
        if problem:
            return f"[{i}].value: {problem}"
    return None


class TensorParams:
    """Resolves a recipe's parameters for each tensor: settings evaluated at the tensor's
    name and layer position (a filter that matches nothing leaves the declared default),
    then the method's own per-tensor step (layer_swap's shares). Recipes with neither get
    their plain values back, as they are."""

    def __init__(
        self,
        method: Any,
        model_params: list[dict[str, Any]],
        model_settings: list[dict[str, Any]],
        params: dict[str, Any],
        settings: dict[str, Any],
        roles: list[str],
        num_layers: int | None,
    ):
        self.method = method
        self.model_params, self.model_settings = model_params, model_settings
        self.params, self.settings = params, settings
        self.roles, self.num_layers = roles, num_layers
        self.model_defaults = {k: p.default for k, p in method.model_params.items()}
        self.defaults = {k: p.default for k, p in method.global_params.items()}
        self.varies = bool(settings) or any(model_settings)
        self.plain = not self.varies and method.per_tensor is None
        self._checked: set[str] = set()

    @classmethod
    def of(cls, recipe: Any, num_layers: int | None) -> "TensorParams":
        from .methods import get_method

        return cls(
            get_method(recipe.method),
            [m.params for m in recipe.models],
            [getattr(m, "settings", {}) for m in recipe.models],
            recipe.parameters,
            getattr(recipe, "settings", {}),
            [m.role for m in recipe.models],
            num_layers,
        )

    def __call__(
        self, name: str, t: float | None = None, model_names: list[str] | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The parameters of tensor `name`; `t` is its position when the plan decides it (a
        slice's layers: mergekit counts them within the slice), else it comes from the name.
        `model_names`: each model's own tensor name, which mergekit matches a model's filters
        against (a slice's source layer), when it differs from `name`."""
        if self.plain:
            return self.model_params, self.params
        layer = layer_of(name)
        t = position(layer, self.num_layers) if t is None else t
        mp, params = self.model_params, self.params
        if self.varies:
            names = model_names or [name] * len(mp)
            mp = [
                {**p, **_resolve(s, self.model_defaults, n, t)}
                for p, s, n in zip(mp, self.model_settings, names, strict=True)
            ]
            params = {**params, **_resolve(self.settings, self.defaults, name, t)}
            key = repr((mp, params))
            if (
                key not in self._checked
            ):  # values only a tensor's resolution shows (DELLA's bounds, weights that cancel)
                problem = self.problem(mp, params)
                if problem:
                    raise ValueError(f"tensor {name}: {problem}")
                self._checked.add(key)
        if self.method.per_tensor is not None:
            mp, params = self.method.per_tensor(mp, params, self.roles, layer, self.num_layers)
        return mp, params

    def problem(self, mp: list[dict[str, Any]], params: dict[str, Any]) -> str | None:
        from .methods import normalize_problem

        if self.method.check is not None:
            problem = self.method.check(mp, params)
            if problem:
                return problem
        return normalize_problem(
            self.method.name, [p["weight"] for p in mp if "weight" in p], bool(params.get("normalize"))
        )


def _resolve(settings: dict[str, Any], defaults: dict[str, Any], name: str, t: float) -> dict[str, Any]:
    out = {}
    for key, setting in settings.items():
        value = evaluate(setting, name, t)
        out[key] = defaults[key] if value is None else value
    return out
