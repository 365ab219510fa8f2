"""Objectives: what a trial is scored on."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Objective:
    """One score of a trial: an lm-eval task's metric on a fixed seeded subset of its documents."""

    task: str
    metric: str = "exact_match"
    filter: str = "none"
    direction: Direction = "maximize"
    samples: int | None = 100  # None: every document of the evaluation split
    seed: int = 0

    @property
    def key(self) -> str:
        """The name results are stored under: lm-eval's ``metric,filter`` joined to the task."""
        return f"{self.task}:{self.metric}"

    def doc_ids(self, n_docs: int) -> list[int]:
        """The fixed subset: same ids for every trial and every call."""
        if self.samples is None or self.samples >= n_docs:
            return list(range(n_docs))
        return sorted(random.Random(f"{self.task}:{self.seed}").sample(range(n_docs), self.samples))
