"""MergeConfig: everything that determines one merged model."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from merging.errors import MergeError

# A tensor's decoder layer: the N of ``layers.N.`` in its name (mergekit's names for Llama-, Mistral-,
# Qwen-, Gemma-, Phi- and GPT-NeoX-like models). Tensors without one (embeddings, the final norm,
# lm_head) are outside the layers.
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Scalar = bool | int | float | str
TOKENIZER_SOURCES = ("base", "union")  # or a model reference


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _describe(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def layer_position(tensor: str, num_layers: int | None) -> float:
    """Where mergekit evaluates a gradient for ``tensor``: ``t = i / (num_layers - 1)`` for layer ``i``
    (``1`` when the model has one layer), ``0`` outside the layers (mergekit plans the embeddings,
    the final norm and lm_head with ``t = 0``)."""
    match = LAYER.search(tensor)
    if match is None:
        return 0.0
    index = int(match.group(1))
    if num_layers is None:
        raise MergeError(f"tensor '{tensor}': a gradient needs the model's layer count")
    if index >= num_layers:
        raise MergeError(f"tensor '{tensor}' is in layer {index}, but the model has {num_layers} layers")
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: tuple[Scalar, ...], t: float) -> Scalar:
    """mergekit's gradient (``config.evaluate_setting``), float for float: numbers interpolate linearly
    between neighbouring entries at ``t * (len - 1)``; booleans and strings pick an entry."""
    if not all(_is_number(v) for v in values):
        return values[int(t * (len(values) - 1))]
    floats = [float(v) for v in values]
    scaled = t * (len(floats) - 1)
    i0 = int(scaled)
    i1 = min(len(floats) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * floats[i0] + frac * floats[i1]


@dataclass(frozen=True)
class Setting:
    """One parameter's value as mergekit's YAML writes it: a scalar; a gradient (a list of scalars,
    interpolated over the layers); or a list of ``{filter: SUBSTRING, value: SCALAR_OR_GRADIENT}``
    entries, the first whose filter is in the tensor's name winning (an entry without a filter, or
    with ``*``, matches every tensor). ``entries``: ``(filter, value)`` pairs, a gradient as a tuple."""

    entries: tuple[tuple[str | None, Scalar | tuple[Scalar, ...]], ...]

    @classmethod
    def parse(cls, raw: Any, name: str, where: str) -> Setting:
        """Read a setting; a malformed one raises a one-line MergeError naming ``where`` and ``name``."""
        at = f"{where}: '{name}'"
        if isinstance(raw, Mapping):
            raw = [raw]
        if isinstance(raw, list) and raw and all(isinstance(e, Mapping) for e in raw):
            entries = []
            for i, entry in enumerate(raw):
                unknown = sorted(set(entry) - {"filter", "value"})
                if unknown:
                    raise MergeError(f"{at}: entry {i} has unknown key(s) {unknown}; an entry is "
                                     "{filter: SUBSTRING, value: NUMBER or [NUMBERS]}")
                if "value" not in entry:
                    raise MergeError(f"{at}: entry {i} ({_describe(dict(entry))}) has no 'value'")
                filt = entry.get("filter")
                if filt is not None and not isinstance(filt, str):
                    raise MergeError(f"{at}: entry {i}'s filter must be a string (a substring of tensor names), "
                                     f"got {_describe(filt)}")
                entries.append((filt, cls._value(entry["value"], f"{at}: entry {i}'s value")))
            return cls(tuple(entries))
        return cls(((None, cls._value(raw, at)),))

    @staticmethod
    def _value(raw: Any, at: str) -> Scalar | tuple[Scalar, ...]:
        if isinstance(raw, (bool, int, float, str)):
            return raw
        if raw is None:
            raise MergeError(f"{at} has no value")
        if not isinstance(raw, list):
            raise MergeError(f"{at} must be a number, a list of numbers or a list of filter entries, "
                             f"got {_describe(raw)}")
        if not raw:
            raise MergeError(f"{at} is an empty list")
        if any(isinstance(v, Mapping) for v in raw):
            raise MergeError(f"{at} mixes filter entries with other values (entries cannot nest)")
        bad = [v for v in raw if not isinstance(v, (bool, int, float, str))]
        if bad:
            raise MergeError(f"{at}: a gradient holds numbers, got {_describe(bad[0])} in {_describe(raw)}")
        kinds = {"number" if _is_number(v) else type(v).__name__ for v in raw}
        if len(kinds) > 1:
            raise MergeError(f"{at}: a gradient mixes {' and '.join(sorted(kinds))} values: {_describe(raw)}")
        return tuple(raw)

    @property
    def gradient(self) -> bool:
        return any(isinstance(v, tuple) for _, v in self.entries)

    @property
    def constant(self) -> bool:
        """One value for every tensor: a plain scalar."""
        return len(self.entries) == 1 and self.entries[0][0] in (None, "*") and not self.gradient

    def at(self, tensor: str, t: float) -> Scalar | None:
        """The value for ``tensor`` at layer position ``t`` (:func:`layer_position`); None when no
        entry's filter matches (mergekit then looks at the next scope: the global ``parameters``)."""
        for filt, value in self.entries:
            if filt is None or filt == "*" or (tensor and filt in tensor):
                return interpolate(value, t) if isinstance(value, tuple) else value
        return None

    def values(self, positions: set[float] | frozenset[float]) -> list[Scalar]:
        """Every value some tensor at one of ``positions`` can get (each entry's, whatever matches)."""
        out: dict[tuple[str, Scalar], Scalar] = {}
        for _, value in self.entries:
            for v in ([interpolate(value, t) for t in sorted(positions)] if isinstance(value, tuple) else [value]):
                out.setdefault((type(v).__name__, v), v)
        return list(out.values())

    def raw(self) -> Any:
        """The YAML/JSON form: a scalar, a list, or a list of entries."""

        def plain(value: Scalar | tuple[Scalar, ...]) -> Any:
            return list(value) if isinstance(value, tuple) else value

        if len(self.entries) == 1 and self.entries[0][0] is None:
            return plain(self.entries[0][1])
        return [({"filter": f} if f is not None else {}) | {"value": plain(v)} for f, v in self.entries]


