"""Vocabularies (issue #17, point 4): ``tokenizer_source`` and ``tokenizer:`` against mergekit 0.1.5 itself.

The experts are fine-tunes of one tiny base whose tokenizers differ: ``e0`` adds ``<a>`` and ``<b>``,
``e1`` adds ``<b>``, ``<c>`` and ``<d>``, ``e2`` adds ``<c>`` with its embeddings padded to a multiple of
8 rows (more rows than tokens), ``e3`` keeps the base's. So ``<a>`` and ``<d>`` are one expert's,
``<b>`` and ``<c>`` two experts' (the base has neither). Every case's YAML is merged by mergekit in
one side process and by mmmo; the merged tensors must be equal (float32, bit for bit), the output
tokenizer's vocabulary and the config's ``vocab_size`` the same.

mergekit orders its models as a Python set (``MergeConfiguration.referenced_models``), so the ids a
``union`` gives the tokens new to the base vary from run to run with several experts adding tokens;
mmmo adds them in the config's order. Those cases compare the vocabularies as token sets (the base's
tokens at the same ids) and the vocabulary tensors row by row through the tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from merging.checks import check_compatible
from merging.errors import MergeError
from merging.io import model_dir, open_reference
from merging.mergekit_yaml import parse_mergekit
from merging.plan import MergePlan
from merging.step import expert_inputs, merge_tensor
from merging.vocab import TokenizerSetting, Vocabulary, align, stripped_tokenizer, vocabulary_tensors
from tests.mergekit_side import run_jobs
from tests.tiny_archs import build_arch_set

ADDED = {"e0": ["<a>", "<b>"], "e1": ["<b>", "<c>", "<d>"], "e2": ["<c>"], "e3": []}
PADDED = {"e2": 8}  # resize_token_embeddings(pad_to_multiple_of=...)
TD = {"weight": 0.7, "density": 0.6}


@dataclass(frozen=True)
class Case:
    id: str
    arch: str  # "llama" or "qwen2_tied"
    method: str
    experts: tuple[str, ...]
    tokenizer: dict[str, Any]  # the YAML's tokenizer keys; model names (e0, base) stand for their paths
    same_ids: bool = True  # mergekit's ids are deterministic (at most one expert adds tokens to a union)
    base_model: bool = True
    params: dict[str, Any] = field(default_factory=lambda: {"weight": 0.6})


CASES = [
    Case("union", "llama", "task_arithmetic", ("e0", "e1", "e2"), {"tokenizer_source": "union"}, same_ids=False),
    Case("union-ties", "llama", "ties", ("e0", "e1", "e3"), {"tokenizer_source": "union"}, same_ids=False,
         params=TD),
    Case("base", "llama", "ties", ("e0", "e1", "e2"), {"tokenizer_source": "base"}, params=TD),
    Case("model", "llama", "task_arithmetic", ("e0", "e1", "e2"), {"tokenizer_source": "e1"}),
    Case("tokenizer-union-pad", "llama", "task_arithmetic", ("e0", "e3"),
         {"tokenizer": {"source": "union", "pad_to_multiple_of": 8}}),
    Case("tokenizer-default-source", "llama", "task_arithmetic", ("e2", "e3"), {"tokenizer": {}}),
    Case("tokenizer-tokens", "llama", "task_arithmetic", ("e0", "e1"), {"tokenizer": {"source": "union", "tokens": {
        "<b>": {"source": "e1"},  # two experts have it: one is named instead of their average
        "<z>": {"source": {"kind": "model_token", "model": "base", "token": "q"}},  # new: the base's "q" row
        "a": {"source": {"kind": "zero"}, "force": True},  # every model has it: forced to zero
        "<d>": {"source": {"kind": "model_token", "model": "e0", "token_id": 5}, "force": True},
    }}}, same_ids=False),
    Case("model-tokens-pad", "llama", "task_arithmetic", ("e0", "e1"),
         {"tokenizer": {"source": "e0", "pad_to_multiple_of": 16, "tokens": {"<d>": {"source": "e1"}}}}),
    Case("tied-union", "qwen2_tied", "ties", ("e0", "e1"), {"tokenizer_source": "union"}, same_ids=False,
         params=TD),
    Case("linear-without-base", "llama", "linear", ("e0", "e1"), {"tokenizer_source": "union"}, same_ids=False,
         base_model=False),
]
BY_ID = {c.id: c for c in CASES}


def _resize_experts(arch_set, seed: int) -> None:
    """Give each expert its added tokens: new embedding and output rows, seeded."""
    gen = torch.Generator().manual_seed(seed)
    for name, path in arch_set.experts.items():
        if not ADDED[name]:
            continue
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        old = len(tok)
        tok.add_tokens(ADDED[name])
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=PADDED.get(name), mean_resizing=False)
        with torch.no_grad():
            for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                rows = module.weight[old:]
                rows.copy_(0.02 * torch.randn(rows.shape, generator=gen))
        model.save_pretrained(path)
        tok.save_pretrained(path)


def _doc(case: Case, sets) -> dict[str, Any]:
    s = sets[case.arch]
    paths = {"base": str(s.base), **{k: str(v) for k, v in s.experts.items()}}

    def named(value):
        if isinstance(value, str):
            return paths.get(value, value)
        if isinstance(value, dict):
            return {k: named(v) if k in ("source", "model", "tokens") or isinstance(v, dict) else v
                    for k, v in value.items()}
        return value

    doc: dict[str, Any] = {"merge_method": case.method}
    if case.base_model:
        doc["base_model"] = paths["base"]
    doc["models"] = [{"model": paths[e], "parameters": dict(case.params)} for e in case.experts]
    tokenizer = {k: named(v) for k, v in case.tokenizer.items()}
    if "tokenizer" in tokenizer:
        tokenizer["tokenizer"] = {k: ({t: named(e) for t, e in v.items()} if k == "tokens" else named(v))
                                  for k, v in tokenizer["tokenizer"].items()}
    return doc | tokenizer


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_models")
    out = {}
    for i, arch in enumerate(("llama", "qwen2_tied")):
        out[arch] = build_arch_set(root / arch, arch, experts=4, seed=20 + i)
        _resize_experts(out[arch], seed=30 + i)
    return out


@pytest.fixture(scope="module")
def mergekit_runs(sets, tmp_path_factory, mergekit_python):
    root = tmp_path_factory.mktemp("vocab_mergekit")
    jobs = []
    for case in CASES:
        path = root / f"{case.id}.yml"
        path.write_text(yaml.safe_dump(_doc(case, sets), sort_keys=False))
        jobs.append({"id": case.id, "kind": "yaml", "config": str(path), "out": str(root / case.id)})
    return root, run_jobs(mergekit_python, jobs, root / "side")


def _load(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@dataclass
class Merged:
    tensors: dict[str, torch.Tensor]
    vocab: dict[str, int]
    vocab_size: int
    axes: dict[str, int]


def _mmmo(case: Case, sets) -> Merged:
    """mmmo's merge of the case: the config parsed from the same YAML, merged on the aligned readers."""
    doc = _doc(case, sets)
    setting = TokenizerSetting.from_mergekit(doc.pop("tokenizer_source", None), doc.pop("tokenizer", None))
    config = parse_mergekit(yaml.safe_dump(doc)).config
    vocab = Vocabulary(setting, config.base, [e.path for e in config.experts])
    base = open_reference(config.base)
    readers = {e.name: open_reference(e.path, config.base) for e in config.experts}
    axes = vocabulary_tensors(model_dir(config.base), base.keys())
    base, readers = align(vocab, base, readers, {e.name: e.path for e in config.experts}, axes)
    names = check_compatible(base, readers, ancestry=config.method != "linear")
    plan = MergePlan(config, names=names)
    tensors = {}
    for name in names:
        b32 = base.get(name).float()
        inputs = expert_inputs(plan, b32, (readers[e.name].get(name) for e in config.experts))
        tensors[name] = merge_tensor(plan, name, b32, inputs, [None] * len(inputs), owned=True)
    return Merged(tensors, vocab.vocab, vocab.size, axes)


