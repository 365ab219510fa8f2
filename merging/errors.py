class MergeError(ValueError):
    """A merge that cannot be done as asked; the message names the model, tensor or parameter."""


class IncompatibleCheckpoints(MergeError):
    """The experts cannot be merged onto the base (other tensors, other shapes, not its descendants):
    a property of the checkpoints, not of the machine reading them."""
