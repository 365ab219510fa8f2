"""Texts for OBIM's calibration statistics and for perplexity objectives: a file, or an lm-eval
task's documents."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

TASK_PREFIX = "task:"


def read_calibration_texts(source: str | Path, limit: int = 256) -> list[str]:
    """Texts from a jsonl file (field ``text``, else ``prompt`` + ``target``) or a plain text file."""
    path = Path(source)
    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            for line in fh:
                row = json.loads(line)
                texts.append(row["text"] if "text" in row else row.get("prompt", "") + row.get("target", ""))
        else:
            texts = [line.rstrip("\n") for line in fh if line.strip()]
    if not texts:
        raise ValueError(f"calibration file '{path}' holds no text")
    return texts[:limit]


def calibration_texts(source: str, limit: int = 256, include_paths: Sequence[Path] = ()) -> list[str]:
    """``task:NAME`` reads the task's training documents (else validation, else test) as prompt +
    target; anything else is a jsonl/text file (see ``read_calibration_texts``)."""
    if not source.startswith(TASK_PREFIX):
        return read_calibration_texts(source, limit=limit)
    from evals.evaluator import task_manager

    name = source.removeprefix(TASK_PREFIX)
    manager = task_manager(include_paths)
    if name not in manager.all_tasks:
        raise ValueError(f"calibration task '{name}' is unknown")
    task = manager.load([name])["tasks"][name]
    if task.has_training_docs():
        found = task.training_docs()
    elif task.has_validation_docs():
        found = task.validation_docs()
    elif task.has_test_docs():
        found = task.test_docs()
    else:
        raise ValueError(f"calibration task '{name}' has no documents")
    texts = []
    for doc in list(found)[:limit]:
        target = task.doc_to_target(doc)
        if isinstance(target, int) and task.config.output_type == "multiple_choice":
            target = task.doc_to_choice(doc)[target]
        texts.append(f"{task.doc_to_text(doc)}{task.config.target_delimiter}{target}")
    return texts
