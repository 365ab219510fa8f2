"""Loader that lm-eval calls (``custom_dataset: !function utils.load``) for the bundled tasks.

lm-eval resolves ``!function`` relative to the YAML file, so the tasks work from any working
directory; plain ``data_files`` paths would resolve against the caller's cwd instead.
"""

from pathlib import Path

import datasets

DATA_DIR = Path(__file__).parent / "data"


def load(task_name: str, **_metadata) -> datasets.DatasetDict:
    files = {split: str(DATA_DIR / task_name / f"{split}.jsonl") for split in ("train", "validation", "test")}
    return datasets.load_dataset("json", data_files=files)