def _theirs(mergekit_runs, case: Case) -> Merged:
    root, results = mergekit_runs
    result = results[case.id]
    assert result["ok"], f"mergekit refused {case.id}: {result['error']}\n{result.get('traceback', '')}"
    out = root / case.id
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    return Merged(_load(out), vocab, json.loads((out / "config.json").read_text())["vocab_size"], {})


def _compare(case: Case, ours: Merged, theirs: Merged) -> None:
    assert ours.vocab_size == theirs.vocab_size
    assert sorted(ours.vocab) == sorted(theirs.vocab)
    if case.same_ids:
        assert ours.vocab == theirs.vocab
    n = len(ours.vocab)
    order = torch.empty(n, dtype=torch.long)  # our id -> theirs
    for tok, i in ours.vocab.items():
        order[i] = theirs.vocab[tok]
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    for name, expected in theirs.tensors.items():
        got = ours.tensors[name]
        assert got.shape == expected.shape, name
        if name in ours.axes:
            expected = expected.movedim(ours.axes[name], 0)
            got = got.movedim(ours.axes[name], 0)
            if not case.same_ids:
                assert n == got.shape[0], "padding rows are compared only where mergekit's ids are deterministic"
                expected = expected[order]
        if case.method == "linear":  # mmmo's linear adds the experts' deltas to the base (see test_mergekit_parity)
            diff = (got.double() - expected.double()).norm() / expected.double().norm()
            assert diff <= 1e-6, f"{name}: relative L2 error {diff.item():.3g}"
        else:
            assert torch.equal(got, expected), f"{name}: max |diff| {(got - expected).abs().max():.3g}"


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_aligned_merge_matches_mergekit(sets, mergekit_runs, case_id):
    case = BY_ID[case_id]
    _compare(case, _mmmo(case, sets), _theirs(mergekit_runs, case))


