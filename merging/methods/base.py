"""The small base every merge method implements: one tensor in, one merged tensor out."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from merging.errors import MergeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Param:
    """A method parameter as mergekit names it; ``default=None`` means required."""

    name: str
    default: float | bool | str | None = None
    low: float | None = None  # inclusive unless low_open
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()  # for a string parameter

    def check(self, value: Any, where: str) -> None:
        if self.choices:
            if value not in self.choices:
                raise MergeError(f"{where}: '{self.name}' must be one of {list(self.choices)}, got {value!r}")
            return
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise MergeError(f"{where}: '{self.name}' must be true or false, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeError(f"{where}: '{self.name}' must be a number, got {value!r}")
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            bound = "(" if self.low_open else "["
            raise MergeError(f"{where}: '{self.name}' = {value} is outside {bound}{self.low}, {self.high}]")
        if self.high is not None and value > self.high:
            raise MergeError(f"{where}: '{self.name}' = {value} is above {self.high}")


@dataclass(frozen=True)
class Inert:
    """A parameter mergekit declares for a method but that changes nothing there (``density`` on
    task_arithmetic: mergekit declares it for its whole task-arithmetic family). Accepted, so that
    every configuration mergekit takes is taken, with a warning saying why it has no effect."""

    param: Param
    why: str


WEIGHT = Param("weight")
DENSITY = Param("density", 1.0, low=0.0, high=1.0)
LAMBDA = Param("lambda", 1.0)


@dataclass
class TensorInputs:
    """What a method sees of one tensor, in float32: the base, each expert's delta (methods that
    take ``deltas``) or each expert's own tensor (methods that take ``models``), its seeded RNG and key,
    and per expert the input-channel energy of this tensor's layer (None where not collected)."""

    name: str
    base: Tensor
    deltas: list[Tensor]
    generator: torch.Generator | None = None
    stats: list[Tensor | None] | None = None
    owned: bool = False  # the inputs are this call's to overwrite (temporaries, never held tensors)
    models: list[Tensor] | None = None  # the experts' own tensors, for methods that take ``models``
    has_base: bool = True  # False: the config named no base_model (``base`` is only the layout)
    key: int = 0  # the tensor's counter-based draws (``merging.kernels.rng``): DARE's and DELLA's masks
    # per expert, a saliency threshold shared by all its tensors (OBIM's global scope, ``merging.budget``)
    thresholds: list[float | None] | None = None


class MergeMethod(ABC):
    """A merge method. Subclasses declare their parameters and implement ``merge``.

    The parameters are scoped as mergekit scopes them: ``expert_params`` per model (mergekit's
    per-input "tensor parameters"; a value under the global ``parameters`` is every model's
    default), ``global_params`` only under ``parameters`` (mergekit's shared ones), and
    ``inert_params`` declared by mergekit for the method but without effect there. Every key
    given is either honoured, or accepted with a warning where mergekit accepts and ignores it,
    or refused with a message; none is silently dropped.

    Parameters are resolved before any tensor is merged (``resolve``), so ``merge`` reads plain
    dicts whose keys are guaranteed present and in range.
    """

    name: ClassVar[str]
    uses_rng: ClassVar[bool] = False  # whether the merge depends on the seed (DARE, DELLA)
    # What ``merge`` is given per expert: ``deltas`` (``expert - base``) or the experts' own tensors
    # (``models``: interpolations, averages, which mergekit computes on the weights themselves, so
    # rebuilding them as ``base + delta`` would cost an ulp).
    takes: ClassVar[str] = "deltas"
    needs_base: ClassVar[bool] = True  # False: a config without base_model takes its first model as the base
    base_is_input: ClassVar[bool] = False  # mergekit merges the base_model in as one more input (linear)
    # Without a base_model, mergekit merges the models themselves (nuslerp, multislerp); with one, their
    # task vectors. The config's first model then only gives the layout (``MergeConfig.base_input``).
    base_optional: ClassVar[bool] = False
    expert_params: ClassVar[tuple[Param, ...]] = ()
    global_params: ClassVar[tuple[Param, ...]] = ()
    inert_params: ClassVar[tuple[Inert, ...]] = ()

    def resolve(
        self, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any], expert_names: Sequence[str]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Fill defaults (a global value is the default for every expert, as in mergekit), check ranges.

        Raises:
            MergeError: a key the method does not know (mergekit does not declare it for this method
                either), a required parameter missing, or a value of the wrong type or out of range.
        """
        inert = {i.param.name: i for i in self.inert_params}
        global_names = {p.name for p in self.global_params}
        known = {p.name for p in self.expert_params} | global_names | set(inert)
        for where, given in [("parameters", params)] + [
            (f"model '{n}'", e) for n, e in zip(expert_names, experts, strict=True)
        ]:
            unknown = sorted(set(given) - known)
            if unknown:
                raise MergeError(
                    f"{where}: unknown parameter(s) {unknown} for method '{self.name}'; known: {sorted(known)}"
                )
            for key in sorted(set(given) & set(inert)):
                inert[key].param.check(given[key], where)
                self._warn(f"{where}: '{key}' has no effect with method '{self.name}' ({inert[key].why}); "
                           "accepted and ignored, as mergekit does")
            if where != "parameters":
                for key in sorted(set(given) & global_names):
                    self._warn(f"{where}: '{key}' is a global parameter of method '{self.name}'; mergekit reads it "
                               "only under `parameters` and ignores it under a model, and so does mmmo")
        resolved_global = {}
        for p in self.global_params:
            value = params.get(p.name, p.default)
            p.check(value, "parameters")
            resolved_global[p.name] = value
        resolved_experts = []
        for name, given in zip(expert_names, experts, strict=True):
            row = {}
            for p in self.expert_params:
                value = given.get(p.name, params.get(p.name, p.default))
                if value is None:
                    raise MergeError(f"model '{name}': parameter '{p.name}' is required by method '{self.name}'")
                p.check(value, f"model '{name}'")
                row[p.name] = value
            resolved_experts.append(row)
        return resolved_experts, resolved_global

    def _warn(self, message: str) -> None:
        # Once per method object, i.e. once per merge: a merge resolves its parameters once per
        # distinct set of values (per layer where they vary), and should say each thing once.
        warned = self.__dict__.setdefault("_warned", set())
        if message not in warned:
            warned.add(message)
            log.warning(message)

    def stats_reading(self, params: Mapping[str, Any]) -> str | None:
        """Which calibration statistics (``TensorInputs.stats``) a merge with these global
        parameters reads: a key of the merger's ``stats``; None for methods that read none."""
        return None

    @abstractmethod
    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        """Return the merged tensor (same shape as ``t.base``) in ``t.base``'s dtype."""
