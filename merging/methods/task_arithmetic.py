from merging.methods.generalized import GeneralizedTaskArithmetic


class TaskArithmetic(GeneralizedTaskArithmetic):
    """``base + lambda * sum(weight_i * delta_i)`` (Ilharco et al., 2023)."""

    name = "task_arithmetic"
