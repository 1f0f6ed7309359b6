"""The Hub client's exceptions as one-line errors that say how to fix them (pull, push and the
streamed reads all raise these)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import httpx2
from huggingface_hub import (
    get_token,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import HubAuthError, HubError, HubNotFoundError, HubOfflineError, HubRevisionError
from . import hosts

# every module that makes requests imports this one (or stream, which does the same): the
# client's answers are checked for other hosts before any request
hosts.install()


def token_hint(write: bool = False) -> str:
    if get_token() is None:
        return "set HF_TOKEN (or run `hf auth login`, or pass --token) with a token that can " + (
            "write to it" if write else "read it"
        )
    return "check that your token can " + ("write to it" if write else "read it")


@contextlib.contextmanager
def hub_errors(what: str, *, write: bool = False) -> Iterator[None]:
    """Turn the client's exceptions into one-line HubErrors that say how to fix them."""
    try:
        yield
    except GatedRepoError:
        raise HubAuthError(f"{what} is gated: accept its conditions on its Hub page, then {token_hint()}") from None
    except RevisionNotFoundError:
        raise HubRevisionError(f"{what}: no such branch, tag or commit on the Hub (check the part after '@')") from None
    except RepositoryNotFoundError:
        if get_token() is None:
            raise HubAuthError(f"{what}: not found, or private/gated: {token_hint(write)}") from None
        raise HubNotFoundError(
            f"{what}: repository not found (or your token cannot read it); check the id 'org/name'"
        ) from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise HubOfflineError(
            f"{what}: HF_HUB_OFFLINE is set and the files are not in the HF cache; pull it once online (`lrmerge pull`)"
        ) from None
    except httpx2.TransportError as e:
        raise HubOfflineError(
            f"{what}: cannot reach the Hub at {hf_constants.ENDPOINT} ({type(e).__name__}); "
            "check the network or proxy, or set HF_HUB_OFFLINE=1 to use the HF cache"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            raise HubAuthError(f"{what}: the Hub refused the token (HTTP {status}); {token_hint(write)}") from None
        raise HubError(f"{what}: the Hub answered HTTP {status}; try again later") from None
