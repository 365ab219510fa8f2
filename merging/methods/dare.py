from merging.methods.generalized import GeneralizedTaskArithmetic


class DareTies(GeneralizedTaskArithmetic):
    """DARE (Yu et al., 2024) random drop with L1 rescale, then TIES' sign consensus."""

    name = "dare_ties"
    sparsifier = "random"
    consensus = True
    default_rescale = True


class DareLinear(GeneralizedTaskArithmetic):
    """DARE random drop with L1 rescale, then a weighted sum."""

    name = "dare_linear"
    sparsifier = "random"
    default_rescale = True
