"""Per-tensor parameters of a merge: the method's parameters resolved once per tensor group."""

from __future__ import annotations

from typing import Any

from merging.config import MergeConfig
from merging.methods import MergeMethod, get_method


class MergePlan:
    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.method: MergeMethod = get_method(config.method)
        self.names = [e.name for e in config.experts]
        self._resolved: dict[str | None, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
        groups = config.grouping.groups() if config.grouping else [None]
        for group in groups:  # every group up front: a bad parameter fails before any tensor
            self._resolve(group)

    def _resolve(self, group: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if group not in self._resolved:
            self._resolved[group] = self.method.resolve([e.params_for(group) for e in self.config.experts],
                                                        self.config.params, self.names)
        return self._resolved[group]

    def params_for(self, tensor: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        group = self.config.grouping.group_of(tensor) if self.config.grouping else None
        return self._resolve(group)
