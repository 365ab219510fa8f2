"""Checks a spec against the world (files, tasks, merge method) before anything is stored."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from evals.catalog import TaskCatalog
from evals.taskdirs import UnsafeTaskDir, always_trusted, check_task_dir, is_trusted, trusting
from evals.texts import DEFAULT_LIMIT, TASK_PREFIX, calibration_texts, read_calibration_texts, within_roots
from merging.errors import IncompatibleCheckpoints, MergeError
from search.spec import MAX_DIMENSIONS, MAX_LAYERS, StudySpec
from service.settings import Settings
from service.specs import objectives_of

MAX_CONFIG_BYTES = 4 * 2**20  # a model's config.json
# Methods `mmmo merge` runs and a study cannot: why, as the 422 says it.
UNSEARCHABLE_METHODS = {
    "passthrough": "passthrough/slices change the architecture; a study cannot search them "
                   "(merge them with `mmmo merge` and a mergekit YAML)",
}


@dataclass(frozen=True)
class SpecProblem:
    loc: tuple[str | int, ...]
    msg: str


@dataclass(frozen=True)
class SpecPolicy:
    """What a spec may make the server read: files under ``data_roots`` only (models, calibration
    and perplexity data, task directories), Python from ``trusted_task_paths`` only."""

    data_roots: tuple[Path, ...] = ()
    trusted_task_paths: tuple[Path, ...] = ()
    max_data_file_bytes: int = 2**30

    @classmethod
    def from_settings(cls, settings: Settings) -> SpecPolicy:
        return cls(tuple(settings.resolved_data_roots()), tuple(settings.trusted_task_paths),
                   settings.max_data_file_bytes)

    def readable_roots(self) -> list[Path]:
        """Where data files may lie: the data roots and the trusted task directories (the bundled
        tasks' data included)."""
        return [*self.data_roots, *self.trusted_task_paths, *always_trusted()]


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def _model_ref(ref: str, policy: SpecPolicy) -> str:
    """``local``: a directory under the data roots; ``hub``: a Hugging Face id (looked up in the
    server's hub cache only); ``unseen``: shaped like one but naming a local path outside the
    roots, so not looked at, answered as an id not cached; ``refused``: anything else, missing
    or not allowed alike. No answer tells whether a path outside the roots exists."""
    try:
        path = Path(ref)
        exists = path.exists()
        if exists and within_roots(path, policy.data_roots) and path.is_dir():
            return "local"
        if _HUB_ID.match(ref) and ".." not in ref:
            return "unseen" if exists else "hub"
    except (OSError, ValueError):
        pass
    return "refused"


def _read_config(model_dir: Path) -> dict:
    with open(model_dir / "config.json", "rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"config.json is larger than {MAX_CONFIG_BYTES} bytes")
    config = json.loads(raw)
    if not isinstance(config, dict):
        raise ValueError("config.json is not an object")
    return config


def _layer_count(config: dict) -> int | None:
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    return layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else None


def resolve_layers(spec: StudySpec) -> StudySpec:
    """With layer groups and no ``num_layers``, read it from the base's config; a ``num_layers``
    given must match the base's where the server can read it (else a ValueError)."""
    ss = spec.search_space
    if ss.layer_groups or ss.num_layers:
        from merging.io import ModelNotFound, locate  # torch: at the first spec checked, not at start-up

        try:
            layers = _layer_count(_read_config(locate(spec.base, download=False)))
        except (ModelNotFound, OSError, ValueError):
            layers = None
        if ss.num_layers and layers and ss.num_layers != layers:
            raise ValueError(f"search_space.num_layers is {ss.num_layers}, the base has {layers} layers")
        if ss.layer_groups and not ss.num_layers:
            if layers is None:
                raise ValueError(f"the server cannot read the layer count of the base '{spec.base}': "
                                 "set search_space.num_layers")
            if layers > MAX_LAYERS:
                raise ValueError(f"the base has {layers} layers, more than a search space may group")
            spec = spec.model_copy(update={"search_space": ss.model_copy(update={"num_layers": layers})})
    return spec


def space_problems(spec: StudySpec) -> list[SpecProblem]:
    """The search space's size, once the layer count is known (the spec's own check could not count
    layer groups without it)."""
    if spec.dimensions() <= MAX_DIMENSIONS:
        return []
    return [SpecProblem(("search_space",), f"the search space has {spec.dimensions()} parameters, more than the "
                                           f"{MAX_DIMENSIONS} allowed: fewer experts, fewer filters or larger "
                                           "layer_groups")]


def resolve_directions(spec: StudySpec, catalog: TaskCatalog, policy: SpecPolicy) -> StudySpec:
    """The spec with every objective's direction set (lm-eval's higher_is_better where unset)."""
    objectives = []
    with trusting(policy.trusted_task_paths):
        for spec_obj, obj in zip(spec.objectives, objectives_of(spec), strict=True):
            direction = spec_obj.direction
            if direction is None:
                direction = "maximize" if catalog.higher_is_better(obj, spec.task_paths) else "minimize"
            objectives.append(spec_obj.model_copy(update={"direction": direction}))
    return spec.model_copy(update={"objectives": objectives})


def _architecture(config: dict) -> tuple:
    return config.get("model_type"), tuple(config.get("architectures") or ())


def _model_problems(spec: StudySpec, policy: SpecPolicy) -> list[SpecProblem]:
    """Each model is a checkpoint under the data roots (or a hub id); where the server sees them all,
    the experts merge onto the base (same architecture, tensors and shapes, descended from it), else a
    worker finds out at its first load."""
    # Checkpoint reading needs torch: imported at the first spec checked, not at the server's start.
    from merging.checks import check_dirs
    from merging.io import ModelNotFound, check_checkpoint, model_dir, split_adapter

    problems: list[SpecProblem] = []
    readable = True
    refs = [(("base",), spec.base)] + [(("experts", i, "path"), e.path) for i, e in enumerate(spec.experts)]
    # mergekit's `model+adapter`: both parts are checked
    models = [(loc, part) for loc, ref in refs for part in split_adapter(ref) if part is not None]
    for loc, path in models:
        kind = _model_ref(path, policy)
        if kind == "refused":
            problems.append(SpecProblem(loc, f"'{path}' is not a model directory under the server's data roots "
                                             "(MMMO_DATA_ROOTS), nor a Hugging Face id (org/name)"))
            continue
        if kind == "unseen":
            readable = False
            continue
        try:
            check_checkpoint(path, download=False)
        except ModelNotFound:
            readable = False  # a hub id the server has not cached: each worker resolves it
        except MergeError as exc:
            problems.append(SpecProblem(loc, str(exc)))
        except OSError as exc:
            problems.append(SpecProblem(loc, f"'{path}' cannot be read: {exc.strerror}"))
    if problems or not readable:
        return problems
    try:
        base = _architecture(_read_config(model_dir(spec.base, download=False)))
    except (OSError, ValueError) as exc:
        return [SpecProblem(("base",), f"the base's config.json cannot be read: {exc}")]
    ancestry = False if spec.methods == ["linear"] else ("warn" if spec.allow_unrelated else True)
    for i, e in enumerate(spec.experts):
        try:
            arch = _architecture(_read_config(model_dir(e.path, spec.base, download=False)))
        except (OSError, ValueError) as exc:
            problems.append(SpecProblem(("experts", i, "path"), f"model '{e.name}': config.json cannot be read: {exc}"))
            continue
        if arch != base:
            problems.append(SpecProblem(("experts", i, "path"), f"model '{e.name}' is a {arch[0]} model "
                                        f"({', '.join(arch[1]) or 'no architectures'}), the base a {base[0]} "
                                        f"({', '.join(base[1]) or 'no architectures'})"))
            continue
        if spec.tokenizer is not None:
            continue  # the output vocabulary depends on every expert: checked together below
        try:
            # The base's own layout once (with the first expert): the others are checked against the base.
            check_dirs(spec.base, {e.name: e.path}, ancestry=ancestry, loadable=i == 0)
        except (IncompatibleCheckpoints, MergeError) as exc:
            problems.append(SpecProblem(("experts", i, "path"), str(exc)))
    if spec.tokenizer is not None and not problems:
        try:
            check_dirs(spec.base, {e.name: e.path for e in spec.experts}, ancestry=ancestry, loadable=True,
                       tokenizer=spec.tokenizer)
        except (IncompatibleCheckpoints, MergeError, OSError, ValueError) as exc:
            problems.append(SpecProblem(("tokenizer",), str(exc)))
    return problems


def _text_problem(source: str, policy: SpecPolicy) -> str | None:
    """Why calibration or perplexity texts cannot be read (the texts a worker would read, checked)."""
    try:
        if source.startswith(TASK_PREFIX):
            calibration_texts(source, limit=DEFAULT_LIMIT)
        else:
            read_calibration_texts(source, limit=DEFAULT_LIMIT, max_bytes=policy.max_data_file_bytes,
                                   roots=policy.readable_roots())
    except OSError as exc:
        return f"'{source}' cannot be read: {exc.strerror}"
    except (ValueError, KeyError) as exc:
        return str(exc)
    return None


def _task_path_problem(path: str, policy: SpecPolicy) -> str | None:
    """A task directory: trusted by the operator, or under the data roots and running no Python."""
    try:
        directory = Path(path)
        if is_trusted(directory, policy.trusted_task_paths):
            return None if directory.is_dir() else f"'{path}' is not a directory"
        if not (within_roots(directory, policy.data_roots) and directory.is_dir()):
            return f"'{path}' is not a directory under the server's data roots"
        check_task_dir(directory, trusted=policy.trusted_task_paths, roots=policy.readable_roots())
    except UnsafeTaskDir as exc:
        return str(exc)
    except (OSError, ValueError):
        return f"'{path}' is not a directory under the server's data roots"
    return None


def spec_problems(spec: StudySpec, catalog: TaskCatalog, policy: SpecPolicy) -> list[SpecProblem]:
    with trusting(policy.trusted_task_paths):
        return _spec_problems(spec, catalog, policy)


def _spec_problems(spec: StudySpec, catalog: TaskCatalog, policy: SpecPolicy) -> list[SpecProblem]:
    problems = _model_problems(spec, policy)
    for i, e in enumerate(spec.experts):
        if e.calibration is not None:
            found = _text_problem(e.calibration, policy)
            if found:
                problems.append(SpecProblem(("experts", i, "calibration"), f"cannot read calibration data: {found}"))
    if spec.calibration is not None:
        found = _text_problem(spec.calibration, policy)
        if found:
            problems.append(SpecProblem(("calibration",), f"cannot read calibration data: {found}"))
    modes = {spec.method_params.get("calibration"), *spec.search_space.method_choices.get("calibration", [])}
    if spec.calibration is None and modes & {"shared", "both"}:
        problems.append(SpecProblem(("calibration",), "OBIM's calibration 'shared' or 'both' reads the spec's shared "
                                    "calibration text: set `calibration:` (a jsonl or text file, or task:NAME)"))

    problems += _methods_problems(spec)
    for i, path in enumerate(spec.task_paths):
        found = _task_path_problem(path, policy)
        if found:
            problems.append(SpecProblem(("task_paths", i), found))
    if problems and any(p.loc[0] == "task_paths" for p in problems):
        return problems
    for i, objective in enumerate(objectives_of(spec)):
        if objective.kind == "perplexity":
            text = _text_problem(objective.data, policy)
            found = ("data", f"cannot read perplexity data: {text}") if text else None
        else:
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


def _methods_problems(spec: StudySpec) -> list[SpecProblem]:
    """The method's, or each of the methods searched among (the parameters it takes of the spec's)."""
    from merging.methods import get_method  # torch: at the first spec checked, not at start-up

    problems: list[SpecProblem] = []
    methods = []
    for name in spec.methods:
        try:
            method = get_method(name)
        except MergeError as exc:
            problems.append(SpecProblem(("method",), str(exc)))
            continue
        if method.name in UNSEARCHABLE_METHODS:
            problems.append(SpecProblem(("method",), UNSEARCHABLE_METHODS[method.name]))
        methods.append(method)
    if problems or len(methods) == 1:
        return problems or _method_problems(spec, methods[0])
    ss = spec.search_space
    known_model = set().union(*({p.name for p in m.expert_params} for m in methods))
    known_global = set().union(*({p.name for p in m.global_params} for m in methods))
    for key in ("weight", "density"):
        if getattr(ss, key) is not None and key not in known_model:
            problems.append(SpecProblem(("search_space", key), f"none of the methods {spec.methods} has a {key}"))
    for where, keys in ((("method_params",), spec.method_params), (("search_space", "method_params"), ss.method_params),
                        (("search_space", "method_choices"), ss.method_choices)):
        unknown = sorted(set(keys) - known_global)
        if unknown:
            problems.append(SpecProblem(where, f"{unknown}: no parameter of any of the methods {spec.methods}"))
    for method in methods if not problems else []:
        model, shared = {p.name for p in method.expert_params}, {p.name for p in method.global_params}
        view = spec.model_copy(update={
            "method": method.name, "method_params": {k: v for k, v in spec.method_params.items() if k in shared},
            "search_space": ss.model_copy(update={
                "weight": ss.weight if "weight" in model else None,
                "density": ss.density if "density" in model else None,
                "method_params": {k: v for k, v in ss.method_params.items() if k in shared},
                "method_choices": {k: v for k, v in ss.method_choices.items() if k in shared}})})
        problems += [SpecProblem(p.loc, f"method '{method.name}': {p.msg}") for p in _method_problems(view, method)]
    return problems


def _method_problems(spec: StudySpec, method) -> list[SpecProblem]:
    """Resolve the method's parameters at both ends of the search space."""
    space = spec.search_space
    per_model = {p.name for p in method.expert_params}
    for key in ("weight", "density"):
        if getattr(space, key) is not None and key not in per_model:
            return [SpecProblem(("search_space", key),
                                f"method '{spec.method}' has no {key}; set search_space.{key} to null")]
    names = [e.name for e in spec.experts]
    for corner in ("low", "high"):
        expert_params = {k: getattr(r, corner) for k in ("weight", "density") if (r := getattr(space, k)) is not None}
        searched = {k: getattr(r, corner) for k, r in space.method_params.items()}
        try:
            method.resolve([expert_params] * len(names), {**spec.method_params, **searched}, names)
        except MergeError as exc:
            return [SpecProblem(("search_space", "method_params") if searched else ("method_params",), str(exc))]
    lowest = {k: r.low for k, r in space.method_params.items()}
    one = {"weight": space.weight.low} if space.weight is not None else {}
    for key, choices in space.method_choices.items():
        for choice in choices:
            try:
                method.resolve([one] * len(names), {**spec.method_params, **lowest, key: choice}, names)
            except MergeError as exc:
                return [SpecProblem(("search_space", "method_choices", key), str(exc))]
    return []
