"""Vocabularies: mergekit 0.1.5's ``tokenizer_source`` and ``tokenizer:``, for experts whose
tokenizers differ from the base's (added tokens, resized embeddings).

A merge with a tokenizer setting first builds an output tokenizer (``base``: the base's, stripped
of ids at or above its config's ``vocab_size``; ``union``: the base's plus every model's tokens
and added tokens; a model reference: that model's) and, per model, a permutation from output id
to that model's id (``-1`` where the model lacks the token). Every vocabulary-indexed tensor (the
input embeddings, the output head and its bias; tied ones are one file tensor) of every model,
the base included, is then re-indexed into the output vocabulary; rows a model lacks get a
default: the one model's row when only one has the token, the base's when the base has it, the
average of the models that have it otherwise, nothing (zeros) when none does; ``tokens:``
entries name a token's source instead, and ``force`` applies it to every model. Rows past the
vocabulary (``pad_to_multiple_of``) are each model's mean row. The merge method then runs on the
aligned tensors as usual, and the output's config ``vocab_size`` and tokenizer are the output
vocabulary's. Ported from ``mergekit/tokenizer/build.py`` and ``mergekit/tokenizer/embed.py``;
where mergekit crashes (a token at an id beyond a model's ``vocab_size``, a ``tokens:`` entry
new to the ``base`` tokenizer) the model is taken not to have the token.

:class:`Vocabulary` is the output tokenizer and the permutations; :func:`align` wraps each
model's :class:`merging.io.TensorReader` so that its vocabulary tensors come out aligned (built
one tensor name at a time; the default rows of the current name are the only cache) and every
other tensor unchanged.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from merging.config import MergeConfig, TokenizerSetting
from merging.errors import MergeError
from merging.io import TensorReader, model_dir

log = logging.getLogger(__name__)

# ---- tokenizers (mergekit/tokenizer/build.py) ----


def config_vocab_size(directory: Path) -> int | None:
    """``vocab_size`` of a checkpoint's config.json (its text config's, for a composite model)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for scope in (config, config.get("text_config") or {}):
        value = scope.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), use_fast=True)


def stripped_tokenizer(directory: Path):
    """The tokenizer of a model without the tokens at ids its embeddings do not have (at or above
    its config's ``vocab_size``), and without the merges that make or use them. Only BPE
    tokenizers can be stripped (mergekit's limit)."""
    from tokenizers import Tokenizer

    tokenizer = _load_tokenizer(directory)
    vocab_size = config_vocab_size(directory) or len(tokenizer.get_vocab())
    unused = {tok for tok, idx in tokenizer.get_vocab().items() if idx >= vocab_size}
    if not unused:
        return tokenizer
    if not tokenizer.is_fast:
        raise MergeError(f"model '{directory}' has tokens beyond its vocab_size and no fast tokenizer: it cannot be "
                         "used in a tokenizer merge")
    spec = json.loads(tokenizer._tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise MergeError(f"the tokenizer of '{directory}' has tokens beyond its vocab_size ({vocab_size}) and type "
                         f"{spec['model']['type']}; only BPE tokenizers can be stripped for a tokenizer merge")
    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < vocab_size]
    for tok in unused:
        spec["model"]["vocab"].pop(tok, None)

    def keep(merge) -> bool:
        if isinstance(merge, str) and merge.count(" ") == 1:
            parts = merge.split(" ")
        elif isinstance(merge, list):
            parts = merge
        else:
            raise MergeError(f"the tokenizer of '{directory}' has a merge of unexpected form: {merge!r}")
        # mergekit checks the parts only; a merge making a stripped token would not load
        return not any(p in unused for p in parts) and "".join(parts) not in unused

    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return tokenizer


def union_tokenizer(base, tokenizers: Sequence[tuple[object, int | None]]):
    """The base tokenizer (a copy) with every other token of ``tokenizers`` ((tokenizer, its model's
    vocab_size), the base's first) added: plain tokens first, then added tokens, each in the
    order first met."""
    out_vocab: dict[str, int] = {}
    out_added: dict[str, Any] = {}
    warned: set[str] = set()
    for tokenizer, vocab_size in tokenizers:
        vocab_size = vocab_size or tokenizer.vocab_size
        added = tokenizer.added_tokens_decoder
        added_contents = {info.content for info in added.values()}
        for tok, idx in tokenizer.get_vocab().items():
            if idx >= vocab_size or tok in added_contents:
                continue
            out_vocab.setdefault(tok, len(out_vocab))
        for idx, info in added.items():
            if idx >= vocab_size:
                continue
            if info.content in out_added:
                if out_added[info.content] != info and info.content not in warned:
                    log.warning("token %r added with different settings by different models; using the first",
                                info.content)
                    warned.add(info.content)
                continue
            out_added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's own tokenizer stays as it is
        base.save_pretrained(tmp)
        result = _load_tokenizer(Path(tmp))
    base_vocab = base.get_vocab()
    for tok in out_vocab:
        if tok not in out_added and tok not in base_vocab:
            result.add_tokens(tok)
    for info in out_added.values():
        result.add_tokens(info)
    return result


