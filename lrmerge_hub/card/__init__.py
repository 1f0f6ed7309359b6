"""The model card: metadata (language, license, lineage, `model-index` scores) and body,
written into the merged folder and pushed as one commit (README.md and `.eval_results/`).

`build` writes and pushes it; `inputs` gathers what it says from the folder; `body` renders
the text; `eval_results` reads lm-eval's results; `rules` keeps tokens, paths and user names
out of it. May import `merge` (the method registry and plans), `recipe`, `metadata`,
`errors`; it never serves or evaluates.
"""

from .build import BuiltCard, PushedCard, build_card, push_card, save_card, write_card

__all__ = ["BuiltCard", "PushedCard", "build_card", "push_card", "save_card", "write_card"]
