"""Objectives: what a trial is scored on."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Direction = Literal["maximize", "minimize"]
Kind = Literal["lm_eval", "sparsity", "perplexity", "tokens", "latency"]
COST_KINDS = ("tokens", "latency")  # measured in the lm_eval objectives' evaluation pass


def objective_key(kind: str, task: str | None, metric: str, filter: str, data: str | None) -> str:
    """An objective's name in results, fronts and a spec's ``reference_point``."""
    if kind == "sparsity":
        return "sparsity"
    if kind == "perplexity":
        return f"perplexity:{Path(data or '').stem}"
    if kind == "latency":
        return "latency"
    if kind == "tokens":
        return "tokens" if task is None else f"tokens:{task}"
    return f"{task}:{metric}" + ("" if filter == "none" else f",{filter}")


@dataclass(frozen=True)
class Objective:
    """One score of a trial.

    ``lm_eval``: a task's metric on a fixed seeded subset of its documents. ``sparsity``:
    MM-MO's ``sum |theta_merged - theta_base|`` (minimise). ``perplexity``: of the merged model
    on the texts of ``data`` (a jsonl with ``text`` or ``prompt``/``target``, or a text file).
    ``tokens``: mean tokens generated per item of the generation tasks among the ``lm_eval``
    objectives (or of ``task``), and ``latency``: seconds per item of those objectives'
    evaluation, both measured in the same pass as their scores (minimise: AP-BMM's cost axes).
    """

    task: str | None = None
    metric: str = "exact_match"
    filter: str = "none"
    direction: Direction = "maximize"
    samples: int | None = 100  # None: every document of the evaluation split
    seed: int = 0
    kind: Kind = "lm_eval"
    data: str | None = None

    @property
    def key(self) -> str:
        """The name results are stored and shown under."""
        return objective_key(self.kind, self.task, self.metric, self.filter, self.data)

    def identity(self) -> str:
        """Everything that determines the value for a given model: the results-cache key."""
        fields = {k: v for k, v in asdict(self).items() if k != "direction"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def doc_ids(self, n_docs: int) -> list[int]:
        """The fixed subset: same ids for every trial and every call."""
        if self.samples is None or self.samples >= n_docs:
            return list(range(n_docs))
        return sorted(random.Random(f"{self.task}:{self.seed}").sample(range(n_docs), self.samples))

    def window_ids(self, n_docs: int, first: int, end: int) -> list[int]:
        """Items ``first`` .. ``end`` of the subset in a fixed seeded order: nested windows from 0 are
        nested subsets, so a multi-fidelity rung scores only the items the earlier rungs did not."""
        ids = self.doc_ids(n_docs)
        ordered = random.Random(f"{self.task}:{self.seed}:rungs").sample(ids, len(ids))
        return sorted(ordered[first:end])
