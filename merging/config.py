"""MergeConfig: everything that determines one merged model."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Grouping:
    """mergekit-evolve's granularity: ``layer_groups`` consecutive layers share one parameter set,
    and each tensor ``filter`` (a substring such as ``self_attn`` or ``mlp``) gets its own."""

    layer_groups: int | None = None
    num_layers: int | None = None
    filters: tuple[str, ...] = ()

    def _layer_parts(self) -> list[str]:
        if not self.layer_groups or not self.num_layers:
            return ["all"]
        n = self.layer_groups
        return [f"L{i}-{min(i + n, self.num_layers) - 1}" for i in range(0, self.num_layers, n)] + ["rest"]

    def groups(self) -> list[str]:
        filters = [*self.filters, "other"] if self.filters else ["all"]
        return [f"{layer}/{f}" for layer in self._layer_parts() for f in filters]

    def group_of(self, tensor: str) -> str:
        layer = "all"
        if self.layer_groups and self.num_layers:
            match = LAYER.search(tensor)
            if match:
                start = int(match.group(1)) // self.layer_groups * self.layer_groups
                layer = f"L{start}-{min(start + self.layer_groups, self.num_layers) - 1}"
            else:
                layer = "rest"  # embeddings, final norm, lm_head
        part = "all"
        if self.filters:
            part = next((f for f in self.filters if f in tensor), "other")
        return f"{layer}/{part}"


@dataclass(frozen=True)
class ExpertRef:
    name: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None  # OBIM's calibration texts (jsonl or text file)
    group_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> params overriding params

    def params_for(self, group: str | None) -> dict[str, Any]:
        return {**self.params, **self.group_params.get(group, {})} if group else dict(self.params)


@dataclass(frozen=True)
class MergeConfig:
    method: str
    base: str
    experts: tuple[ExpertRef, ...]
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # seeds DARE/DELLA's random masks, per tensor
    grouping: Grouping | None = None
    dtype: str | None = None  # what the model is held and written in; None: the checkpoint's own

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["dtype"] is None:  # configs from before the option keep their fingerprints (results cache keys)
            del data["dtype"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeConfig:
        experts = tuple(ExpertRef(**e) for e in data["experts"])
        grouping = data.get("grouping")
        if grouping is not None:
            grouping = Grouping(grouping.get("layer_groups"), grouping.get("num_layers"),
                                tuple(grouping.get("filters") or ()))
        return cls(method=data["method"], base=data["base"], experts=experts,
                   params=dict(data.get("params", {})), seed=int(data.get("seed", 0)), grouping=grouping,
                   dtype=data.get("dtype"))

    def experts_identity(self) -> list[tuple[str, str, str | None]]:
        """What determines the resident state (not the per-trial parameters)."""
        return [(e.name, e.path, e.calibration) for e in self.experts]

    def fingerprint(self) -> str:
        """A stable hash of the merge: equal configs give equal models."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
