from merging.methods.breadcrumbs import Breadcrumbs


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs' sparsification, then TIES' sign consensus (mergekit's
    ``breadcrumbs_ties``): ``weight``, ``density`` and ``gamma`` (default 0.01) per model;
    ``normalize`` (default false), ``rescale`` (default false) and ``lambda`` shared."""

    name = "breadcrumbs_ties"
    consensus = True
