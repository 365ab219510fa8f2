"""The bundled synthetic tasks: generators for the jsonl files under ``evals/tasks/data``.

Each task has its own separator and output alphabet so that experts trained on different
tasks touch different parts of a tiny model. The files are committed; this module
regenerates them byte for byte (``python -m evals.synthetic``).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "tasks" / "data"
SPLIT_SIZES = {"test": 300, "validation": 300, "train": 4000}
N_CHOICES = 4


@dataclass(frozen=True)
class SyntheticTask:
    """One task: ``make`` draws a (prompt, target) pair, ``near_misses`` plausible wrong answers."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    near_misses: Callable[[str, random.Random], list[str]]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))


def _swap_two(text: str, rng: random.Random) -> str:
    i, j = rng.sample(range(len(text)), 2)
    chars = list(text)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


def _change_one(text: str, alphabet: str, rng: random.Random) -> str:
    i = rng.randrange(len(text))
    return text[:i] + rng.choice([c for c in alphabet if c != text[i]]) + text[i + 1 :]


def _make_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


def _add_misses(target: str, rng: random.Random) -> list[str]:
    value = int(target)
    return [str(value + d) for d in (1, -1, 10, -10, 2, -2) if value + d >= 0]


def _make_reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"{word}>", word[::-1]


def _make_sort(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"{word}#", "".join(sorted(word))


def _shift_upper(word: str) -> str:
    return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("A")) for c in word)


def _make_upper(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"{word}^", _shift_upper(word)


def _letter_misses(alphabet: str) -> Callable[[str, random.Random], list[str]]:
    def misses(target: str, rng: random.Random) -> list[str]:
        out = [_change_one(target, alphabet, rng) for _ in range(4)]
        if len(set(target)) > 1:
            out += [_swap_two(target, rng) for _ in range(4)]
        return out

    return misses


TASKS: dict[str, SyntheticTask] = {
    "add": SyntheticTask("add", _make_add, _add_misses),
    "reverse": SyntheticTask("reverse", _make_reverse, _letter_misses(string.ascii_lowercase)),
    "sort": SyntheticTask("sort", _make_sort, _letter_misses(string.ascii_lowercase)),
    "upper": SyntheticTask("upper", _make_upper, _letter_misses(string.ascii_uppercase)),
}


def _choices(task: SyntheticTask, target: str, rng: random.Random) -> tuple[list[str], int]:
    wrong = [m for m in dict.fromkeys(task.near_misses(target, rng)) if m != target]
    choices = [target, *rng.sample(wrong, min(N_CHOICES - 1, len(wrong)))]
    rng.shuffle(choices)
    return choices, choices.index(target)


def generate(task: SyntheticTask, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint splits of unique prompts (test first, so test never changes with train size)."""
    rng = random.Random(f"{task.name}-{seed}")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in SPLIT_SIZES.items():
        rows: list[dict] = []
        while len(rows) < size:
            prompt, target = task.make(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            choices, gold = _choices(task, target, rng)
            rows.append({"prompt": prompt, "target": target, "choices": choices, "gold": gold})
        splits[split] = rows
    return splits


def write_all(data_dir: Path = DATA_DIR) -> None:
    for task in TASKS.values():
        out = data_dir / task.name
        out.mkdir(parents=True, exist_ok=True)
        for split, rows in generate(task).items():
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in rows)


def read_split(task_name: str, split: str, data_dir: Path = DATA_DIR) -> list[dict]:
    with open(data_dir / task_name / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


if __name__ == "__main__":
    write_all()
