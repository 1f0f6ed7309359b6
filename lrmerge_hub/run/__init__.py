"""Orchestration: `lrmerge run` (`pipeline`: pull, merge, eval, card, push, resumable, one
recipe or a batch), `lrmerge sweep` (`sweep`: a parameter grid, the best point promoted) and
the Ray executor that runs their merges and evaluations on a cluster (`cluster`).

The top of the flow: may import every package below it (`hub`, `merge`, `card`, `evaluate`,
`recipe`); only `cli` imports it.
"""

from .pipeline import run_recipe, run_releases
from .sweep import run_sweep, sweep_release

__all__ = ["run_recipe", "run_releases", "run_sweep", "sweep_release"]
