"""Where a model named in a spec lives on this machine: a directory as given, or a Hugging Face
hub id found in (or, when online, downloaded into) the local hub cache.

Specs name models the same way for every machine of a deployment; each worker resolves them
against what it can see, and says plainly what is missing when it cannot.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from merging.errors import MergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


class ModelNotFound(MergeError):
    """A model reference that is neither a directory here nor obtainable from the hub cache."""


def is_hub_id(ref: str | Path) -> bool:
    text = str(ref)
    return bool(_HUB_ID.match(text)) and not Path(text).exists() and ".." not in text


def locate(ref: str | Path, *, download: bool = True) -> Path:
    """A local directory holding ``ref``'s files. Hub ids come from the hub cache first; they are
    downloaded only with ``download`` and when huggingface_hub is not offline (its own
    ``constants.HF_HUB_OFFLINE``, which it reads from HF_HUB_OFFLINE at import; we read no
    environment here: the service's Settings decide ``download``)."""
    path = Path(ref)
    if path.is_dir():
        return path
    if not is_hub_id(ref):
        raise ModelNotFound(f"model '{ref}': no such directory on {socket.gethostname()}")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(str(ref), local_files_only=True, allow_patterns=_FILES))
    except Exception:  # noqa: BLE001 - any miss of the cache means: not here
        pass
    if not download or constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"model '{ref}' is neither a directory on {socket.gethostname()} nor in its Hugging "
                            f"Face cache ({constants.HF_HUB_CACHE}); download it there (`hf download {ref}`) "
                            "or name a path the workers can see")
    try:
        return Path(snapshot_download(str(ref), allow_patterns=_FILES))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: one clear message
        raise ModelNotFound(f"model '{ref}': cannot download it from the Hugging Face hub: {exc}") from exc
