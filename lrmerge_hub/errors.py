"""One exception type per cause; every message is one line that says what to do next.

The CLI prints `Error: <message>` and exits non-zero for any `LrmergeError`.
"""


class LrmergeError(Exception):
    """Base class: an expected failure with a one-line message for the user."""

    exit_code = 2


class RecipeError(LrmergeError):
    """The recipe YAML is malformed, has an unknown key, or a value out of range."""


class InputModelError(LrmergeError):
    """A source model is missing, unreadable, pickle-only, corrupt, or holds NaN/Inf."""


class IncompatibleModelsError(LrmergeError):
    """Source models differ in architecture, tensor names or shapes."""


class OutputError(LrmergeError):
    """The output path exists (without --overwrite) or lies inside an input folder."""


class ServeError(LrmergeError):
    """vLLM or the router is missing, cannot start, or died; a port is taken; an unsafe bind."""


class EvalError(LrmergeError):
    """lm-eval is missing or failed, no tasks cover the languages, or the endpoint is unreachable."""
