"""Checks of objectives against lm-eval's task index, for rejecting a spec at submission time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evals.evaluator import task_manager
from evals.objective import Objective


class TaskCatalog:
    """One TaskManager; tasks are loaded (datasets read) at most once each."""

    def __init__(self, include_paths: Sequence[Path] = ()) -> None:
        self.manager = task_manager(include_paths)
        self._loaded: dict[str, object] = {}

    def _task(self, name: str):
        if name not in self._loaded:
            self._loaded[name] = self.manager.load([name])["tasks"][name]
        return self._loaded[name]

    def higher_is_better(self, objective: Objective) -> bool:
        """lm-eval's own direction for the objective's metric (True where the task does not say)."""
        for m in self._task(objective.task).config.metric_list or []:
            if m["metric"] == objective.metric:
                return bool(m.get("higher_is_better", True))
        return True

    def problem(self, objective: Objective) -> tuple[str, str] | None:
        """``(field, message)`` if the objective cannot be scored, else None."""
        if objective.kind == "sparsity":
            return None
        if objective.kind == "perplexity":
            from merging.saliency import read_calibration_texts

            try:
                read_calibration_texts(objective.data, limit=1)
            except (OSError, ValueError, KeyError) as exc:
                return "data", f"cannot read perplexity data: {exc}"
            return None
        if objective.task not in self.manager.all_tasks:
            return "task", f"unknown task '{objective.task}'"
        try:
            task = self._task(objective.task)
        except Exception as exc:  # a broken YAML or missing data file: report it, don't crash the server
            return "task", f"task '{objective.task}' cannot be loaded: {exc}"
        metrics = [m["metric"] for m in task.config.metric_list or []]
        if objective.metric not in metrics:
            return "metric", f"task '{objective.task}' has no metric '{objective.metric}' (it has {metrics})"
        filters = [f["name"] for f in task.config.filter_list or []] or ["none"]
        if objective.filter not in filters:
            return "filter", f"task '{objective.task}' has no filter '{objective.filter}' (it has {filters})"
        return None
