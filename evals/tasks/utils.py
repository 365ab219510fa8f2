"""Loader that lm-eval calls (``custom_dataset: !function utils.load``) for the bundled tasks.

lm-eval resolves ``!function`` relative to the YAML file, so the tasks work from any working
directory; plain ``data_files`` paths would resolve against the caller's cwd instead.
"""

import re
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).parent / "data"
_TASK_NAME = re.compile(r"^[a-z_]+$")


def load(task_name: str, **_metadata) -> datasets.DatasetDict:
    # A task YAML elsewhere may include a bundled one and set ``task_name``: only bundled data.
    if not isinstance(task_name, str) or not _TASK_NAME.match(task_name) or not (DATA_DIR / task_name).is_dir():
        raise ValueError(f"no bundled task data named {task_name!r}")
    files = {split: str(DATA_DIR / task_name / f"{split}.jsonl") for split in ("train", "validation", "test")}
    return datasets.load_dataset("json", data_files=files)
