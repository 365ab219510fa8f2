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
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from merging.config import MergeConfig, TokenizerSetting
from merging.errors import MergeError
from merging.files import merge_to_dir
from merging.io import open_reference
from merging.mergekit_yaml import parse_mergekit, to_mergekit
from merging.vocab import Vocabulary, align, stripped_tokenizer, vocabulary_tensors
from tests.mergekit_side import run_jobs
from tests.mergekit_side.compare import load_tensors
from tests.tiny_archs import build_arch_set

ADDED = {"e0": ["<a>", "<b>"], "e1": ["<b>", "<c>", "<d>"], "e2": ["<c>"], "e3": []}
PADDED = {"e2": 8}  # resize_token_embeddings(pad_to_multiple_of=...)
TD = {"weight": 0.7, "density": 0.6}


@dataclass(frozen=True)
class Case:
    id: str
    arch: str  # "llama", "qwen2_tied" or "mistral_bf16_sharded"
    method: str
    experts: tuple[str, ...]
    tokenizer: dict[str, Any]  # the YAML's tokenizer keys; model names (e0, base) stand for their paths
    same_ids: bool = True  # mergekit's ids are deterministic (at most one expert adds tokens to a union)
    base_model: bool = True
    params: dict[str, Any] = field(default_factory=lambda: {"weight": 0.6})  # each model's
    shared: dict[str, Any] = field(default_factory=dict)  # the YAML's global `parameters`
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys


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
    # bfloat16 checkpoints read in float32 (mergekit's `dtype`): the rows averaged in float32 by both
    Case("union-bf16-read-as-f32", "mistral_bf16_sharded", "task_arithmetic", ("e0", "e1"),
         {"tokenizer_source": "union"}, same_ids=False, extra={"dtype": "float32", "out_dtype": "bfloat16"}),
    Case("linear", "llama", "linear", ("e0", "e1"), {"tokenizer_source": "union"}, same_ids=False,
         shared={"weight": 0.3}),  # the base averaged in, with the global weight
    # no base_model: mergekit's tokenizer base is any model; mmmo's the first (see merging.vocab.Vocabulary)
    Case("linear-without-base", "llama", "linear", ("e0", "e3"), {"tokenizer_source": "union"}, base_model=False),
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
        fresh = path.with_name(path.name + ".resized")  # a sharded checkpoint's old index must not stay
        sharded = (path / "model.safetensors.index.json").exists()
        model.save_pretrained(fresh, **({"max_shard_size": 8_000} if sharded else {}))
        tok.save_pretrained(fresh)
        shutil.rmtree(path)
        fresh.rename(path)


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
    if case.shared:
        doc["parameters"] = dict(case.shared)
    doc |= case.extra
    tokenizer = {k: named(v) for k, v in case.tokenizer.items()}
    if "tokenizer" in tokenizer:
        tokenizer["tokenizer"] = {k: ({t: named(e) for t, e in v.items()} if k == "tokens" else named(v))
                                  for k, v in tokenizer["tokenizer"].items()}
    return doc | tokenizer


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_models")
    out = {}
    for i, arch in enumerate(("llama", "qwen2_tied", "mistral_bf16_sharded")):
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



@dataclass
class Merged:
    tensors: dict[str, torch.Tensor]
    vocab: dict[str, int]  # the saved tokenizer's
    vocab_size: int  # the saved config's
    axes: dict[str, int]


def _read(out: Path, axes: dict[str, int]) -> Merged:
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    return Merged(load_tensors(out), vocab, json.loads((out / "config.json").read_text())["vocab_size"], axes)


def _mmmo(case: Case, sets, out: Path) -> Merged:
    """``mmmo merge`` of the case's YAML: ``parse_mergekit`` + ``merge_to_dir``."""
    plan = parse_mergekit(yaml.safe_dump(_doc(case, sets)))
    merge_to_dir(plan.config, out, dtype=plan.dtype)
    base = sets[case.arch].base
    return _read(out, vocabulary_tensors(base, open_reference(base).keys()))


def _theirs(mergekit_runs, case: Case) -> Merged:
    root, results = mergekit_runs
    result = results[case.id]
    assert result["ok"], f"mergekit refused {case.id}: {result['error']}\n{result.get('traceback', '')}"
    return _read(root / case.id, {})


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
        if case.method == "linear" and case.base_model:  # the base summed in where mergekit's set order puts it
            diff = (got.double() - expected.double()).norm() / expected.double().norm()
            assert diff <= 1e-6, f"{name}: relative L2 error {diff.item():.3g}"
        else:
            assert torch.equal(got, expected), f"{name}: max |diff| {(got - expected).abs().max():.3g}"


@pytest.mark.parametrize("case_id", list(BY_ID))
def test_aligned_merge_matches_mergekit(sets, mergekit_runs, case_id, tmp_path):
    case = BY_ID[case_id]
    _compare(case, _mmmo(case, sets, tmp_path / "out"), _theirs(mergekit_runs, case))