def test_a_token_only_one_expert_has_keeps_that_experts_row(sets):
    ours = _mmmo(BY_ID["union"], sets)
    s = sets["llama"]
    for expert, token in (("e0", "<a>"), ("e1", "<d>")):
        own = _load(s.experts[expert])
        row = AutoTokenizer.from_pretrained(s.experts[expert]).get_vocab()[token]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours.tensors[name][ours.vocab[token]], own[name][row]), (expert, token, name)
    # two experts, no base: their average, merged
    assert {"<a>", "<b>", "<c>", "<d>"} <= set(ours.vocab) and ours.vocab_size == len(ours.vocab) == 85


# ---- mmmo alone ----


def test_vocabulary_tensors_follow_transformers(sets, tmp_path):
    llama, tied = sets["llama"].base, sets["qwen2_tied"].base
    assert vocabulary_tensors(llama, open_reference(llama).keys()) == {"model.embed_tokens.weight": 0,
                                                                       "lm_head.weight": 0}
    assert vocabulary_tensors(tied, open_reference(tied).keys()) == {"model.embed_tokens.weight": 0}
    neox = build_arch_set(tmp_path / "neox", "gpt_neox", experts=0).base  # the output head is renamed on load
    assert vocabulary_tensors(neox, open_reference(neox).keys()) == {"gpt_neox.embed_in.weight": 0,
                                                                     "embed_out.weight": 0}


def test_other_tensors_pass_unchanged_and_equal_vocabularies_are_not_copied(sets):
    s = sets["llama"]
    vocab = Vocabulary(TokenizerSetting("base"), str(s.base), [str(s.experts["e3"])])
    base = open_reference(s.base)
    axes = vocabulary_tensors(s.base, base.keys())
    aligned, experts = align(vocab, base, {"e3": open_reference(s.experts["e3"])}, {"e3": str(s.experts["e3"])}, axes)
    assert vocab.identity(0) and vocab.identity(1)
    for name in base.keys():
        assert aligned.shape(name) == base.shape(name)
        assert torch.equal(aligned.get(name), base.get(name)), name
    wide = open_reference(s.experts["e2"])
    vocab = Vocabulary(TokenizerSetting("base"), str(s.base), [str(s.experts["e2"])])
    _, experts = align(vocab, base, {"e2": wide}, {"e2": str(s.experts["e2"])}, axes)
    assert wide.shape("lm_head.weight")[0] == 88 and experts["e2"].shape("lm_head.weight")[0] == 81
    assert torch.equal(experts["e2"].get("lm_head.weight"), wide.get("lm_head.weight")[:81])


def test_settings_parse_as_mergekit_reads_them():
    assert TokenizerSetting.from_mergekit(None, None) is None
    assert TokenizerSetting.from_mergekit("base") == TokenizerSetting("base")
    assert TokenizerSetting.from_mergekit(None, {}).source == "union"
    raw = {"source": "m", "pad_to_multiple_of": 8, "tokens": {"<x>": {"source": {"kind": "zero"}, "force": True},
                                                             "<y>": {"source": "m2"}}}
    assert TokenizerSetting.parse(raw).to_dict() == raw
    with pytest.raises(MergeError, match="cannot specify both tokenizer_source and tokenizer"):
        TokenizerSetting.from_mergekit("union", {"source": "union"})
    for bad, match in (({"sauce": "union"}, "unknown key"), ({"pad_to_multiple_of": 0}, "positive integer"),
                       ({"tokens": {"<x>": {"source": {"kind": "one"}}}}, "'source' must be"),
                       ({"tokens": {"<x>": {"source": {"kind": "model_token", "model": "m"}}}}, "one of 'token_id'")):
        with pytest.raises(MergeError, match=match):
            TokenizerSetting.parse(bad)


def test_token_sources_must_exist(sets):
    s = sets["llama"]
    e0, e1 = str(s.experts["e0"]), str(s.experts["e1"])
    for tokens, match in (({"<d>": {"source": e0}}, "does not have that token"),
                          ({"<d>": {"source": "/elsewhere"}}, "not one of the merge's models"),
                          ({"<new>": {}}, "has no 'source'")):
        with pytest.raises(MergeError, match=match):
            Vocabulary(TokenizerSetting.parse({"source": "union", "tokens": tokens}), str(s.base), [e0, e1])


def test_base_tokens_added_to_base_source_are_new_to_every_model(sets):
    """mergekit adds them to the base's own tokenizer and then stops (KeyError); mmmo fills them."""
    s = sets["llama"]
    setting = TokenizerSetting.parse({"source": "base", "tokens": {"<new>": {"source": {"kind": "zero"}}}})
    vocab = Vocabulary(setting, str(s.base), [str(s.experts["e0"])])
    assert vocab.size == 82 and vocab.vocab["<new>"] == 81
    assert int(vocab.permutations[0][81]) == -1 and int(vocab.permutations[1][81]) == -1
    assert "<new>" not in AutoTokenizer.from_pretrained(s.base).get_vocab()


def test_a_bpe_base_is_stripped_of_tokens_beyond_its_vocab_size(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c"), ("b", "c")]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.add_tokens(["<extra>"])  # id 6
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 5}))
    stripped = stripped_tokenizer(tmp_path)
    assert stripped.get_vocab() == {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}
    assert stripped("abc").input_ids == [4]
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 7}))
    assert len(stripped_tokenizer(tmp_path).get_vocab()) == 7
