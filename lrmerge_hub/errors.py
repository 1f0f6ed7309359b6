"""One exception type per cause; every message is one line that says what to do next.

The CLI prints `Error: <message>` and exits non-zero for any `LrmergeError`; an error's
`detail` (a log's last lines) follows on lines of its own.
"""

import reprlib


class LrmergeError(Exception):
    """Base class: an expected failure with a one-line message for the user. `detail`, when
    given, is printed below that line as it is (e.g. the last lines of a child's log)."""

    exit_code = 2

    def __init__(self, *args: object, detail: str | None = None):
        super().__init__(*args)
        self.detail = detail


class RecipeError(LrmergeError):
    """The recipe YAML is malformed, has an unknown key, or a value out of range."""


class InputModelError(LrmergeError):
    """A source model is missing, unreadable, pickle-only, corrupt, or holds NaN/Inf."""


class IncompatibleModelsError(LrmergeError):
    """Source models differ in architecture, tensor names or shapes."""


class NonFiniteOutputError(LrmergeError):
    """A merged tensor came out NaN or Inf (a weight or lambda too large for float32, or
    values beyond the output dtype's range); nothing is written."""


class ZeroOutputError(LrmergeError):
    """A merged tensor came out all zeros although none of its inputs is (a parameter that
    scales or filters everything away): a broken model; nothing is written."""


class DeviceError(LrmergeError):
    """The compute device cannot hold the merge: too little free GPU memory for its largest tensor."""


class OutputError(LrmergeError):
    """The output path exists (without --overwrite), appeared during the merge, is being
    written by another merge, or lies inside an input folder."""


class HubError(LrmergeError):
    """Talking to the Hugging Face Hub failed; the message says what to change."""


class HubNotFoundError(HubError):
    """The repo does not exist (or the token cannot see it)."""


class HubRevisionError(HubError):
    """The repo has no such branch, tag or commit."""


class HubAuthError(HubError):
    """A private or gated repo without a (good) token, or a token without write access."""


class HubOfflineError(HubError):
    """The Hub cannot be reached (or HF_HUB_OFFLINE is set) and the model is not in the HF cache."""


class PickleOnlyRepoError(HubError):
    """The repo ships only pickle weights (.bin/.pt), which lrmerge never loads."""


class HubIntegrityError(HubError):
    """Bytes read from the Hub do not hash to the sha256 the Hub lists for their file."""


class HubPushError(HubError):
    """A push failed; the remote repo was left as it was and the push can be re-run."""


class HubUntrustedHostError(HubPushError):
    """The Hub's answer would send the token, or the model's bytes, to a host other than the
    Hub endpoint (or its storage); refused before anything was sent."""


class CardError(LrmergeError):
    """The model card cannot be written: bad language code, license conflict, missing
    merge report, or text that would leak a token or a local path."""


class ServeError(LrmergeError):
    """vLLM or the router is missing, cannot start, or died; a port is taken; an unsafe bind."""


class EvalError(LrmergeError):
    """lm-eval is missing or failed, no tasks cover the languages, or the endpoint is unreachable."""


def shown(value: object, limit: int = 60) -> str:
    """A short repr of `value` for error messages: at most `limit` characters, a few levels
    and items of a container, so a message stays one short line whatever a file holds (a
    huge string, a YAML bomb, a newline in a name)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"
    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxdict, brief.maxtuple, brief.maxset = 3, 4, 4, 4, 4
    brief.maxstring = brief.maxother = brief.maxlong = limit
    try:
        text = brief.repr(value)
    except ValueError:  # an integer too long to print
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ClusterError(LrmergeError):
    """Ray is missing, the cluster cannot be reached, or no node can hold a task's resources."""


class ClusterLostError(ClusterError):
    """The Ray cluster's head stopped answering mid-run: what had not finished was not built."""


class ReproducibilityError(LrmergeError):
    """The driver's re-merge of a unit does not hash to what the worker that ran it reported."""


class RunsFailedError(LrmergeError):
    """Some releases of a batch (`lrmerge run A.yaml B.yaml`) failed; each summary says why."""


class DegenerateInput(ValueError):
    """The inputs leave a method without a defined result (e.g. antipodal vectors)."""