def test_a_token_only_one_expert_has_keeps_that_experts_row(sets, tmp_path):
    ours = _mmmo(BY_ID["union"], sets, tmp_path / "out")
    s = sets["llama"]
    for expert, token in (("e0", "<a>"), ("e1", "<d>")):
        own = load_tensors(s.experts[expert])
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


# ---- mmmo merge, YAML, and the trial path ----


def test_resized_experts_without_a_tokenizer_setting_are_refused_saying_how(sets, tmp_path):
    case = Case("plain", "llama", "ties", ("e0", "e3"), {}, params=TD)
    plan = parse_mergekit(yaml.safe_dump(_doc(case, sets)))
    with pytest.raises(MergeError, match=r"has shape \(83, 16\), the base has \(81, 16\)\. If the vocabularies "
                                         r"differ, .*tokenizer_source: base, union or a model"):
        merge_to_dir(plan.config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_keys_parse_and_export_as_mergekit_writes_them(sets):
    s = sets["llama"]
    e0, e1 = str(s.experts["e0"]), str(s.experts["e1"])
    doc = {"merge_method": "ties", "base_model": str(s.base), "models": [{"model": e0}, {"model": e1}],
           "parameters": TD}
    plain = parse_mergekit(yaml.safe_dump(doc)).config
    assert plain.tokenizer is None and "tokenizer" not in plain.to_dict()  # older fingerprints stay
    legacy = parse_mergekit(yaml.safe_dump(doc | {"tokenizer_source": e1})).config
    assert legacy.tokenizer == {"source": e1} and legacy.fingerprint() != plain.fingerprint()
    assert yaml.safe_load(to_mergekit(legacy))["tokenizer_source"] == e1
    full = {"source": "union", "pad_to_multiple_of": 8,
            "tokens": {"<z>": {"source": {"kind": "model_token", "model": e0, "token_id": 3}, "force": True}}}
    config = parse_mergekit(yaml.safe_dump(doc | {"tokenizer": full})).config
    assert config.tokenizer == full
    exported = yaml.safe_load(to_mergekit(config))
    assert exported["tokenizer"] == full and "tokenizer_source" not in exported
    assert parse_mergekit(to_mergekit(config)).config == config
    assert MergeConfig.from_dict(config.to_dict()) == config
    assert parse_mergekit(yaml.safe_dump(doc | {"tokenizer": {}})).config.tokenizer == {"source": "union"}
    with pytest.raises(MergeError, match="cannot specify both tokenizer_source and tokenizer"):
        parse_mergekit(yaml.safe_dump(doc | {"tokenizer_source": "union", "tokenizer": {"source": "base"}}))


def test_the_output_loads_with_its_own_tokenizer(sets, tmp_path):
    ours = _mmmo(BY_ID["tokenizer-union-pad"], sets, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == ours.vocab_size == 88 and len(tok) == 83
    assert model.get_input_embeddings().weight.shape[0] == 88
    assert tok("1<a>2<b>").input_ids[2] == tok.get_vocab()["<a>"] == 81
    assert "merge_method: task_arithmetic" in (tmp_path / "out" / "README.md").read_text()
    assert "tokenizer:" in (tmp_path / "out" / "README.md").read_text()


def test_trial_model_equals_file_merge_with_a_union_vocabulary(sets, tmp_path):
    from evals.evaluator import Perplexity
    from evals.objective import Objective
    from service.runner import TrialRunner

    texts = tmp_path / "texts.txt"
    texts.write_text("12+3<a>=15<b>\n<c>hello<d> world\n")
    objectives = [Objective(kind="sparsity", direction="minimize"),
                  Objective(kind="perplexity", data=str(texts), direction="minimize")]
    for arch in ("llama", "qwen2_tied"):
        case = Case("trial", arch, "ties", ("e0", "e1", "e2"), {"tokenizer_source": "union"}, params=TD)
        config = parse_mergekit(yaml.safe_dump(_doc(case, sets))).config
        out = merge_to_dir(config, tmp_path / arch)
        expected = AutoModelForCausalLM.from_pretrained(out)
        runner = TrialRunner(device="cpu", trusted_task_paths=[])
        scores = runner.run(config, objectives)
        live = runner.last_model
        assert live.config.vocab_size == expected.config.vocab_size == 85
        got, want = live.state_dict(), expected.state_dict()
        assert sorted(got) == sorted(want)
        differ = sorted(n for n in want if not torch.equal(got[n], want[n]))
        assert not differ, f"{arch}: {len(differ)} of {len(want)} tensors differ from the file merge: {differ[:5]}"
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert scores[objectives[1].key] == Perplexity(str(texts)).score(expected.eval(), tokenizer), arch
