"""Per-tensor parameters of a merge: each setting (scalar, gradient or filtered, per expert and
global, per searched group) evaluated for the tensor, then checked by the method.

mergekit resolves every parameter per tensor: the first ``filter`` entry found in the tensor's name
wins, a gradient is interpolated at the tensor's layer position (:func:`merging.config.layer_position`),
and a per-model setting that gives no value for a tensor falls back to the global ``parameters``,
then to the method's default. The concrete values go through ``method.resolve``, once per distinct
combination (a 70-layer gradient resolves about 70 times, not once per tensor).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from merging.config import MergeConfig, Scalar, Setting, layer_position, parse_settings
from merging.errors import MergeError
from merging.methods import MergeMethod, get_method

Resolved = tuple[list[dict[str, Any]], dict[str, Any]]
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def base_layer_count(base: str) -> int:
    """The base's layer count from its config.json (mergekit's ``num_hidden_layers`` and kin)."""
    from merging.io import model_dir  # torch and the hub client: only for configs that need it

    try:
        config = json.loads((model_dir(base) / "config.json").read_text())
    except (MergeError, OSError, ValueError) as exc:
        raise MergeError(f"a gradient (a list of values over the layers) needs the base's layer count, "
                         f"and the config.json of '{base}' cannot be read: {exc}") from None
    for scope in (config, config.get("text_config") or {}):
        for key in _LAYER_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    raise MergeError(f"a gradient needs the base's layer count; the config.json of '{base}' has none of "
                     f"{list(_LAYER_KEYS)}")


def _key(values: dict[str, Scalar]) -> tuple:
    # The type is part of the key: True == 1 == 1.0, but only one of them passes a boolean's check.
    return tuple(sorted((k, type(v).__name__, v) for k, v in values.items()))


class MergePlan:
    """The parameters of every tensor of a merge.

    Args:
        config: the merge.
        names: the tensors that will be merged. Given, every one is resolved here, so that any bad
            or missing value fails before a tensor is merged. Without them, every value some tensor
            could get is checked here (each filter entry's, each gradient's at every layer), and a
            required parameter that no entry gives a tensor fails when that tensor is asked for.
        num_layers: the model's layer count, for gradients; by default the grouping's, else the
            base's config.json (read only when a setting is a gradient).

    Raises:
        MergeError: a malformed setting, a value the method refuses, a gradient without a layer count.
    """

    def __init__(self, config: MergeConfig, *, names: Iterable[str] | None = None,
                 num_layers: int | None = None) -> None:
        self.config = config
        self.method: MergeMethod = get_method(config.method)
        self.names = [e.name for e in config.experts]
        groups: list[str | None] = list(config.grouping.groups()) if config.grouping else [None]
        self._global = parse_settings(config.params, "parameters")
        self._experts = {g: [parse_settings(e.params_for(g), f"model '{e.name}'") for e in config.experts]
                         for g in groups}
        self._scalar = all(s.constant for s in self._all_settings())
        self.gradient = any(s.gradient for s in self._all_settings())
        self.num_layers = num_layers
        if self.num_layers is None and self.gradient:
            grouped = config.grouping.num_layers if config.grouping else None
            self.num_layers = grouped or base_layer_count(config.base)
        self._resolved: dict[tuple, Resolved] = {}
        if names is not None:
            for name in names:
                self.params_for(name)
        else:
            for group in groups:
                self._check_group(group)

    def _all_settings(self) -> Iterable[Setting]:
        yield from self._global.values()
        for rows in self._experts.values():
            for row in rows:
                yield from row.values()

    def _resolve(self, experts: list[dict[str, Scalar]], params: dict[str, Scalar], where: str | None) -> Resolved:
        key = (tuple(_key(e) for e in experts), _key(params))
        hit = self._resolved.get(key)
        if hit is None:
            try:
                hit = self.method.resolve(experts, params, self.names)
            except MergeError as exc:
                raise MergeError(f"{where}: {exc}" if where else str(exc)) from None
            self._resolved[key] = hit
        return hit

    def params_for(self, tensor: str) -> Resolved:
        """Each expert's parameters and the global ones for ``tensor``, checked by the method."""
        group = self.config.grouping.group_of(tensor) if self.config.grouping else None
        rows = self._experts[group]
        if self._scalar:  # every setting a plain value: one resolution per group
            return self._resolve([{k: s.entries[0][1] for k, s in row.items()} for row in rows],
                                 {k: s.entries[0][1] for k, s in self._global.items()}, None)
        t = layer_position(tensor, self.num_layers) if self.gradient else 0.0

        def concrete(settings: dict[str, Setting]) -> dict[str, Scalar]:
            return {k: v for k, s in settings.items() if (v := s.at(tensor, t)) is not None}

        return self._resolve([concrete(row) for row in rows], concrete(self._global), f"tensor '{tensor}'")

    def stats_reading(self, names: Sequence[str]) -> str | None:
        """The calibration statistics this merge of ``names`` reads (``MergeMethod.stats_reading``):
        one reading a merge, its global parameters' (those of its first tensor)."""
        return self.method.stats_reading(self.params_for(names[0])[1]) if names else None

    def _positions(self, group: str | None) -> frozenset[float]:
        """The layer positions a group's tensors can be at (0: outside the layers, and layer 0)."""
        if self.num_layers is None:
            return frozenset({0.0})
        n = self.num_layers
        layers = self.config.grouping.layers_of(group) if self.config.grouping and group else None
        at = [i / (n - 1) if n > 1 else 1.0 for i in (range(n) if layers is None else layers)]
        return frozenset(at) | ({0.0} if layers is None or not layers else frozenset())

    def _check_group(self, group: str | None) -> None:
        """Resolve every value a tensor of ``group`` could get, one setting at a time, the others
        at their first value (the method's checks are per parameter)."""
        positions = self._positions(group)
        rows = self._experts[group]
        scopes: list[dict[str, Setting]] = [self._global, *rows]
        choices = [{k: s.values(positions) for k, s in scope.items()} for scope in scopes]
        first = [{k: vs[0] for k, vs in scope.items()} for scope in choices]
        probes = [first]
        for i, scope in enumerate(choices):
            for k, values in scope.items():
                for v in values[1:]:
                    probes.append([dict(row) for row in first])
                    probes[-1][i][k] = v
        varied = any(not s.constant for scope in scopes for s in scope.values())
        for probe in probes:
            try:
                self._resolve(probe[1:], probe[0], None)
            except MergeError as exc:
                if not varied:
                    raise
                raise MergeError(f"{exc} (a value its gradient or filter entries give some tensors)") from None


__all__ = ["MergePlan", "base_layer_count"]
