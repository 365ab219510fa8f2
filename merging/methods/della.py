from collections.abc import Mapping, Sequence
from typing import Any

from merging.methods.base import Param
from merging.methods.generalized import GeneralizedTaskArithmetic, check_della_bounds


class Della(GeneralizedTaskArithmetic):
    """DELLA (Deep et al., 2024): magnitude-ranked random drop, sign consensus, rescale.

    ``epsilon``, the spread of the keep probability around ``density``, is a per-model
    parameter as in mergekit.
    """

    name = "della"
    sparsifier = "della_magprune"
    consensus = True
    default_normalize = True
    default_rescale = True

    @classmethod
    def extra_expert_params(cls) -> tuple[Param, ...]:
        return (Param("epsilon", 0.15, low=0.0, high=1.0),)

    def resolve(self, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                expert_names: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        resolved, resolved_global = super().resolve(experts, params, expert_names)
        check_della_bounds(self.name, resolved, expert_names)  # before any tensor, not at the first one
        return resolved, resolved_global
