"""StudySpec: the versioned, validated description of a merge search (YAML or JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from evals.objective import objective_key

SPEC_VERSION = 1
# Bounds on a spec, so that no spec costs the server more than a few seconds to check and ask:
MAX_SPEC_BYTES = 256 * 1024  # a YAML or JSON spec document
MAX_SPEC_DEPTH = 16  # nesting of a YAML spec document
MAX_EXPERTS = 32
MAX_OBJECTIVES = 16
MAX_LAYERS = 1024  # search_space.num_layers (the largest models have ~130)
MAX_DIMENSIONS = 1024  # searched parameters: experts x parameters x groups + method choices (~1 s an ask)
PATH_MAX_BYTES, NAME_MAX_BYTES = 4096, 255  # Linux's PATH_MAX and NAME_MAX


def _path_like(value: str) -> str:
    """A model, data or task reference the OS can be asked about: no NUL, within PATH_MAX and
    NAME_MAX (a longer one would be an OS error, not an answer)."""
    if "\x00" in value:
        raise ValueError("a path may not contain a NUL character")
    if len(value.encode()) > PATH_MAX_BYTES:
        raise ValueError(f"a path may be at most {PATH_MAX_BYTES} bytes long")
    long = next((part for part in value.split("/") if len(part.encode()) > NAME_MAX_BYTES), None)
    if long is not None:
        raise ValueError(f"a path's components may be at most {NAME_MAX_BYTES} bytes long ('{long[:40]}...' is "
                         f"{len(long.encode())})")
    return value


PathLike = Annotated[str, Field(min_length=1, max_length=PATH_MAX_BYTES), AfterValidator(_path_like)]
Word = Annotated[str, Field(min_length=1, max_length=200)]
Scalar = bool | int | float | Annotated[str, Field(max_length=1000)] | None


class _Strict(BaseModel):
    # allow_inf_nan: NaN or Infinity anywhere in a spec is a 422 (the database could not store it).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ExpertSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    path: PathLike = Field(description="HF model directory (or hub id where reachable)")
    calibration: PathLike | None = Field(default=None, description="OBIM calibration texts: jsonl or text file, "
                                         "or task:NAME")


class Range(_Strict):
    low: float = Field(ge=-1e6, le=1e6)
    high: float = Field(ge=-1e6, le=1e6)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


class SearchSpaceSpec(_Strict):
    """Per-expert ranges (every expert gets one dimension per searched parameter and group), the
    method's global parameters searched as ranges (one dimension per group) or categoricals."""

    weight: Range | None = Range(low=0.0, high=1.5)  # None: not searched (methods without a weight: slerp)
    density: Range | None = Range(low=0.1, high=1.0)  # None: density is not searched
    method_params: dict[Word, Range] = Field(
        default_factory=dict, max_length=16,
        description="global merge parameters searched as ranges, one dimension per layer group and filter "
                    "(slerp's t); a trial's values become the parameter's mergekit setting (filter entries, "
                    "per-layer gradients)")
    method_choices: dict[Word, Annotated[list[Annotated[str, Field(max_length=200)] | float | bool],
                                         Field(min_length=1, max_length=64)]] = Field(
        default_factory=dict, max_length=16,
        description="global merge parameters searched as categoricals, e.g. OBIM's order")
    layer_groups: int | None = Field(default=None, ge=1, le=MAX_LAYERS,
                                     description="consecutive layers sharing one parameter set")
    filters: list[Word] = Field(default_factory=list, max_length=16,
                                description="tensor-name substrings with their own parameters")
    num_layers: int | None = Field(default=None, ge=1, le=MAX_LAYERS,
                                   description="filled from the base's config when unset; must match it")

    def groups(self) -> int:
        """Parameter sets per expert (merging.config.Grouping's groups); layer groups with the layer
        count unknown count as one set of layers and the rest."""
        return (self._layer_sets() + bool(self.layer_groups)) * self._filter_parts()

    def method_groups(self) -> int:
        """Dimensions per searched global parameter (``method_params``): one per group, except that
        the tensors outside the layers form one group whatever the filters (``search.space``)."""
        if not self.layer_groups:
            return self._filter_parts() if self.filters else 1
        return self._layer_sets() * self._filter_parts() + 1

    def _layer_sets(self) -> int:
        return -(-(self.num_layers or 1) // self.layer_groups) if self.layer_groups else 1

    def _filter_parts(self) -> int:
        return len(self.filters) + 1 if self.filters else 1

    @field_validator("density")
    @classmethod
    def _density_in_unit_interval(cls, v: Range | None) -> Range | None:
        if v is not None and not (0 < v.low <= v.high <= 1):
            raise ValueError(f"density range must lie in (0, 1], got [{v.low}, {v.high}]")
        return v

    @model_validator(mode="after")
    def _searched_once(self) -> SearchSpaceSpec:
        both = sorted(set(self.method_params) & set(self.method_choices))
        if both:
            raise ValueError(f"{both} searched both as a range (method_params) and as choices (method_choices)")
        if self.method_params and self.filters and any(f == "*" for f in self.filters):
            raise ValueError("the filter '*' means every tensor to mergekit: a searched method parameter has no "
                             "mergekit form with it")
        return self


class ObjectiveSpec(_Strict):
    """``lm_eval`` (a task's metric), ``sparsity`` (L1 of the merged delta), ``perplexity`` on ``data``,
    or the cost of the lm_eval objectives' evaluation: ``tokens`` (mean generated tokens per item of
    its generation tasks, or of ``task``) and ``latency`` (seconds per item)."""

    kind: Literal["lm_eval", "sparsity", "perplexity", "tokens", "latency"] = "lm_eval"
    task: Word | None = None
    metric: Word = "exact_match"
    filter: Word = "none"
    direction: Literal["maximize", "minimize"] | None = Field(
        default=None, description="default: lm-eval's higher_is_better; minimize for sparsity and perplexity")
    samples: int | None = Field(default=100, ge=1, le=10_000_000)
    subset_seed: int = Field(default=0, ge=0, le=2**32 - 1,
                             description="picks the fixed document subset; independent of the "
                             "study seed so that studies score (and cache) the same documents")
    data: PathLike | None = Field(default=None, description="text for a perplexity objective: jsonl or text file")

    @property
    def key(self) -> str:
        """The objective's name in results and in ``reference_point``."""
        return objective_key(self.kind, self.task, self.metric, self.filter, self.data)

    @model_validator(mode="after")
    def _fields_of_kind(self) -> ObjectiveSpec:
        if self.kind == "lm_eval" and not self.task:
            raise ValueError("an lm_eval objective needs a 'task'")
        if self.kind == "perplexity" and not self.data:
            raise ValueError("a perplexity objective needs 'data'")
        if self.kind == "latency" and self.task:
            raise ValueError("a latency objective covers every lm_eval objective's items: it takes no 'task'")
        if self.kind != "lm_eval" and self.direction is None:
            self.direction = "minimize"
        return self


class SamplerSpec(_Strict):
    name: Literal["nsga2", "mmmo-bo", "random", "tpe", "gp", "cmaes"] = "nsga2"
    population_size: int = Field(default=8, ge=2, le=10_000)
    crossover_prob: float = Field(default=0.9, ge=0, le=1)
    mutation_prob: float | None = Field(default=None, ge=0, le=1)
    n_startup_trials: int = Field(default=10, ge=1, le=100_000, description="trials before the model proposes: "
                                  "random for mmmo-bo, gp, tpe and cmaes; a Sobol design for nsga2 "
                                  "(at most half its warm-up)")
    warmup_trials: int | None = Field(default=None, ge=0, le=100_000, description="nsga2: model-proposed generation 0 "
                                      "(default 2 x population_size; 0 = Optuna's NSGA-II as it ships)")
    warmup: Literal["gp", "tpe"] = Field(default="gp", description="nsga2: the model of the warm-up generation")
    screen: int = Field(default=8, ge=1, le=256, description="nsga2: children bred per trial, of which a GP "
                        "surrogate keeps the most promising (1 = no screening)")
    model_child: bool = Field(default=True, description="nsga2: the warm-up model's own proposal competes with "
                              "the bred children in the screening")
    tie_groups: bool = Field(default=True, description="nsga2: with layer groups / filters, the warm-up proposes "
                             "one value per expert and parameter for all its groups (a structure prior)")


class FidelitySpec(_Strict):
    """Multi-fidelity trials (``search.fidelity``): each lm_eval objective's ``samples`` is the top of a
    ladder growing by ``eta`` per rung down from the top to at least ``min_samples`` items (for the
    objective with the most)."""

    min_samples: int = Field(ge=1, le=10_000_000)
    eta: int = Field(default=4, ge=2, le=64)


class BudgetSpec(_Strict):
    trials: int = Field(default=24, ge=1, le=100_000)
    seconds: float | None = Field(default=None, gt=0, description="wall time; no new trial starts after it")


class ConstraintSpec(_Strict):
    """A bound on one objective (by its key, e.g. ``sparsity``); trials outside it are infeasible."""

    objective: Word
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> ConstraintSpec:
        if (self.max is None) == (self.min is None):
            raise ValueError("give exactly one of 'max' or 'min'")
        return self

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 is feasible."""
        return value - self.max if self.max is not None else self.min - value


class SelectionSpec(_Strict):
    """How the final trial is picked from the front: ``knee``, ``weights`` or ``best:<objective key>``."""

    policy: str = Field(default="knee", pattern=r"^(knee|weights|best:.+)$")
    weights: dict[Word, float] | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _weights_for_weights(self) -> SelectionSpec:
        if self.policy == "weights" and not self.weights:
            raise ValueError("policy 'weights' needs 'weights' (objective key -> preference)")
        return self


class StudySpec(_Strict):
    version: Literal[1] = SPEC_VERSION
    name: str = Field(default="study", min_length=1, max_length=200)
    base: PathLike = Field(description="base model directory (or hub id)")
    experts: list[ExpertSpec] = Field(min_length=1, max_length=MAX_EXPERTS)
    method: Word | Annotated[list[Word], Field(min_length=2, max_length=8)] = Field(
        default="obim", description="the merge method, or a list of methods searched as one categorical "
        "(`method`): each trial merges with its method and the parameters that method takes")
    method_params: dict[Word, Scalar] = Field(default_factory=dict, max_length=32,
                                              description="global merge parameters (with several methods: "
                                              "each method takes those it knows)")
    search_space: SearchSpaceSpec = SearchSpaceSpec()
    objectives: list[ObjectiveSpec] = Field(min_length=1, max_length=MAX_OBJECTIVES)
    task_paths: list[PathLike] = Field(default_factory=list, max_length=16,
                                       description="directories of your own lm-eval task YAML")
    sampler: SamplerSpec = SamplerSpec()
    budget: BudgetSpec = BudgetSpec()
    constraints: list[ConstraintSpec] = Field(default_factory=list, max_length=64)
    selection: SelectionSpec = SelectionSpec()
    reference_point: dict[Word, float] | None = Field(
        default=None, max_length=64,
        description="hypervolume reference per objective key; derived from the trials if unset")
    warm_start: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(
        default_factory=list, max_length=100, description="earlier studies (same base, experts and "
                                  "method) whose evaluated trials seed this one without being re-evaluated")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)  # samplers seed numpy: 32 bits
    tokenizer: dict[str, Any] | None = Field(
        default=None, description="mergekit's tokenizer setting ({source: base | union | MODEL, tokens, "
        "pad_to_multiple_of}): experts with other or resized vocabularies merge in the output vocabulary")
    tokenizer_source: str | None = Field(default=None, min_length=1, max_length=4096,
                                         description="mergekit's shorthand: tokenizer: {source: ...}")
    allow_unrelated: bool = Field(default=False, description="merge experts that do not look fine-tuned from the "
                                  "base (e.g. long continual pretraining): warned about, not refused")
    fidelity: FidelitySpec | None = Field(
        default=None, description="score new configurations on a few items first and promote the promising "
        "ones rung by rung to the objectives' samples (asynchronous successive halving)")
    calibration: PathLike | None = Field(
        default=None, description="OBIM's shared general calibration text (jsonl or text file, or task:NAME), "
        "read when method_params.calibration is shared or both")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="what workers hold the models in and merge into (each tensor is merged in "
        "float32 and cast back); unset: the checkpoint's own dtype, or the worker's --dtype")

    @model_validator(mode="after")
    def _one_tokenizer_setting(self) -> StudySpec:
        """``tokenizer_source: X`` is ``tokenizer: {source: X}``; the setting checked as mergekit's."""
        from merging.config import TokenizerSetting
        from merging.errors import MergeError

        try:
            setting = TokenizerSetting.from_mergekit(self.tokenizer_source, self.tokenizer)
        except MergeError as exc:
            raise ValueError(str(exc)) from None
        self.tokenizer = setting.to_dict() if setting is not None else None
        self.tokenizer_source = None
        return self

    @property
    def methods(self) -> list[str]:
        """The method, or the methods searched among."""
        return list(self.method) if isinstance(self.method, list) else [self.method]

    @field_validator("method")
    @classmethod
    def _distinct_methods(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError(f"the methods searched among must be distinct, got {v}")
        return v

    def dimensions(self) -> int:
        """How many parameters the search space has (``SearchSpace(spec).distributions()``'s length)."""
        ss = self.search_space
        per_expert = (ss.weight is not None) + (ss.density is not None)
        return (len(self.experts) * per_expert * ss.groups() + len(ss.method_params) * ss.method_groups()
                + len(ss.method_choices) + (len(self.methods) > 1))

    @model_validator(mode="after")
    def _bounded_space(self) -> StudySpec:
        if self.dimensions() > MAX_DIMENSIONS:
            raise ValueError(f"the search space has {self.dimensions()} parameters, more than the {MAX_DIMENSIONS} "
                             "allowed: fewer experts, fewer filters or larger layer_groups")
        if self.dimensions() == 0 and self.budget.trials != 1:
            # A fixed method (model_stock, arcee_fusion) can still be scored: one trial, one configuration.
            raise ValueError("the search space has no parameters, so every trial would be the same merge: set "
                             "budget.trials to 1 to score it, or search the experts' weight or density, or the "
                             "method's parameters (search_space.method_params, search_space.method_choices)")
        fixed = sorted(set(self.method_params) & (set(self.search_space.method_params)
                                                  | set(self.search_space.method_choices)))
        if fixed:
            raise ValueError(f"{fixed} both fixed (method_params) and searched (search_space)")
        return self

    @model_validator(mode="after")
    def _fidelity_ladder(self) -> StudySpec:
        if self.fidelity is None:
            return self
        scored = [o for o in self.objectives if o.kind == "lm_eval"]
        if not scored or any(o.samples is None for o in scored):
            raise ValueError("multi-fidelity needs lm_eval objectives with 'samples' set (the top rung)")
        top = max(o.samples for o in scored)
        if self.fidelity.min_samples * self.fidelity.eta > top:
            raise ValueError(f"fidelity.min_samples ({self.fidelity.min_samples}) x eta ({self.fidelity.eta}) must be "
                             f"at most the objectives' largest samples ({top}, the top rung): no lower rung fits")
        tasks = [o.task for o in scored]
        if len(set(tasks)) != len(tasks):
            raise ValueError("multi-fidelity scores each task's items rung by rung: one lm_eval objective per task")
        counts = self.ladder().counts
        for task in tasks:
            sizes = [c[task] for c in counts]
            if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
                raise ValueError(f"task '{task}': its samples give rungs of {sizes} items; every rung must add "
                                 "items (more samples, or a larger fidelity.min_samples)")
        return self

    def ladder(self):
        """The fidelity ladder (``search.fidelity.Ladder``), or None without ``fidelity``."""
        if self.fidelity is None:
            return None
        from search.fidelity import ladder

        return ladder({o.task: o.samples for o in self.objectives if o.kind == "lm_eval"},
                      self.fidelity.min_samples, self.fidelity.eta)

    def reference(self) -> list[float] | None:
        """The hypervolume reference point in objective order, when the spec gives all of it."""
        given = self.reference_point or {}
        keys = [o.key for o in self.objectives]
        return [given[k] for k in keys] if all(k in given for k in keys) else None

    @field_validator("objectives")
    @classmethod
    def _distinct_objectives(cls, v: list[ObjectiveSpec]) -> list[ObjectiveSpec]:
        seen = [(o.kind, o.task, o.metric, o.filter, o.data) for o in v]
        if len(set(seen)) != len(seen):
            raise ValueError("objectives must be distinct")
        scored = {o.task for o in v if o.kind == "lm_eval"}
        for o in v:
            if o.kind in ("tokens", "latency") and not scored:
                raise ValueError(f"a {o.kind} objective is measured on the lm_eval objectives' items: add one")
            if o.kind == "tokens" and o.task and o.task not in scored:
                raise ValueError(f"a tokens objective's task '{o.task}' must be one of the lm_eval objectives' "
                                 f"tasks {sorted(scored)}")
        return v

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, v: list[ExpertSpec]) -> list[ExpertSpec]:
        names = [e.name for e in v]
        if "method" in names:
            raise ValueError("'method' is reserved (it names searched merge parameters)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {dupes}")
        return v


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (``*name`` repeats a node: 350 bytes of them expand to
    gigabytes) and with bounded nesting."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted in a spec",
                                              self.peek_event().start_mark)
        self.depth += 1
        if self.depth > MAX_SPEC_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"a spec is nested at most {MAX_SPEC_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_spec_text(text: str | bytes) -> Any:
    """A YAML (or JSON) spec document's data, at most MAX_SPEC_BYTES, without aliases: a
    ValueError otherwise."""
    if len(text.encode() if isinstance(text, str) else text) > MAX_SPEC_BYTES:
        raise ValueError(f"a spec document may be at most {MAX_SPEC_BYTES} bytes")
    loader = _SpecLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {exc}") from None
    finally:
        loader.dispose()


def load_spec(path: Path) -> StudySpec:
    """Read a spec from YAML or JSON (YAML is a superset, so one loader serves both)."""
    with open(path, "rb") as fh:
        text = fh.read(MAX_SPEC_BYTES + 1)
    return StudySpec.model_validate(parse_spec_text(text))
