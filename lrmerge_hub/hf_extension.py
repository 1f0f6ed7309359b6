"""`hf lrmerge`: register this installation with the Hugging Face CLI as its `lrmerge` extension.

The `hf` CLI runs `hf NAME ...` only for extensions it has a manifest for under
`~/.local/share/hf/extensions/hf-NAME/` (written by `hf extensions install OWNER/hf-NAME`,
which pip-installs a GitHub repository into a venv of its own). A console script that is
merely on PATH is not dispatched. This writes the same manifest, with the client's own
`ExtensionManifest`, pointing at the `hf-lrmerge` script installed next to this Python, so
`hf lrmerge` runs the lrmerge you installed, in your environment, with nothing fetched.
"""

from __future__ import annotations

import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from .errors import LrmergeError

SHORT_NAME = "lrmerge"
SCRIPT = f"hf-{SHORT_NAME}"


def installed_script() -> Path:
    """The `hf-lrmerge` console script of this environment (beside this Python, else on PATH)."""
    beside = Path(sys.executable).parent / SCRIPT
    found = beside if beside.is_file() else (Path(p) if (p := shutil.which(SCRIPT)) else None)
    if found is None:
        raise LrmergeError(
            f"no `{SCRIPT}` script next to {sys.executable} or on PATH; install lrmerge-hub "
            "(`pip install -e .`) in this environment first"
        )
    return found.resolve()


def extension_dir() -> Path:
    """Where the `hf` CLI looks for this extension's manifest."""
    from huggingface_hub.cli.extensions import EXTENSIONS_ROOT

    return EXTENSIONS_ROOT.expanduser() / SCRIPT


def install(*, force: bool = False) -> Path:
    """Write the manifest that makes `hf lrmerge` run this installation; returns the script it runs.

    Raises:
        LrmergeError: another `hf-lrmerge` extension is registered (pass force=True to replace it),
            or no `hf-lrmerge` script is installed here.
    """
    from huggingface_hub.cli.extensions import ExtensionManifest

    script = installed_script()
    folder = extension_dir()
    if folder.exists() and not force:
        try:
            current = Path(ExtensionManifest.load(folder).executable_path).expanduser()
        except Exception:  # a broken or foreign manifest: replacing it is the user's call
            current = None
        if current != script:
            raise LrmergeError(
                f"`hf {SHORT_NAME}` is already registered ({folder}, running {current}); "
                "pass --force to point it at this installation"
            )
    ExtensionManifest(
        owner="local",
        repo=SCRIPT,
        repo_id=f"local/{SCRIPT}",
        short_name=SHORT_NAME,
        executable_path=str(script),
        type="python",
        installed_at=datetime.now(timezone.utc),
        description="Merge, card, push, serve and evaluate low-resource-language models "
        "(lrmerge-hub, installed locally)",
    ).save(folder)
    return script


def remove() -> bool:
    """Forget the registration (the package stays installed); False when there was none."""
    folder = extension_dir()
    if not folder.exists():
        return False
    shutil.rmtree(folder)
    return True
