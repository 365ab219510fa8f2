"""mergekit's ``slices:`` form: layer stacking ("frankenmerges") and per-slice merges, streamed to disk.

A ``slices:`` config builds a model whose layers are ranges of its sources' layers, one output slice
after another::

    merge_method: passthrough          # or any method: it merges each slice's sources layer by layer
    slices:
      - sources: [{model: A, layer_range: [0, 2]}]
      - sources: [{model: B, layer_range: [1, 3], parameters: {scale: 0.5}}]
    dtype: bfloat16

What mergekit 0.1.5 does (``plan.py``: ``MergePlanner.plan_module`` / ``plan_slice`` / ``plan_layer``),
and so does this module:

* Output layer ``j`` of slice ``s`` at offset ``k`` is, for every tensor of a layer, the merge of each
  source's layer ``layer_range[0] + k`` (all sources of a slice span the same number of layers), renamed
  to layer ``j``: the layers are numbered on across the slices, and config.json's layer count becomes
  their total.
* The tensors outside the layers: those before the layers (the embeddings: "pre weights") come from the
  first slice's sources, those after them (final norm, lm_head: "post weights") from the last slice's,
  merged with the method where a slice has several sources. mergekit's architecture definitions say
  which is which; here a tensor is "pre" when its name says embedding (:data:`PRE_MARKERS`), which
  agrees with every single-stack definition mergekit 0.1.5 ships but phi-1's, which numbers its
  embedding and head as layers (checked in the tests).
* Parameters resolve per tensor as mergekit resolves them: a model's value from its source's
  ``parameters``, then the slice's, then the global ones, filters matched against the source's tensor
  name; the shared (global) parameters from the slice's, then the global ones, matched against the
  output tensor's name. A gradient runs over each slice's own layers (``k / (n - 1)``, 1 for a
  one-layer slice); the tensors outside the layers are at 0.
* ``base_model`` (global, or per slice) is one of the slice's sources for methods that need one
  (mergekit refuses a base that is not among a slice's inputs); methods that merge the base in as an
  input (``linear``, ``passthrough``) take every source as a model, the base among them where listed.
* The result is rounded to the inputs' dtype (mergekit's ``dtype``, else the checkpoints'), then cast
  to ``out_dtype``.
* The output's config, tokenizer and other side files are ``base_model``'s, else the first slice's
  first source's (mergekit takes "the first referenced model", in an order of its own).

Beyond mergekit: a ``layer_types`` list in config.json (transformers 5 writes one for many
architectures: qwen2, gemma2, ...) is rebuilt for the new layers, so the output loads; mergekit 0.1.5
keeps the old list, which transformers 5 refuses to save: its run fails after writing the tensors,
without a config.json. Slices of models of any kind are merged without the ancestry check (stacking
unrelated models is what frankenmerges do; mergekit checks none either).
A study cannot search slices or ``passthrough`` (they change the architecture): see
``service/validation.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from merging.config import Scalar, Setting, parse_settings
from merging.errors import MergeError

# mergekit's architecture inference (``architecture/auto.py``): a tensor's layer is the first ``.N.`` in its name.
LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Tensors outside the layers that come before them (from the first slice); the others come after (from the
# last). ``embed_out`` (GPT-NeoX's output projection) is an "after" one.
PRE_MARKERS = ("embed", "wte", "wpe", "rotary_pos_emb", "relative_pe", "position_ids")
POST_MARKERS = ("embed_out",)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_TOP_KEYS = {"merge_method", "slices", "base_model", "parameters", "dtype", "out_dtype", "seed", "name",
             "tokenizer_source", "tokenizer"}
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def is_pre_weight(name: str) -> bool:
    """Whether a tensor outside the layers precedes them (embeddings), as mergekit's definitions place it."""
    return any(m in name for m in PRE_MARKERS) and not any(m in name for m in POST_MARKERS)


