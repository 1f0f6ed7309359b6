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


class CardError(LrmergeError):
    """The model card cannot be written: bad language code, license conflict, missing
    merge report, or text that would leak a token or a local path."""
