class MergeError(ValueError):
    """A merge that cannot be done as asked; the message names the model, tensor or parameter."""
