"""Constraint math: a spec's bounds on objectives, as violations (Optuna's convention: <= 0 is
feasible) and as a verdict on a trial's values."""

from __future__ import annotations

from search.spec import StudySpec


def constraint_violations(spec: StudySpec, values: dict[str, float]) -> dict[str, float]:
    """One violation per constraint, keyed ``{objective}:max`` or ``{objective}:min``."""
    return {f"{c.objective}:{'max' if c.max is not None else 'min'}": c.violation(values[c.objective])
            for c in spec.constraints}


def is_feasible(spec: StudySpec, values: dict[str, float]) -> bool:
    """Whether ``values`` (objective key -> value) meet every constraint of ``spec``."""
    return all(v <= 0 for v in constraint_violations(spec, values).values())
