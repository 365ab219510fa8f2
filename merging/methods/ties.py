from merging.methods.generalized import GeneralizedTaskArithmetic


class Ties(GeneralizedTaskArithmetic):
    """TIES (Yadav et al., 2023): trim by magnitude, elect signs, disjoint mean."""

    name = "ties"
    sparsifier = "magnitude"
    consensus = True
    default_normalize = True
