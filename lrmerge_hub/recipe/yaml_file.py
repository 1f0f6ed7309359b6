"""A recipe file's bytes read as YAML, safely: UTF-8 only, no Python objects (a SafeLoader),
no YAML bomb (aliases expanded are counted before any value is built), and floats as YAML
1.2 reads them. Used for recipes, mergekit configs and the recipe.yaml beside a merged model."""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..errors import RecipeError

MAX_RECIPE_BYTES = 1024 * 1024  # a recipe is a few KB; a bigger file is a mistake (or an attack)
MAX_YAML_NODES = 10_000  # values in the recipe once every alias is expanded (a YAML bomb has billions)


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document too big once its aliases are expanded (a
    "billion laughs" YAML bomb is a few lines that expand to billions of values) and
    aliases that refer to themselves. The document is checked as composed, before any
    value is built, in time proportional to its text."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _check_expanded_size(node)
        return node


# YAML 1.1 (PyYAML) reads `1e-5` and `1e9` as strings: it wants a dot in a float. mergekit configs
# and people write them without one (pydantic then coerces the string), so read them as YAML 1.2 does.
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values of the document with every alias expanded (each node once, with the
    sizes of shared nodes remembered); raise RecipeError past MAX_YAML_NODES or on a cycle."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_YAML_NODES:
                raise RecipeError(
                    f"recipe: over {MAX_YAML_NODES} values once its aliases are expanded "
                    "(a YAML bomb?); write the recipe without nested aliases"
                )
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise RecipeError("recipe: an alias refers to the value that contains it (a recursive YAML alias)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def read_recipe_yaml(raw: bytes, name: str = "recipe") -> Any:
    """The YAML document in a recipe file's bytes (pure). Raises RecipeError, one line, for
    a file that is not UTF-8 text, is not YAML, or is a YAML bomb."""
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe: {name} is {len(raw)} bytes; a recipe is a few KB of YAML")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise RecipeError(f"recipe: {name} is UTF-16 or UTF-32 (or not text); save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe: {name} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe: {name} is not valid YAML{where}") from None
    except RecursionError:
        raise RecipeError(f"recipe: {name} nests values too deeply") from None
    except ValueError:  # a value YAML cannot build: a date like 2024-13-45, an integer of 5000 digits
        raise RecipeError(f"recipe: {name} holds a value that cannot be read (an invalid date or number?)") from None
