from merging.methods.generalized import GeneralizedTaskArithmetic


class TaskArithmetic(GeneralizedTaskArithmetic):
    """``base + lambda * sum(weight_i * delta_i)`` (Ilharco et al., 2023).

    mergekit declares ``density`` and ``rescale`` for it too, and ignores them: accepted here
    with a warning.
    """

    name = "task_arithmetic"