@dataclass(frozen=True)
class SliceSource:
    """``layer_range`` ``[start, end)`` of ``model``, with this source's parameters (raw mergekit settings)."""

    model: str
    layer_range: tuple[int, int]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


@dataclass(frozen=True)
class SlicesPlan:
    """A ``slices:`` merge: the method, the output slices in order, and the merge-wide settings."""

    method: str
    slices: tuple[OutputSlice, ...]
    base_model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # what the inputs are read in (mergekit's ``dtype``)
    out_dtype: str | None = None
    seed: int = 0

    @property
    def num_layers(self) -> int:
        return sum(s.num_layers for s in self.slices)

    @property
    def donor(self) -> str:
        """The model whose config, tokenizer and side files the output takes."""
        return self.base_model or self.slices[0].sources[0].model

    def to_yaml(self) -> str:
        doc: dict[str, Any] = {"merge_method": self.method}
        if self.base_model:
            doc["base_model"] = self.base_model
        doc["slices"] = [
            {"sources": [{"model": s.model, "layer_range": list(s.layer_range)}
                         | ({"parameters": dict(s.params)} if s.params else {}) for s in sl.sources]}
            | ({"base_model": sl.base_model} if sl.base_model else {})
            | ({"parameters": dict(sl.params)} if sl.params else {})
            for sl in self.slices]
        if self.params:
            doc["parameters"] = dict(self.params)
        for key in ("dtype", "out_dtype"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        if self.seed:
            doc["seed"] = self.seed
        return yaml.safe_dump(doc, sort_keys=False)


def _settings(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    return {name: s.raw() for name, s in parse_settings(raw, where).items()}


def _range(raw: Any, where: str) -> tuple[int, int]:
    if (not isinstance(raw, (list, tuple)) or len(raw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)):
        raise MergeError(f"{where}: 'layer_range' must be [START, END] (integers, END exclusive), got {raw!r}")
    start, end = raw
    if not 0 <= start <= end:
        raise MergeError(f"{where}: 'layer_range' {list(raw)} must have 0 <= START <= END")
    return start, end


def parse_slices(doc: Mapping[str, Any], relative_to: Path | None = None) -> SlicesPlan:
    """A mergekit YAML document with ``slices:`` as a :class:`SlicesPlan`; relative model paths resolve
    against ``relative_to`` when it holds them. Checks the shape of everything (not the checkpoints).

    Raises:
        MergeError: a malformed or unsupported key, slices whose sources differ in length.
    """
    if "slices" not in doc:
        raise MergeError("config: no 'slices'")
    if "models" in doc or "modules" in doc:
        raise MergeError("config: give exactly one of 'models' and 'slices' (mergekit's 'modules' is not supported)")
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise MergeError(f"config: unknown key(s) {unknown} beside 'slices'")
    if doc.get("tokenizer") is not None or doc.get("tokenizer_source") not in (None, "base"):
        raise MergeError("config: with 'slices', the tokenizer is the base model's (or the first source's); "
                         "another 'tokenizer_source' or a 'tokenizer' section is not supported")
    if "merge_method" not in doc:
        raise MergeError("config: 'merge_method' is required")
    method = doc["merge_method"]
    if method == "obim":
        raise MergeError("config: 'obim' calibrates whole models; it cannot merge slices")
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None and doc[key] not in DTYPE_NAMES:
            raise MergeError(f"config: '{key}' must be one of {list(DTYPE_NAMES)}, got {doc[key]!r}")

    def resolve(p: Any) -> str:
        if relative_to is not None and not Path(str(p)).is_absolute() and (relative_to / str(p)).exists():
            return str((relative_to / str(p)).resolve())
        return str(p)

    raw_slices = doc["slices"]
    if not isinstance(raw_slices, list) or not raw_slices:
        raise MergeError("config: 'slices' must be a non-empty list of {sources: [...]}")
    slices = []
    for i, raw in enumerate(raw_slices):
        where = f"slices[{i}]"
        if not isinstance(raw, Mapping) or not raw.get("sources"):
            raise MergeError(f"{where}: a slice is {{sources: [{{model: ..., layer_range: [START, END]}}, ...]}}")
        extra = sorted(set(raw) - {"sources", "base_model", "parameters", "residual_weight"})
        if extra:
            raise MergeError(f"{where}: unknown key(s) {extra}")
        # `residual_weight`: mergekit 0.1.5 declares it and never reads it; so neither does mmmo
        sources = []
        for j, src in enumerate(raw["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                raise MergeError(f"{at}: a source is {{model: ..., layer_range: [START, END], parameters: ...}}")
            extra = sorted(set(src) - {"model", "layer_range", "parameters"})
            if extra:
                raise MergeError(f"{at}: unknown key(s) {extra}")
            sources.append(SliceSource(resolve(src["model"]), _range(src["layer_range"], at),
                                       _settings(src.get("parameters"), f"{at} ('{src['model']}')")))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise MergeError(f"{where}: all sources of a slice must span the same number of layers, got "
                             f"{[list(s.layer_range) for s in sources]}")
        models = [s.model for s in sources]
        if len(set(models)) < len(models):
            raise MergeError(f"{where}: a model appears twice among the sources; mergekit takes each model once "
                             "per slice (stack its layer ranges as separate slices)")
        base = resolve(raw["base_model"]) if raw.get("base_model") else None
        slices.append(OutputSlice(tuple(sources), base, _settings(raw.get("parameters"), f"{where}.parameters")))
    base_model = resolve(doc["base_model"]) if doc.get("base_model") else None
    return SlicesPlan(method=method, slices=tuple(slices), base_model=base_model,
                      params=_settings(doc.get("parameters"), "parameters"), dtype=doc.get("dtype"),
                      out_dtype=doc.get("out_dtype"), seed=int(doc.get("seed", 0)))


def load_slices(text: str, relative_to: Path | None = None) -> SlicesPlan | None:
    """The :class:`SlicesPlan` of mergekit YAML text that has ``slices:``; None for any other YAML
    (``merging.mergekit_yaml.parse_mergekit`` reads the ``models:`` form)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeError(f"config is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or "slices" not in doc:
        return None
    return parse_slices(doc, relative_to)


# ---- planning: every output tensor, its sources and its parameters ----

@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: the merge of ``sources`` (model, that model's tensor name), one per
    source of output slice ``slice``, at gradient position ``t``."""

    name: str
    slice: int
    sources: tuple[tuple[str, str], ...]
    t: float


def _layer_of(name: str) -> re.Match | None:
    return LAYER_INDEX.search(name)


class _Stack:
    """One checkpoint seen as a stack of layers: each layer's tensor names, and the tensors outside."""

    def __init__(self, model: str, keys: Sequence[str]) -> None:
        self.model = model
        self.layers: dict[int, list[str]] = {}
        self.outside: list[str] = []
        prefixes = set()
        for name in keys:
            m = _layer_of(name)
            if m is None:
                self.outside.append(name)
                continue
            prefixes.add(name[:m.start()])
            self.layers.setdefault(int(m.group(1)), []).append(name)
        if len(prefixes) > 1:
            raise MergeError(f"model '{model}' has several stacks of layers ({sorted(prefixes)}); mmmo's slices "
                             "take models with one (mergekit's 'modules' form is not supported)")
        self.num_layers = max(self.layers) + 1 if self.layers else 0


def _renumbered(name: str, index: int) -> str:
    m = _layer_of(name)
    assert m is not None
    return f"{name[:m.start(1)]}{index}{name[m.end(1):]}"


def plan_tensors(plan: SlicesPlan, keys_of: Callable[[str], Sequence[str]]) -> list[OutputTensor]:
    """Every output tensor in the order mergekit writes them: the tensors before the layers (from the
    first slice), each output layer's, the tensors after (from the last slice). ``keys_of(model)``:
    the tensor names of a model's checkpoint.

    Raises:
        MergeError: a layer range beyond a model's layers, a tensor missing from some of a slice's sources.
    """
    stacks: dict[str, _Stack] = {}

    def stack(model: str) -> _Stack:
        if model not in stacks:
            stacks[model] = _Stack(model, keys_of(model))
        return stacks[model]

    for i, sl in enumerate(plan.slices):
        for j, src in enumerate(sl.sources):
            n = stack(src.model).num_layers
            if src.layer_range[1] > n:
                raise MergeError(f"slices[{i}].sources[{j}]: layer_range {list(src.layer_range)} goes beyond the "
                                 f"{n} layers of '{src.model}'")

    def outside(index: int, pre: bool) -> list[OutputTensor]:
        sl = plan.slices[index]
        names = list(dict.fromkeys(n for src in sl.sources for n in stack(src.model).outside
                                   if is_pre_weight(n) == pre))
        out = []
        for name in names:
            missing = [src.model for src in sl.sources if name not in set(stack(src.model).outside)]
            if missing:
                raise MergeError(f"slices[{index}]: tensor '{name}' is missing from {missing}; every source of the "
                                 f"{'first' if pre else 'last'} slice gives the tensors "
                                 f"{'before' if pre else 'after'} the layers")
            out.append(OutputTensor(name, index, tuple((src.model, name) for src in sl.sources), 0.0))
        return out

    tensors = outside(0, pre=True)
    j = 0
    for i, sl in enumerate(plan.slices):
        n = sl.num_layers
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            first = sl.sources[0]
            for name in stack(first.model).layers.get(first.layer_range[0] + k, []):
                sources = []
                for src in sl.sources:
                    theirs = _renumbered(name, src.layer_range[0] + k)
                    if theirs not in stack(src.model).layers.get(src.layer_range[0] + k, []):
                        raise MergeError(f"slices[{i}]: '{src.model}' has no tensor '{theirs}' (its layer "
                                         f"{src.layer_range[0] + k} differs from '{first.model}''s)")
                    sources.append((src.model, theirs))
                tensors.append(OutputTensor(_renumbered(name, j), i, tuple(sources), t))
            j += 1
    return tensors + outside(len(plan.slices) - 1, pre=False)


class _SliceMerge:
    """How one output slice merges: which sources are the method's models and which its base, and
    each tensor's parameters resolved as mergekit resolves them (cached per distinct value set)."""

    def __init__(self, plan: SlicesPlan, index: int, method) -> None:
        sl = plan.slices[index]
        self.where = f"slices[{index}]"
        self.method = method
        self.sources = sl.sources
        models = [s.model for s in sl.sources]
        base = sl.base_model or plan.base_model
        if method.base_is_input:  # every source is merged in; a base that is not a source plays no part
            self.base = models.index(base) if base in models else 0
            self.experts = list(range(len(models)))
        elif base is not None:
            if base not in models:
                raise MergeError(f"{self.where}: the base model '{base}' is not among the slice's sources; method "
                                 f"'{method.name}' merges onto it, and mergekit needs it as one of them")
            self.base = models.index(base)
            self.experts = [i for i in range(len(models)) if i != self.base]
        elif method.needs_base:
            raise MergeError(f"{self.where}: method '{method.name}' needs a 'base_model' (global or the slice's), "
                             "one of the slice's sources")
        else:  # as `models:` without a base: the first model is the base, and a model
            self.base = 0
            self.experts = list(range(len(models)))
        if not self.experts:
            raise MergeError(f"{self.where}: method '{method.name}' has no model to merge onto the base (the slice's "
                             "only source is the base)")
        self.names = [f"{Path(sl.sources[i].model.rstrip('/')).name}[{sl.sources[i].layer_range[0]}:"
                      f"{sl.sources[i].layer_range[1]}]" for i in self.experts]
        self.source_settings = [parse_settings(sl.sources[i].params, f"model '{self.names[n]}'")
                                for n, i in enumerate(self.experts)]
        # shared settings in precedence order: the slice's, then the global ones
        self.scopes = [parse_settings(sl.params, f"{self.where}.parameters"), parse_settings(plan.params, "parameters")]
        self.expert_keys = [p.name for p in method.expert_params]
        self._cache: dict[tuple, tuple[list[dict[str, Any]], dict[str, Any]]] = {}

    @staticmethod
    def _first(scopes: Sequence[Mapping[str, Setting]], key: str, tensor: str, t: float) -> Scalar | None:
        for scope in scopes:
            if key in scope and (v := scope[key].at(tensor, t)) is not None:
                return v
        return None

    def params_for(self, out: OutputTensor) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        shared_keys = dict.fromkeys(k for scope in self.scopes for k in scope)
        shared = {k: v for k in shared_keys if (v := self._first(self.scopes, k, out.name, out.t)) is not None}
        rows = []
        for n, i in enumerate(self.experts):
            tensor = out.sources[i][1]  # mergekit matches a model's filters against that model's tensor name
            row = {k: v for k, s in self.source_settings[n].items() if (v := s.at(tensor, out.t)) is not None}
            for key in self.expert_keys:  # the slice's and the global value, at this model's tensor
                if key not in row and (v := self._first(self.scopes, key, tensor, out.t)) is not None:
                    row[key] = v
            rows.append(row)
        cache_key = (tuple(tuple(sorted((k, type(v).__name__, v) for k, v in r.items())) for r in rows),
                     tuple(sorted((k, type(v).__name__, v) for k, v in shared.items())))
        hit = self._cache.get(cache_key)
        if hit is None:
            try:
                hit = self.method.resolve(rows, shared, self.names)
            except MergeError as exc:
                raise MergeError(f"{self.where}, tensor '{out.name}': {exc}") from None
            self._cache[cache_key] = hit
        return hit


def _held(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _held_dtype(dtype: torch.dtype, held: torch.dtype | None) -> torch.dtype:
    return held if held is not None and dtype.is_floating_point else dtype


def _promoted(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype mergekit computes a group of inputs in (and returns its result in)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _patch_config(path: Path, plan: SlicesPlan, configs: Callable[[str], dict]) -> None:
    """config.json with the output's layer count (and a ``layer_types`` list rebuilt for its layers)."""
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    for scope in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None):
        if scope is None:
            continue
        for key in _LAYER_KEYS:
            if isinstance(scope.get(key), int) and not isinstance(scope.get(key), bool):
                scope[key] = plan.num_layers
        if isinstance(scope.get("layer_types"), list):
            types = []
            for sl in plan.slices:
                src = sl.sources[0]
                theirs = configs(src.model)
                theirs = theirs.get("text_config", theirs) if scope is not cfg else theirs
                listed = theirs.get("layer_types") or scope["layer_types"]
                types += [listed[i] if i < len(listed) else listed[-1] for i in range(*src.layer_range)]
            scope["layer_types"] = types
    path.write_text(json.dumps(cfg, indent=2))


def merge_slices_to_dir(plan: SlicesPlan, out_dir: str | Path, *, dtype: str | None = None, device: str = "cpu",
                        max_shard_bytes: int = 5 * 2**30,
                        progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Merge a ``slices:`` config into a new HF model directory ``out_dir`` (one output tensor at a time,
    into a staging directory renamed into place); returns it. ``dtype`` overrides the plan's ``out_dtype``.

    Raises:
        MergeError: before any tensor is merged, for a bad plan (ranges, tensors, parameters, base).
    """
    from merging.files import _copy_side_files, _ShardWriter, parse_dtype
    from merging.io import model_dir, open_reference
    from merging.methods import get_method
    from merging.step import tensor_seed

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MergeError(f"output directory '{out_dir}' exists and is not empty")
    held = parse_dtype(plan.dtype)
    out_name = dtype if dtype is not None else plan.out_dtype
    out_dtype = parse_dtype(out_name)
    method = get_method(plan.method)
    merges = [_SliceMerge(plan, i, method) for i in range(len(plan.slices))]
    readers = {m: open_reference(m, plan.base_model) for m in dict.fromkeys(
        s.model for sl in plan.slices for s in sl.sources)}
    tensors = plan_tensors(plan, lambda m: readers[m].keys())
    entries = []
    for out in tensors:  # shapes agree and every parameter resolves, before any tensor is merged
        shapes = {readers[m].shape(n) for m, n in out.sources}
        if len(shapes) > 1:
            raise MergeError(f"tensor '{out.name}': the sources' shapes differ: "
                             + ", ".join(f"'{n}' of '{m}' {readers[m].shape(n)}" for m, n in out.sources))
        merges[out.slice].params_for(out)
        dtypes = [_held_dtype(readers[m].dtype(n), held) for m, n in out.sources]
        computed = _promoted(dtypes)
        entries.append((out.name, out_dtype if out_dtype is not None and computed.is_floating_point else computed,
                        shapes.pop()))
    dev = torch.device(device)
    configs: dict[str, dict] = {}

    def config_of(model: str) -> dict:
        if model not in configs:
            try:
                configs[model] = json.loads((model_dir(model, plan.base_model) / "config.json").read_text())
            except (MergeError, OSError, ValueError):
                configs[model] = {}
        return configs[model]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        writer = _ShardWriter(staging, entries, max_shard_bytes)
        for n, (out, (_, target, _)) in enumerate(zip(tensors, entries, strict=True)):
            merged = _merge_one(out, merges[out.slice], readers, held, dev, tensor_seed(plan.seed, out.name), target)
            writer.add(out.name, merged.cpu())
            del merged
            if progress:
                progress(out.name, n + 1, len(tensors))
        writer.finish()
        _copy_side_files(model_dir(plan.donor, plan.base_model), staging, out_dtype or held)
        _patch_config(staging / "config.json", plan, config_of)
        (staging / "README.md").write_text(
            "---\nlibrary_name: transformers\ntags: [merge, mmmo]\n---\n"
            f"# Merged with mmmo ({plan.method}, {len(plan.slices)} slices, {plan.num_layers} layers)\n\n"
            f"## Merge configuration\n\n```yaml\n{plan.to_yaml()}```\n")
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _merge_one(out: OutputTensor, merge: _SliceMerge, readers, held: torch.dtype | None, dev: torch.device,
               seed: int, target: torch.dtype) -> Tensor:
    """One output tensor: its sources read (in the held dtype), merged in float32, rounded to the inputs'
    dtype as mergekit's methods return it, then cast to the output's."""
    from merging.methods import TensorInputs

    inputs = [_held(readers[m].get(n), held).to(dev) for m, n in out.sources]
    if not all(x.is_floating_point() for x in inputs):  # buffers: copied where the sources agree (mergekit)
        if any(x.dtype != inputs[0].dtype or not torch.equal(x, inputs[0]) for x in inputs[1:]):
            raise MergeError(f"tensor '{out.name}': the non-floating tensor differs between the slice's sources")
        return inputs[0].clone()
    computed = _promoted([x.dtype for x in inputs])
    experts, params = merge.params_for(out)
    base32 = inputs[merge.base].to(torch.float32, copy=True)
    models = merge.method.takes == "models"
    taken = [inputs[i].to(torch.float32, copy=True) if models else torch.sub(inputs[i], base32)
             for i in merge.experts]
    gen = torch.Generator(device=dev).manual_seed(seed)
    t = TensorInputs(out.name, base32, [] if models else taken, gen, [None] * len(taken), owned=True,
                     models=taken if models else None, key=seed)
    return merge.method.merge(t, experts, params).to(computed).to(target)


__all__ = ["OutputSlice", "OutputTensor", "SliceSource", "SlicesPlan", "is_pre_weight", "load_slices",
           "merge_slices_to_dir", "parse_slices", "plan_tensors"]
