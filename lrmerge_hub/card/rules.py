"""Our own rule for a card's text: it never contains a token, a local absolute path or this
machine's user name (`check_card_text`). The Hub's metadata rules are in `lrmerge_hub.metadata`."""

from __future__ import annotations

import getpass
import os
import re
from pathlib import Path

from ..errors import CardError, shown

# System accounts whose names are not personal (and are ordinary words in a card).
GENERIC_ACCOUNTS = frozenset({"root", "runner", "ubuntu", "user", "admin", "nobody"})
TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
ABSOLUTE_PATH = re.compile(
    r"(?:^|[\s\"'(=:`\[])((?:/(?:home|Users|root|tmp|var|mnt|opt|srv|work|data|scratch|private)"
    r"|[A-Za-z]:\\)[^\s\"'`)\]]*)"
)


def machine_secrets(model_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Strings a card must never contain: tokens, this machine's paths and user name."""
    found = [str(Path(model_dir).resolve()), str(Path.home()), os.getcwd(), os.environ.get("HF_TOKEN", "")]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    if user and user not in GENERIC_ACCOUNTS:
        found.append(user)
    return [s for s in [*found, *extra] if s and len(s) > 1 and s != "/"]


def check_card_text(text: str, secrets: list[str]) -> None:
    """Raise CardError when the card would leak a token, a local absolute path or a user name."""
    if TOKEN_PATTERN.search(text):
        raise CardError("card: the text would contain a Hugging Face token; nothing was written")
    for secret in secrets:
        pattern = re.escape(secret) if "/" in secret or "\\" in secret else rf"\b{re.escape(secret)}\b"
        if re.search(pattern, text):
            is_token = secret.startswith("hf_") or secret == os.environ.get("HF_TOKEN")
            what = "a token" if is_token else "a local path or user name"
            raise CardError(f"card: the text would contain {what} from this machine; nothing was written")
    match = ABSOLUTE_PATH.search(text)
    if match:
        raise CardError(
            f"card: the text would contain the local path {shown(match.group(1))}; nothing was written "
            "(name local models by folder name, or give them a hub_id)"
        )