# ---- the output vocabulary and each model's place in it ----


def _same_ref(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


@dataclass
class _Fills:
    """The rows that models lacking a token get (mergekit's ``default_embeds``), as index tensors
    over the output ids."""

    average: Tensor  # (A,) output ids averaged over the models that have them
    donor_ids: Tensor  # (D,) output ids taken from one model's row...
    donor_models: Tensor  # (D,) ...of this model (index into Vocabulary.models)...
    donor_rows: Tensor  # (D,) ...at this row of its own tensor
    zero: Tensor  # (Z,) output ids filled with zeros
    forced: Tensor  # (N,) bool: every model takes the default, not its own row
    has_default: Tensor  # (N,) bool


class Vocabulary:
    """The output tokenizer of a merge and, per model, where each output token's row comes from.

    Args:
        setting: the merge's tokenizer setting.
        base: the base's reference (a directory or a hub id).
        experts: each expert's reference, in the config's order. An expert whose reference is the
            base's (``linear`` merges the base in as an input) is the same model.

    The base is always mergekit's ``base_model`` here (its rows are preferred to an average). A
    ``linear`` YAML without ``base_model`` has none in mergekit, which then averages a token that
    several models have but not all, where mmmo (whose base is then the first model) takes the
    first model's row when it has the token.

    Attributes:
        tokenizer: the output tokenizer (``save_pretrained`` writes it).
        size: the rows of every aligned vocabulary tensor: the vocabulary, padded.
        models: the distinct model references, the base's first; ``index`` maps a reference to it.
        permutations: per model, ``(len(vocab),)`` longs: each output id's row in that model, -1 where
            it lacks the token.

    Raises:
        MergeError: a tokenizer that cannot be stripped or built, a ``tokens:`` entry naming a model
            of no merge input or a token its model lacks.
    """

    def __init__(self, setting: TokenizerSetting, base: str, experts: Sequence[str]) -> None:
        self.setting = setting
        refs = [str(base)]
        for ref in experts:
            if not any(_same_ref(str(ref), r) for r in refs):
                refs.append(str(ref))
        self.models = refs
        dirs = [model_dir(r, str(base)) for r in refs]
        sizes = [config_vocab_size(d) for d in dirs]
        base_tok = stripped_tokenizer(dirs[0])
        tokenizers = [base_tok]
        for ref, d in zip(refs[1:], dirs[1:], strict=True):
            try:
                tokenizers.append(_load_tokenizer(d))
            except Exception as exc:  # noqa: BLE001 - mergekit's fallback: the base's tokenizer
                log.warning("cannot load the tokenizer of '%s' (%s): taking it to be the base's", ref, exc)
                tokenizers.append(base_tok)
        original = [t.get_vocab() for t in tokenizers]  # before the output tokenizer adds anything
        if setting.source == "base":
            # a copy when tokens are added (mergekit adds them to the base's own, which then
            # claims them at ids beyond its vocab_size, and stops)
            out = union_tokenizer(base_tok, []) if setting.tokens else base_tok
        elif setting.source == "union":
            out = union_tokenizer(base_tok, list(zip(tokenizers, sizes, strict=True)))
        else:
            out = _load_tokenizer(model_dir(setting.source, str(base)))
        existing = set(out.get_vocab())
        for tok, _ in setting.tokens:
            if tok not in existing:
                out.add_tokens(tok)
                existing.add(tok)
        self.tokenizer = out
        self.vocab: dict[str, int] = out.get_vocab()
        n = len(self.vocab)
        if max(self.vocab.values(), default=-1) != n - 1:
            raise MergeError(f"the output tokenizer's ids are not 0..{n - 1} (it has {n} tokens, the largest id "
                             f"{max(self.vocab.values())}): its vocabulary cannot index the embeddings")
        pad = setting.pad_to_multiple_of
        self.size = -(-n // pad) * pad if pad else n
        self.permutations = [self._permutation(refs[i], original[i], sizes[i]) for i in range(len(refs))]
        self.original = original
        self.fills = self._fills()
        self._identity = [self.size == n and not bool(self.fills.forced.any()) and torch.equal(p, torch.arange(n))
                          for p in self.permutations]

    def index(self, ref: str) -> int:
        for i, r in enumerate(self.models):
            if _same_ref(str(ref), r):
                return i
        raise MergeError(f"tokenizer: model '{ref}' is not one of the merge's models ({', '.join(self.models)})")

    def _permutation(self, ref: str, model_vocab: Mapping[str, int], vocab_size: int | None) -> Tensor:
        vocab_size = vocab_size if vocab_size is not None else len(model_vocab)
        perm = [-1] * len(self.vocab)
        beyond = []
        for tok, new in self.vocab.items():
            old = model_vocab.get(tok)
            if old is None:
                continue
            if old >= vocab_size:
                beyond.append(tok)
                continue
            perm[new] = old
        if beyond:
            log.warning("model '%s': %d token(s) of its tokenizer lie beyond its vocab_size %d (%r...): taken as "
                        "absent", ref, len(beyond), vocab_size, beyond[0])
        return torch.tensor(perm, dtype=torch.long)

    def _fills(self) -> _Fills:
        """mergekit's ``assign_embedding_sources`` and ``default_embeds``, once for every tensor: what
        fills the rows of a token some model lacks (or that is forced)."""
        perms = [p.tolist() for p in self.permutations]
        configs = dict(self.setting.tokens)
        base = 0
        average: list[int] = []
        zero: list[int] = []
        donors: list[tuple[int, int, int]] = []  # (output id, model, its row)
        forced: list[int] = []
        for tok, i in self.vocab.items():
            cfg = configs.get(tok)
            holders = [m for m, p in enumerate(perms) if p[i] >= 0]
            if cfg is not None and cfg.force:
                forced.append(i)
            elif len(holders) == len(perms):
                continue  # every model has it: no default needed
            if cfg is None:
                if len(holders) == 1:
                    donors.append((i, holders[0], perms[holders[0]][i]))
                elif not holders:
                    log.warning("token %r is in no model: its rows are zero", tok)
                    zero.append(i)
                elif base in holders:
                    donors.append((i, base, perms[base][i]))
                else:
                    average.append(i)
            elif cfg.kind == "zero":
                zero.append(i)
            elif cfg.kind == "none":
                raise MergeError(f"tokenizer: tokens: {tok!r} has no 'source', and some model lacks the token (or "
                                 "it is forced): name a source")
            else:
                m = self.index(cfg.model)
                if cfg.kind == "model":
                    row = perms[m][i]
                    if row < 0:
                        raise MergeError(f"tokenizer: tokens: {tok!r} comes from model '{cfg.model}', which does not "
                                         "have that token")
                elif cfg.token_id is not None:
                    row = cfg.token_id
                else:
                    if cfg.token not in self.original[m]:
                        raise MergeError(f"tokenizer: tokens: {tok!r} comes from token {cfg.token!r} of model "
                                         f"'{cfg.model}', which does not have that token")
                    row = self.original[m][cfg.token]
                donors.append((i, m, row))

        def ids(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long)

        n = len(self.vocab)
        flags = torch.zeros(n, dtype=torch.bool)
        flags[ids(forced)] = True
        has_default = torch.zeros(n, dtype=torch.bool)
        has_default[ids(average + zero + [d[0] for d in donors])] = True
        return _Fills(average=ids(average), donor_ids=ids([d[0] for d in donors]),
                      donor_models=ids([d[1] for d in donors]), donor_rows=ids([d[2] for d in donors]),
                      zero=ids(zero), forced=flags, has_default=has_default)

    def identity(self, model: int) -> bool:
        """Whether model ``model``'s rows are the output's, unchanged (given ``size`` rows)."""
        return self._identity[model]


# ---- which tensors are vocabulary-indexed ----


def vocabulary_tensors(directory: str | Path, keys: Sequence[str]) -> dict[str, int]:
    """The checkpoint tensors (by file name) indexed by token id, with the axis that is: the input
    embeddings', the output embeddings' weight and bias (mergekit's ``infer_vocabulary_axes``), found
    by transformers on a model built on the meta device from ``directory``'s config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from merging.live_layout import LiveLayout

    try:
        config = AutoConfig.from_pretrained(str(directory))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an unknown architecture, a malformed config
        raise MergeError(f"the vocabulary tensors of '{directory}' cannot be found: transformers cannot build a "
                         f"causal LM from its config.json: {exc}") from exc
    model.tie_weights()
    axes: dict[int, int] = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None) if module is not None else None
            if isinstance(p, torch.nn.Parameter):
                axes[id(p)] = 0
    live = {name: axes[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in axes}
    shapes = {k: (1,) for k in keys}  # the names are all a layout needs here
    layout = LiveLayout(model, shapes)
    out: dict[str, int] = {}
    for target in layout.targets.values():
        if target.is_plain:
            (renamed, key, _), = target.sources
            if renamed in live:
                out[key] = live[renamed]
    if not out:
        raise MergeError(f"'{directory}': no checkpoint tensor is the model's input or output embeddings")
    return out


# ---- aligned readers ----


def _held(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


class _Aligner:
    """Each model's vocabulary tensors re-indexed into the output vocabulary, one name at a time.
    Only the current name's default rows are kept (they need every model's tensor)."""

    def __init__(self, vocab: Vocabulary, readers: Sequence[TensorReader], axes: Mapping[str, int],
                 dtype: torch.dtype | None) -> None:
        self.vocab, self.readers, self.axes, self.held = vocab, list(readers), dict(axes), dtype
        self._lock = threading.Lock()
        self._defaults: tuple[str, Tensor] | None = None  # (name, (N, *rest) rows; valid where has_default)

    def dtype(self, name: str) -> torch.dtype:
        dtypes = [r.dtype(name) for r in self.readers]
        if self.held is not None:
            dtypes = [self.held if d.is_floating_point else d for d in dtypes]
        out = dtypes[0]
        for d in dtypes[1:]:
            out = torch.promote_types(out, d)
        return out

    def shape(self, model: int, name: str) -> tuple[int, ...]:
        shape = list(self.readers[model].shape(name))
        shape[self.axes[name]] = self.vocab.size
        return tuple(shape)

    def _source(self, model: int, name: str) -> Tensor:
        """The model's tensor, vocabulary first, in the promoted dtype."""
        t = _held(self.readers[model].get(name), self.held).to(self.dtype(name))
        t = t.movedim(self.axes[name], 0)
        used = self.vocab.permutations[model]
        rows = int(used.max()) + 1 if len(used) else 0
        if t.shape[0] < rows:
            raise MergeError(f"model '{self.vocab.models[model]}': tensor '{name}' has {t.shape[0]} rows, its "
                             f"tokenizer uses {rows}")
        return t

    def _default_rows(self, name: str) -> Tensor:
        with self._lock:
            if self._defaults is not None and self._defaults[0] == name:
                return self._defaults[1]
            self._defaults = None
            fills, vocab = self.vocab.fills, self.vocab
            n = len(vocab.vocab)
            rows: Tensor | None = None
            count = torch.zeros(len(fills.average), dtype=torch.long)
            for m in range(len(self.readers)):
                needed = fills.average.numel() or bool((fills.donor_models == m).any())
                if not needed:
                    continue
                src = self._source(m, name)
                if rows is None:
                    rows = torch.zeros((n, *src.shape[1:]), dtype=src.dtype)
                if fills.average.numel():
                    p = vocab.permutations[m][fills.average]
                    has = p >= 0
                    ids = fills.average[has]
                    rows[ids] = rows[ids] + src[p[has]]  # mergekit's sum, model by model in order
                    count += has
                mine = fills.donor_models == m
                if bool(mine.any()):
                    wanted = fills.donor_rows[mine]
                    if int(wanted.max()) >= src.shape[0]:
                        raise MergeError(f"tokenizer: a token's row comes from row {int(wanted.max())} of model "
                                         f"'{vocab.models[m]}', whose '{name}' has {src.shape[0]} rows")
                    rows[fills.donor_ids[mine]] = src[wanted]
                del src
            if rows is None:  # only zero fills
                rest = [s for i, s in enumerate(self.readers[0].shape(name)) if i != self.axes[name]]
                rows = torch.zeros((n, *rest), dtype=self.dtype(name))
            if fills.average.numel():
                divisor = count.to(rows.dtype).reshape(-1, *([1] * (rows.dim() - 1)))
                rows[fills.average] = rows[fills.average] / divisor
            self._defaults = (name, rows)
            return rows

    def get(self, model: int, name: str) -> Tensor:
        vocab, fills = self.vocab, self.vocab.fills
        n = len(vocab.vocab)
        p = vocab.permutations[model]
        src = self._source(model, name)
        if vocab.identity(model) and src.shape[0] == vocab.size:
            return src.movedim(0, self.axes[name])
        keep = (p >= 0) & ~fills.forced
        out = torch.zeros((vocab.size, *src.shape[1:]), dtype=src.dtype)  # (size, *rest)
        ids = torch.arange(n)
        out[ids[keep]] = src[p[keep]]
        fill = ~keep & fills.has_default
        if bool(fill.any()):
            out[ids[fill]] = self._default_rows(name)[ids[fill]]
        if vocab.size > n:  # as mergekit: each model's mean row
            out[n:] = torch.mean(out[:n], dim=0)
        return out.movedim(0, self.axes[name])


class AlignedReader:
    """A model's :class:`merging.io.TensorReader` with its vocabulary tensors in the output vocabulary."""

    def __init__(self, aligner: _Aligner, model: int, reader: TensorReader) -> None:
        self._aligner, self._model, self.reader = aligner, model, reader

    def keys(self) -> list[str]:
        return self.reader.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._aligner.axes:
            return self._aligner.shape(self._model, name)
        return self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._aligner.axes:
            return self._aligner.dtype(name)
        return self.reader.dtype(name)

    def get(self, name: str) -> Tensor:
        if name in self._aligner.axes:
            return self._aligner.get(self._model, name)
        return self.reader.get(name)


def align(vocab: Vocabulary, base: TensorReader, experts: Mapping[str, TensorReader],
          expert_refs: Mapping[str, str], axes: Mapping[str, int], *,
          dtype: torch.dtype | None = None) -> tuple[AlignedReader, dict[str, AlignedReader]]:
    """The base and each expert read through the output vocabulary.

    Args:
        vocab: the merge's :class:`Vocabulary`.
        base, experts: each model's reader; ``expert_refs``: each expert's reference (which model
            of ``vocab`` it is).
        axes: the vocabulary tensors and their vocabulary axis (:func:`vocabulary_tensors`); the
            ones a model does not have are left out.
        dtype: what the inputs are held in (the config's ``dtype``): rows are cast to it before they
            are averaged, as mergekit gathers its inputs in its ``dtype``.
    """
    readers: list[TensorReader | None] = [None] * len(vocab.models)
    readers[0] = base
    index = {name: vocab.index(ref) for name, ref in expert_refs.items()}
    for name, reader in experts.items():
        if readers[index[name]] is None:
            readers[index[name]] = reader
    common = {k: a for k, a in axes.items() if all(k in r.keys() for r in readers if r is not None)}
    aligner = _Aligner(vocab, readers, common, dtype)
    return (AlignedReader(aligner, 0, base),
            {name: AlignedReader(aligner, index[name], reader) for name, reader in experts.items()})


# ---- a merge's vocabulary, end to end ----

# What a checkpoint's tokenizer is saved as (mergekit's list, and the vocabulary files of other
# tokenizer types): left out of an output that gets the merge's own tokenizer.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


def aligned(config: MergeConfig, base: TensorReader, experts: Mapping[str, TensorReader], *,
            dtype: torch.dtype | None = None) -> tuple[TensorReader, dict[str, TensorReader], Vocabulary | None]:
    """The readers a merge of ``config`` reads: with a tokenizer setting, each model's vocabulary
    tensors aligned to the output vocabulary (also returned); without one, the readers as given."""
    if config.tokenizer is None:
        return base, dict(experts), None
    refs = {e.name: e.path for e in config.experts}
    vocab = Vocabulary(TokenizerSetting.parse(config.tokenizer), config.base, list(refs.values()))
    axes = vocabulary_tensors(model_dir(config.base), base.keys())
    base, experts = align(vocab, base, experts, refs, axes, dtype=dtype)
    return base, experts, vocab


def write_vocabulary(vocab: Vocabulary, out_dir: Path) -> None:
    """The output's tokenizer (replacing any copied from the base) and its config's ``vocab_size``."""
    out_dir = Path(out_dir)
    for name in TOKENIZER_FILES:
        (out_dir / name).unlink(missing_ok=True)
    vocab.tokenizer.save_pretrained(str(out_dir))
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    scopes = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    for scope in scopes:
        if "vocab_size" in scope or scope is config and len(scopes) == 1:
            scope["vocab_size"] = vocab.size
    path.write_text(json.dumps(config, indent=2))


def fit_model(model, vocab: Vocabulary) -> None:
    """Give a live model (loaded from the base) the output vocabulary's embedding rows."""
    if model.get_input_embeddings().weight.shape[0] != vocab.size:
        model.resize_token_embeddings(vocab.size, mean_resizing=False)


__all__ = ["TOKENIZER_FILES", "AlignedReader", "Vocabulary", "align", "aligned", "config_vocab_size", "fit_model",
           "stripped_tokenizer", "union_tokenizer", "vocabulary_tensors", "write_vocabulary"]
