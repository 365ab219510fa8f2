"""Texts for OBIM's calibration statistics and for perplexity objectives: a file, or an lm-eval
task's documents."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

TASK_PREFIX = "task:"
DEFAULT_LIMIT = 256  # texts read for OBIM statistics and for a perplexity objective
MAX_FILE_BYTES = 2**30  # a calibration or perplexity file larger than this is refused
MAX_LINE_BYTES = 2**20  # one text (one line) longer than this is refused


def within_roots(path: str | Path, roots: Sequence[str | Path]) -> bool:
    """Whether ``path``, links followed, lies in (or is) one of ``roots`` (links followed too)."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(os.path.realpath(r)) for r in roots)


def _opened_path(fd: int, path: Path) -> str:
    """The file an open descriptor reads (Linux's /proc), else the path's real path."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def _open_regular(path: Path, max_bytes: int, roots: Sequence[Path] | None = None):
    """``path`` opened for reading if it is a regular file of at most ``max_bytes``: never a device
    (/dev/zero), a FIFO (which would block) or a directory. Opened first, checked on the open file,
    so what is checked is what is read. With ``roots``, a file missing or outside them gets the same
    answer (no way to learn which files exist elsewhere), checked before opening and on what opened."""
    outside = ValueError(f"'{path}' is not a file under the server's data roots")
    if roots is not None:
        try:
            if not within_roots(path, roots):
                raise outside
        except (OSError, ValueError):
            raise outside from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if roots is not None and isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            raise outside from None
        raise
    try:
        if roots is not None and not within_roots(_opened_path(fd, path), roots):
            raise outside
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"'{path}' is not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"'{path}' is {info.st_size} bytes, more than the {max_bytes} allowed")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _lines(fh, path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file, each line bounded by MAX_LINE_BYTES."""
    for number in range(1, 2**62):
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            raise ValueError(f"'{path}' line {number} is longer than {MAX_LINE_BYTES} bytes")
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"'{path}' line {number} is not UTF-8 text ({exc.reason})") from None


def _jsonl_text(line: str, path: Path, number: int) -> str:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"'{path}' line {number} is not JSON: {exc}") from None
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if (isinstance(row, dict) and ("prompt" in row or "target" in row)
            and all(isinstance(row.get(k, ""), str) for k in ("prompt", "target"))):
        return row.get("prompt", "") + row.get("target", "")
    raise ValueError(f"'{path}' line {number} is not an object with a string 'text' (or 'prompt' and "
                     f"'target'): {line.strip()[:80]!r}")


def read_calibration_texts(source: str | Path, limit: int = DEFAULT_LIMIT, *,
                           max_bytes: int = MAX_FILE_BYTES, roots: Sequence[Path] | None = None) -> list[str]:
    """The first ``limit`` texts of a jsonl file (field ``text``, else ``prompt`` + ``target``) or a
    plain text file (one text a non-blank line). A file that is not a regular one of at most
    ``max_bytes`` (or, with ``roots``, not under one of them), a line that is not such an object, or
    no text at all is a ValueError."""
    path = Path(source)
    texts: list[str] = []
    with _open_regular(path, max_bytes, roots) as fh:
        for number, line in _lines(fh, path):
            if len(texts) >= limit:
                break
            if not line.strip():
                continue
            texts.append(_jsonl_text(line, path, number) if path.suffix == ".jsonl" else line.rstrip("\r\n"))
    if not texts:
        raise ValueError(f"calibration file '{path}' holds no text")
    return texts


def calibration_texts(source: str, limit: int = DEFAULT_LIMIT, include_paths: Sequence[Path] = ()) -> list[str]:
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