def parse_settings(raw: Mapping[str, Any], where: str) -> dict[str, Setting]:
    if not isinstance(raw, Mapping):
        raise MergeError(f"{where}: parameters must be a mapping of names to values, got {_describe(raw)}")
    return {name: Setting.parse(value, name, where) for name, value in raw.items()}


@dataclass(frozen=True)
class Grouping:
    """mergekit-evolve's granularity: ``layer_groups`` consecutive layers share one parameter set,
    and each tensor ``filter`` (a substring such as ``self_attn`` or ``mlp``) gets its own."""

    layer_groups: int | None = None
    num_layers: int | None = None
    filters: tuple[str, ...] = ()

    def _layer_parts(self) -> list[str]:
        if not self.layer_groups or not self.num_layers:
            return ["all"]
        n = self.layer_groups
        return [f"L{i}-{min(i + n, self.num_layers) - 1}" for i in range(0, self.num_layers, n)] + ["rest"]

    def layers_of(self, group: str) -> range | None:
        """The layers a group's tensors lie in: None for any tensor (no layer groups), an empty range
        for ``rest`` (the tensors outside the layers)."""
        part = group.split("/", 1)[0]
        if part == "all":
            return None
        if part == "rest":
            return range(0)
        first, last = part[1:].split("-")
        return range(int(first), int(last) + 1)

    def groups(self) -> list[str]:
        filters = [*self.filters, "other"] if self.filters else ["all"]
        return [f"{layer}/{f}" for layer in self._layer_parts() for f in filters]

    @property
    def layered(self) -> bool:
        return bool(self.layer_groups and self.num_layers)

    def layer_part(self, index: int | None) -> str:
        """The layer part of the group of a tensor in layer ``index`` (None: outside the layers)."""
        if not self.layer_groups or not self.num_layers:
            return "all"
        if index is None:
            return "rest"  # embeddings, final norm, lm_head
        start = index // self.layer_groups * self.layer_groups
        return f"L{start}-{min(start + self.layer_groups, self.num_layers) - 1}"

    def group_of(self, tensor: str) -> str:
        match = LAYER.search(tensor)
        layer = self.layer_part(int(match.group(1)) if match else None)
        part = "all"
        if self.filters:
            part = next((f for f in self.filters if f in tensor), "other")
        return f"{layer}/{part}"


