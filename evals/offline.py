"""Whether lm-eval, datasets and transformers may reach the Hugging Face hub.

Nothing here runs at import: a command calls ``set_offline`` once, before anything imports
``datasets``, ``huggingface_hub`` or lm-eval (they read these variables when they import).
"""

import os

HUB_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def set_offline(offline: bool) -> None:
    """Default the hub variables to offline (``"1"``) or online (``"0"``); a value already in the
    environment wins. Also turns tokenizers' thread pool off (``TOKENIZERS_PARALLELISM=false``)
    unless set: it warns and can deadlock once a process forks."""
    for var in HUB_VARIABLES:
        os.environ.setdefault(var, "1" if offline else "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
