"""Registry of merge methods: adding a method is adding a module and one line here."""

from merging.errors import MergeError
from merging.methods.base import MergeMethod, Param, TensorInputs
from merging.methods.breadcrumbs import Breadcrumbs
from merging.methods.dare import DareLinear, DareTies
from merging.methods.della import Della
from merging.methods.linear import Linear
from merging.methods.obim import Obim
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (Linear, TaskArithmetic, Ties, DareTies, DareLinear, Breadcrumbs, Della, Obim)
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]()
    except KeyError:
        raise MergeError(f"unknown merge method '{name}'; known: {sorted(METHODS)}") from None


__all__ = ["METHODS", "MergeMethod", "Param", "TensorInputs", "get_method"]
