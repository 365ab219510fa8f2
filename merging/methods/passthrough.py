from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from merging.errors import MergeError
from merging.methods.base import MergeMethod, Param, TensorInputs


class Passthrough(MergeMethod):
    """One model's tensor, copied, optionally times ``scale`` (mergekit's ``passthrough``).

    mergekit takes exactly one input per tensor (``InputContract(max_inputs=1)``): with ``models:``
    that is one model and no other ``base_model``; with ``slices:`` (layer stacking, see
    :mod:`merging.slices`) one source per output slice. ``scale`` is per model (a global value is
    every model's default); without one the tensor is copied as it is.
    """

    name = "passthrough"
    takes = "models"
    needs_base = False
    base_is_input = True  # mergekit counts a base_model as an input: with another model, two inputs (refused)
    # mergekit's default is None (no scaling), not a required value: a model without one gets 1
    expert_params = (Param("scale", None),)

    def resolve(self, experts, params, expert_names):
        if len(expert_names) != 1:
            raise MergeError(f"method 'passthrough' copies one model's tensors, and this merge has "
                             f"{len(expert_names)} ({', '.join(expert_names)}); mergekit takes one input "
                             "(a base_model other than the model counts as one more)")
        if "scale" not in params:
            experts = [{"scale": 1.0, **e} for e in experts]
        return super().resolve(experts, params, expert_names)

    def merge(self, t: TensorInputs, experts: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> Tensor:
        (model,), scale = t.models, float(experts[0]["scale"])
        # mergekit multiplies in the inputs' dtype (rounding once from the float32 product, as here
        # when the result is written in that dtype); a scale of 1 leaves the tensor as it is.
        return model if scale == 1.0 else model * scale
