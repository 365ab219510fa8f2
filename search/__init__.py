"""The search: study specs, the parameter space, samplers, constraints, Pareto fronts and selection.
Never imports ``service`` nor torch at import time (only ``merging.config`` / ``merging.randomness``)."""
