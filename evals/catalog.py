"""Checks of objectives against lm-eval's task index, for rejecting a spec at submission time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from evals.objective import COST_KINDS, Objective
from evals.texts import read_calibration_texts

log = logging.getLogger(__name__)


class TaskCatalog:
    """Task managers per set of YAML directories (lm-eval's built-ins indexed only when a task is
    found nowhere else); tasks are loaded (datasets read) at most once each."""

    def __init__(self) -> None:
        self._managers: dict[tuple[tuple[str, ...], bool], object] = {}
        self._loaded: dict[tuple[tuple[str, ...], str], object] = {}

    def _manager(self, paths: tuple[str, ...], name: str):
        from evals.evaluator import task_manager  # lm-eval loads at the first spec checked, not at start-up

        for defaults in (False, True):
            if (paths, defaults) not in self._managers:
                self._managers[(paths, defaults)] = task_manager([Path(p) for p in paths], defaults=defaults)
            manager = self._managers[(paths, defaults)]
            if name in manager.all_tasks:
                return manager
        return None

    def _task(self, name: str, paths: tuple[str, ...]):
        if (paths, name) not in self._loaded:
            self._loaded[(paths, name)] = self._manager(paths, name).load([name])["tasks"][name]
        return self._loaded[(paths, name)]

    def higher_is_better(self, objective: Objective, include_paths: Sequence[str] = ()) -> bool:
        """lm-eval's own direction for the objective's metric (True where the task does not say)."""
        for m in self._task(objective.task, tuple(include_paths)).config.metric_list or []:
            if m["metric"] == objective.metric:
                return bool(m.get("higher_is_better", True))
        return True

    def problem(self, objective: Objective, include_paths: Sequence[str] = ()) -> tuple[str, str] | None:
        """``(field, message)`` if the objective cannot be scored, else None."""
        if objective.kind in ("sparsity", *COST_KINDS):
            return None
        if objective.kind == "perplexity":
            try:
                read_calibration_texts(objective.data, limit=1)
            except (OSError, ValueError, KeyError) as exc:
                return "data", f"cannot read perplexity data: {exc}"
            return None
        paths = tuple(include_paths)
        if self._manager(paths, objective.task) is None:
            return "task", f"unknown task '{objective.task}' (not bundled, not in task_paths, not built into lm-eval)"
        try:
            task = self._task(objective.task, paths)
        except Exception as exc:  # a broken YAML or missing data file: report it, don't crash the server
            # The exception can quote the task's data (a template error names the value it met), and a
            # task may point at any file it can: say what failed, not what it read.
            log.warning("task '%s' cannot be loaded: %s", objective.task, exc)
            return "task", (f"task '{objective.task}' cannot be loaded ({type(exc).__name__}; the server's log "
                            "has the details)")
        metrics = [m["metric"] for m in task.config.metric_list or []]
        if objective.metric not in metrics:
            return "metric", f"task '{objective.task}' has no metric '{objective.metric}' (it has {metrics})"
        filters = [f["name"] for f in task.config.filter_list or []] or ["none"]
        if objective.filter not in filters:
            return "filter", f"task '{objective.task}' has no filter '{objective.filter}' (it has {filters})"
        return None
