"""Registry of merge methods: adding a method is adding a module and one line here."""

from merging.errors import MergeError
from merging.methods.arcee_fusion import ArceeFusion
from merging.methods.base import MergeMethod, Param, TensorInputs
from merging.methods.breadcrumbs import Breadcrumbs
from merging.methods.breadcrumbs_ties import BreadcrumbsTies
from merging.methods.dare import DareLinear, DareTies
from merging.methods.della import Della
from merging.methods.della_linear import DellaLinear
from merging.methods.karcher import Karcher
from merging.methods.linear import Linear
from merging.methods.model_stock import ModelStock
from merging.methods.multislerp import MultiSlerp
from merging.methods.nearswap import NearSwap
from merging.methods.nuslerp import NuSlerp
from merging.methods.obim import Obim
from merging.methods.passthrough import Passthrough
from merging.methods.sce import Sce
from merging.methods.slerp import Slerp
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (Linear, TaskArithmetic, Ties, DareTies, DareLinear, Breadcrumbs, Della, Obim,
                              ModelStock, Karcher, ArceeFusion, Sce, BreadcrumbsTies, DellaLinear,
                              Passthrough, Slerp, NuSlerp, MultiSlerp, NearSwap)
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise MergeError(f"unknown merge method '{name}'; known: {sorted(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "Param", "TensorInputs", "get_method"]
