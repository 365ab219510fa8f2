"""MergeConfig: everything that determines one merged model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExpertRef:
    name: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None  # OBIM's calibration texts (jsonl or text file)


@dataclass(frozen=True)
class MergeConfig:
    method: str
    base: str
    experts: tuple[ExpertRef, ...]
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # seeds DARE/DELLA's random masks, per tensor

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeConfig:
        experts = tuple(ExpertRef(**e) for e in data["experts"])
        return cls(method=data["method"], base=data["base"], experts=experts,
                   params=dict(data.get("params", {})), seed=int(data.get("seed", 0)))

    def experts_identity(self) -> list[tuple[str, str, str | None]]:
        """What determines the resident state (not the per-trial parameters)."""
        return [(e.name, e.path, e.calibration) for e in self.experts]

    def fingerprint(self) -> str:
        """A stable hash of the merge: equal configs give equal models."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
