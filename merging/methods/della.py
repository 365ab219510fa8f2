from merging.methods.base import Param
from merging.methods.generalized import GeneralizedTaskArithmetic


class Della(GeneralizedTaskArithmetic):
    """DELLA (Deep et al., 2024): magnitude-ranked random drop, sign consensus, rescale."""

    name = "della"
    sparsifier = "della_magprune"
    consensus = True
    default_normalize = True
    default_rescale = True

    @classmethod
    def extra_global_params(cls) -> tuple[Param, ...]:
        return (Param("epsilon", 0.15, low=0.0, high=1.0),)
