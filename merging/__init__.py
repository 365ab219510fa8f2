"""The merge engine: checkpoint reading and checks, merge methods, and merges in memory or to files.
It must never import ``evals``, ``search`` or ``service``: they build on it, not the other way round."""
