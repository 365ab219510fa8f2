"""Checks a spec against the world (files, tasks, merge method) before anything is stored."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evals.catalog import TaskCatalog
from evals.texts import calibration_texts
from merging.errors import IncompatibleCheckpoints, MergeError
from search.spec import StudySpec
from service.specs import objectives_of


@dataclass(frozen=True)
class SpecProblem:
    loc: tuple[str | int, ...]
    msg: str


def resolve_layers(spec: StudySpec) -> StudySpec:
    """With layer groups and no ``num_layers``, read it from the base's config."""
    ss = spec.search_space
    if not ss.layer_groups or ss.num_layers:
        return spec
    from merging.io import ModelNotFound, locate  # torch: at the first spec checked, not at start-up

    try:
        base = locate(spec.base, download=False)
    except ModelNotFound:
        raise ValueError(f"the server cannot read the base '{spec.base}' to count its layers: "
                         "set search_space.num_layers") from None
    config = json.loads((base / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    if not layers:
        raise ValueError("the base's config.json names no num_hidden_layers: set search_space.num_layers")
    return spec.model_copy(update={"search_space": ss.model_copy(update={"num_layers": int(layers)})})


def resolve_directions(spec: StudySpec, catalog: TaskCatalog) -> StudySpec:
    """The spec with every objective's direction set (lm-eval's higher_is_better where unset)."""
    objectives = []
    for spec_obj, obj in zip(spec.objectives, objectives_of(spec), strict=True):
        direction = spec_obj.direction
        if direction is None:
            direction = "maximize" if catalog.higher_is_better(obj, spec.task_paths) else "minimize"
        objectives.append(spec_obj.model_copy(update={"direction": direction}))
    return spec.model_copy(update={"objectives": objectives})


def _model_problems(spec: StudySpec) -> list[SpecProblem]:
    """Each model is a checkpoint; where the server sees them all, the experts merge onto the base
    (same tensors and shapes, descended from it), else a worker finds out at its first load."""
    # Checkpoint reading needs torch: imported at the first spec checked, not at the server's start.
    from merging.checks import check_dirs
    from merging.io import ModelNotFound, check_checkpoint, is_hub_id

    problems: list[SpecProblem] = []
    readable = True
    for loc, path in [(("base",), spec.base)] + [(("experts", i, "path"), e.path) for i, e in enumerate(spec.experts)]:
        try:
            check_checkpoint(path, download=False)
        except ModelNotFound:
            readable = False
            if not is_hub_id(path):  # a hub id the server has not cached: each worker resolves it
                problems.append(SpecProblem(loc, f"'{path}' is not a directory the server can see, nor a "
                                                 "Hugging Face id (org/name)"))
        except MergeError as exc:
            problems.append(SpecProblem(loc, str(exc)))
    if problems or not readable:
        return problems
    for i, e in enumerate(spec.experts):
        try:
            check_dirs(spec.base, {e.name: e.path}, ancestry=spec.method != "linear")
        except IncompatibleCheckpoints as exc:
            problems.append(SpecProblem(("experts", i, "path"), str(exc)))
    return problems


def spec_problems(spec: StudySpec, catalog: TaskCatalog) -> list[SpecProblem]:
    problems = _model_problems(spec)
    for i, e in enumerate(spec.experts):
        if e.calibration is not None:
            try:
                calibration_texts(e.calibration, limit=1)
            except (OSError, ValueError, KeyError) as exc:
                problems.append(SpecProblem(("experts", i, "calibration"), f"cannot read calibration data: {exc}"))
    from merging.methods import get_method  # torch: at the first spec checked, not at start-up

    try:
        method = get_method(spec.method)
    except MergeError as exc:
        problems.append(SpecProblem(("method",), str(exc)))
    else:
        problems += _method_problems(spec, method)
    for i, path in enumerate(spec.task_paths):
        if not Path(path).is_dir():
            problems.append(SpecProblem(("task_paths", i), f"'{path}' is not a directory"))
    if problems and any(p.loc[0] == "task_paths" for p in problems):
        return problems
    for i, objective in enumerate(objectives_of(spec)):
        found = catalog.problem(objective, spec.task_paths)
        if found:
            problems.append(SpecProblem(("objectives", i, found[0]), found[1]))
    keys = [o.key for o in objectives_of(spec)]
    for i, c in enumerate(spec.constraints):
        if c.objective not in keys:
            problems.append(SpecProblem(("constraints", i, "objective"), f"no objective '{c.objective}' (have {keys})"))
    for key in spec.reference_point or {}:
        if key not in keys:
            problems.append(SpecProblem(("reference_point",), f"no objective '{key}' (have {keys})"))
    named = list((spec.selection.weights or {}).keys())
    if spec.selection.policy.startswith("best:"):
        named.append(spec.selection.policy.removeprefix("best:"))
    for key in named:
        if key not in keys:
            problems.append(SpecProblem(("selection",), f"no objective '{key}' (have {keys})"))
    return problems


def _method_problems(spec: StudySpec, method) -> list[SpecProblem]:
    """Resolve the method's parameters at both ends of the search space."""
    space = spec.search_space
    if space.density is not None and not any(p.name == "density" for p in method.expert_params):
        return [SpecProblem(("search_space", "density"),
                            f"method '{spec.method}' has no density; set search_space.density to null")]
    names = [e.name for e in spec.experts]
    for corner in ("low", "high"):
        expert_params = {"weight": getattr(space.weight, corner)}
        if space.density is not None:
            expert_params["density"] = getattr(space.density, corner)
        try:
            method.resolve([expert_params] * len(names), spec.method_params, names)
        except MergeError as exc:
            return [SpecProblem(("method_params",), str(exc))]
    for key, choices in space.method_choices.items():
        for choice in choices:
            try:
                method.resolve([{"weight": space.weight.low}] * len(names), {**spec.method_params, key: choice}, names)
            except MergeError as exc:
                return [SpecProblem(("search_space", "method_choices", key), str(exc))]
    return []
