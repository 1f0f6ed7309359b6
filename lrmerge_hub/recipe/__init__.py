"""Recipes: what to merge, how, and what to release (`spec`: the YAML format, checked before
any work), and mergekit's YAML configs read as recipes and written back (`mergekit`).

The first step of the flow. `spec` may import the method registry (`merge.methods`, to check
a method's parameters), `metadata` and `errors`.
"""

from .spec import EvalSpec, ModelEntry, ModelRef, PushTarget, Recipe, load_recipe, parse_model_ref, parse_recipe

__all__ = [
    "EvalSpec",
    "ModelEntry",
    "ModelRef",
    "PushTarget",
    "Recipe",
    "load_recipe",
    "parse_model_ref",
    "parse_recipe",
]