@dataclass(frozen=True)
class TokenSource:
    """Where a ``tokens:`` entry's row comes from: ``kind`` ``model`` (the model's row of the same
    token), ``model_token`` (a row of the model by ``token_id`` or ``token``), ``zero``, or
    ``none`` (no source given: mergekit cannot fill such a token)."""

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False

    @classmethod
    def parse(cls, raw: Any, token: str) -> TokenSource:
        at = f"tokenizer: tokens: {token!r}"
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise MergeError(f"{at} must be a mapping with 'source' and/or 'force', got {raw!r}")
        unknown = sorted(set(raw) - {"source", "force"})
        if unknown:
            raise MergeError(f"{at}: unknown key(s) {unknown}; an entry has 'source' and 'force'")
        force = raw.get("force", False)
        if not isinstance(force, bool):
            raise MergeError(f"{at}: 'force' must be true or false, got {force!r}")
        source = raw.get("source")
        if source is None:
            return cls("none", force=force)
        if isinstance(source, str):
            return cls("model", model=source, force=force)
        if not isinstance(source, Mapping) or source.get("kind") not in ("zero", "model_token"):
            raise MergeError(f"{at}: 'source' must be a model, {{kind: zero}} or {{kind: model_token, model: M, "
                             f"token: T | token_id: N}}, got {source!r}")
        if source["kind"] == "zero":
            if set(source) != {"kind"}:
                raise MergeError(f"{at}: {{kind: zero}} takes no other key, got {dict(source)!r}")
            return cls("zero", force=force)
        unknown = sorted(set(source) - {"kind", "model", "token_id", "token"})
        if unknown or not isinstance(source.get("model"), str):
            raise MergeError(f"{at}: a model_token source is {{kind: model_token, model: M, token: T | token_id: N}}, "
                             f"got {dict(source)!r}")
        token_id, name = source.get("token_id"), source.get("token")
        if (token_id is None) == (name is None):
            raise MergeError(f"{at}: a model_token source takes one of 'token_id' and 'token'")
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
            raise MergeError(f"{at}: 'token_id' must be an integer, got {token_id!r}")
        if name is not None and not isinstance(name, str):
            raise MergeError(f"{at}: 'token' must be a string, got {name!r}")
        return cls("model_token", model=source["model"], token_id=token_id, token=name, force=force)

    def raw(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind == "model":
            out["source"] = self.model
        elif self.kind == "zero":
            out["source"] = {"kind": "zero"}
        elif self.kind == "model_token":
            out["source"] = {"kind": "model_token", "model": self.model} | (
                {"token_id": self.token_id} if self.token_id is not None else {"token": self.token})
        if self.force:
            out["force"] = True
        return out


@dataclass(frozen=True)
class TokenizerSetting:
    """mergekit's ``tokenizer:`` (``source`` ``base``, ``union`` or a model; ``tokens``;
    ``pad_to_multiple_of``); ``tokenizer_source: X`` is ``tokenizer: {source: X}``."""

    source: str = "union"
    tokens: tuple[tuple[str, TokenSource], ...] = ()
    pad_to_multiple_of: int | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> TokenizerSetting:
        """From the ``tokenizer:`` mapping (mergekit's defaults: ``source: union``)."""
        if not isinstance(raw, Mapping):
            raise MergeError(f"tokenizer: must be a mapping (source, tokens, pad_to_multiple_of), got {raw!r}")
        unknown = sorted(set(raw) - {"source", "tokens", "pad_to_multiple_of"})
        if unknown:
            raise MergeError(f"tokenizer: unknown key(s) {unknown}; known: source, tokens, pad_to_multiple_of")
        source = raw.get("source", "union")
        if not isinstance(source, str) or not source:
            raise MergeError(f"tokenizer: 'source' must be base, union or a model, got {source!r}")
        tokens = raw.get("tokens") or {}
        if not isinstance(tokens, Mapping) or not all(isinstance(t, str) for t in tokens):
            raise MergeError(f"tokenizer: 'tokens' must map tokens (strings) to entries, got {tokens!r}")
        pad = raw.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise MergeError(f"tokenizer: 'pad_to_multiple_of' must be a positive integer, got {pad!r}")
        return cls(source, tuple((t, TokenSource.parse(e, t)) for t, e in tokens.items()), pad)

    @classmethod
    def from_mergekit(cls, tokenizer_source: Any = None, tokenizer: Any = None) -> TokenizerSetting | None:
        """The setting of a mergekit config's two keys (None: neither given)."""
        if tokenizer_source is not None and tokenizer is not None:
            raise MergeError("config: cannot specify both tokenizer_source and tokenizer")  # mergekit's words
        if tokenizer is not None:
            return cls.parse(tokenizer)
        if tokenizer_source is not None:
            if not isinstance(tokenizer_source, str) or not tokenizer_source:
                raise MergeError(f"config: 'tokenizer_source' must be base, union or a model, got {tokenizer_source!r}")
            return cls(tokenizer_source)
        return None

    def to_dict(self) -> dict[str, Any]:
        """The ``tokenizer:`` mapping, in mergekit's form (only what differs from its defaults)."""
        out: dict[str, Any] = {"source": self.source}
        if self.tokens:
            out["tokens"] = {t: s.raw() for t, s in self.tokens}
        if self.pad_to_multiple_of is not None:
            out["pad_to_multiple_of"] = self.pad_to_multiple_of
        return out

    def map_models(self, fn: Callable[[str], str]) -> TokenizerSetting:
        """The setting with each model reference passed through ``fn`` (to resolve relative paths)."""
        source = self.source if self.source in TOKENIZER_SOURCES else fn(self.source)
        tokens = tuple((t, s if s.model is None else TokenSource(s.kind, fn(s.model), s.token_id, s.token, s.force))
                       for t, s in self.tokens)
        return TokenizerSetting(source, tokens, self.pad_to_multiple_of)


# Per method, a version bumped when a parameter's default changes the merge of a config that does
# not set it: the results cache (keyed by the fingerprint) then never answers with the old merge.
DEFAULTS_CHANGED = {"obim": 2}  # 2: granularity row (was tensor)


@dataclass(frozen=True)
class ExpertRef:
    name: str
    path: str
    # name -> mergekit setting: a scalar, a gradient over the layers, or filter entries (`Setting`)
    params: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None  # OBIM's calibration texts (jsonl or text file)
    group_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> params overriding params

    def params_for(self, group: str | None) -> dict[str, Any]:
        return {**self.params, **self.group_params.get(group, {})} if group else dict(self.params)


@dataclass(frozen=True)
class MergeConfig:
    method: str
    base: str
    experts: tuple[ExpertRef, ...]
    params: dict[str, Any] = field(default_factory=dict)  # global settings: every expert's default
    seed: int = 0  # seeds DARE/DELLA's random masks, per tensor
    grouping: Grouping | None = None
    dtype: str | None = None  # what the model is held and written in; None: the checkpoint's own
    allow_unrelated: bool = False  # merge experts that do not look fine-tuned from the base (warned, not refused)
    # False: mergekit's config named no base_model; ``base`` (the first model) only gives the layout,
    # side files and tokenizer, and a method with an optional base merges the models themselves.
    base_input: bool = True
    # mergekit's `tokenizer:` ({source: base | union | MODEL, tokens, pad_to_multiple_of}; `tokenizer_source: X`
    # is {source: X}): the output vocabulary every model's embeddings are aligned to (merging.vocab).
    # None: the base's vocabulary, and every expert must have the base's shapes.
    tokenizer: dict[str, Any] | None = None
    # OBIM's shared calibration text (jsonl, text file or task:NAME), read under `calibration: shared | both`
    calibration: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Options at their defaults are left out: configs from before them keep their fingerprints
        # (results cache keys) and their exports.
        for key, default in (("dtype", None), ("allow_unrelated", False), ("tokenizer", None), ("base_input", True),
                             ("calibration", None)):
            if data[key] == default:
                del data[key]
        return data

    @property
    def ancestry(self) -> bool | str:
        """How ``merging.checks`` treats a base that does not look like the experts' ancestor:
        no check for ``linear`` (it takes no deltas), a warning when allowed, else a refusal."""
        if self.method == "linear" or not self.base_input:
            return False
        return "warn" if self.allow_unrelated else True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeConfig:
        experts = tuple(ExpertRef(**e) for e in data["experts"])
        grouping = data.get("grouping")
        if grouping is not None:
            grouping = Grouping(grouping.get("layer_groups"), grouping.get("num_layers"),
                                tuple(grouping.get("filters") or ()))
        return cls(method=data["method"], base=data["base"], experts=experts,
                   params=dict(data.get("params", {})), seed=int(data.get("seed", 0)), grouping=grouping,
                   dtype=data.get("dtype"), allow_unrelated=bool(data.get("allow_unrelated", False)),
                   tokenizer=data.get("tokenizer"), base_input=bool(data.get("base_input", True)),
                   calibration=data.get("calibration"))

    def experts_identity(self) -> list[tuple[str, str, str | None]]:
        """What determines the resident state (not the per-trial parameters)."""
        shared = [("", "", self.calibration)] if self.calibration else []
        return [(e.name, e.path, e.calibration) for e in self.experts] + shared

    def fingerprint(self) -> str:
        """A stable hash of the merge: equal configs give equal models."""
        data = self.to_dict()
        data.pop("allow_unrelated", None)  # a check's leniency, not part of the model
        if self.method in DEFAULTS_CHANGED:  # a config leaving a changed default unset is another merge now
            data["defaults"] = DEFAULTS_CHANGED[self.method]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
