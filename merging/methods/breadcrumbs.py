from merging.methods.base import Param
from merging.methods.generalized import GeneralizedTaskArithmetic


class Breadcrumbs(GeneralizedTaskArithmetic):
    """Model Breadcrumbs (Davari & Belilovsky, 2024): drop the largest and smallest deltas.

    ``gamma``, the fraction dropped at the top, is a per-model parameter as in mergekit.
    """

    name = "breadcrumbs"
    sparsifier = "magnitude_outliers"

    @classmethod
    def extra_expert_params(cls) -> tuple[Param, ...]:
        return (Param("gamma", 0.01, low=0.0, high=1.0),)
