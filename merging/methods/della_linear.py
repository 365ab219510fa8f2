from merging.methods.della import Della


class DellaLinear(Della):
    """DELLA's magnitude-ranked random drop with L1 rescale, then a weighted sum without sign
    consensus (mergekit's ``della_linear``): ``weight``, ``density`` and ``epsilon`` (default
    0.15) per model; ``normalize`` (default false), ``rescale`` (default true) and ``lambda``
    shared."""

    name = "della_linear"
    consensus = False
    default_normalize = False
