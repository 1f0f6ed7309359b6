"""lrmerge-hub: merge low-resource-language and task checkpoints, card, push and serve them.

The subpackages follow a release down the flow, and each imports only those before it:
`recipe` (what to merge) -> `hub` (the sources, pinned and read) -> `merge` (the methods and
the streaming engine) -> `card` -> `hub` (the push) -> `serve` -> `evaluate`; `run`
orchestrates them (`lrmerge run`, `lrmerge sweep`, Ray) and `cli` parses commands on top.
Below them all: `errors`, `settings`, `metadata` (the Hub's names and card metadata rules),
`progress` and `interrupt`.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType
from typing import Any, Callable

__version__ = "0.1.0"

# Modules that moved into the subpackages keep their old names, as the same module objects,
# so imports, `python -m lrmerge_hub.gate` and vLLM's `--middleware lrmerge_hub.gate.RequireKey`
# written against them still work.
MOVED = {
    f"lrmerge_hub.{old}": f"lrmerge_hub.{new}"
    for old, new in {
        "pipeline": "run.pipeline",
        "sweep": "run.sweep",
        "cluster": "run.cluster",
        "gate": "serve.gate",
        "parity": "serve.parity",
        "lm_eval_many": "evaluate.lm_eval_many",
        "hub_stream": "hub.stream",
        "hub_retries": "hub.retries",
        "hub_hosts": "hub.hosts",
        "card_body": "card.body",
        "card_inputs": "card.inputs",
        "card_rules": "metadata",
        "eval_results": "card.eval_results",
        "mergekit_config": "recipe.mergekit",
        "smollm2": "synth.smollm2",
    }.items()
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a moved module under its old name: importing gives the module itself, and
    `python -m` (runpy) runs its code."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: create_module returned the module, already imported."""

    def get_code(self, name: str) -> CodeType | None:
        spec = importlib.util.find_spec(MOVED[name])
        loader = spec.loader if spec else None
        return loader.get_code(MOVED[name]) if isinstance(loader, importlib.abc.InspectLoader) else None


sys.meta_path.append(_MovedModules())


def lazy_attributes(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A package's `__getattr__` that imports `name` from its module `exports[name]` when first
    used: for packages whose modules need what a plain import of the package must not (torch,
    or more than the serving images copy)."""

    def attribute(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return attribute
