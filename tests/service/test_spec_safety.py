"""Issue #15: what a spec can make the server (and its workers) do.

No Python from a task directory the operator has not trusted, no file read outside the data
roots (and the same answer for a file missing and a file not allowed), bounded and finite
inputs, and a 4xx with a message (never a 500) for everything a spec can get wrong.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from evals.synthetic import DATA_DIR
from service.app import create_app
from service.settings import Settings
from tests.conftest import authorize, zoo_spec

EVIL_MODULE = """import pathlib
MARKER = pathlib.Path({marker!r})
MARKER.write_text("imported")


def load(**_kwargs):
    MARKER.write_text("called")
    import datasets
    return datasets.load_dataset("json", data_files={{"test": {data!r}}})
"""

TASK_YAML = """task: {name}
output_type: generate_until
test_split: test
doc_to_text: "{doc_to_text}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs: {{until: ["\\n"], max_gen_toks: 4, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
"""


@contextmanager
def _client(settings: Settings):
    with TestClient(create_app(settings)) as c:
        authorize(c)
        yield c


@pytest.fixture
def api(sqlite_settings):
    with _client(sqlite_settings) as c:
        yield c


def _evil_task_dir(root: Path, marker: Path, name: str = "evil") -> Path:
    """``root/x.yaml``: an lm-eval task whose dataset is made by ``root/evil.py`` (which leaves ``marker``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker), data=str(DATA_DIR / "add" / "test.jsonl")))
    (root / "x.yaml").write_text("custom_dataset: !function evil.load\n"
                                 + TASK_YAML.format(name=name, doc_to_text="{{prompt}}"))
    return root


def _task_spec(tiny_zoo, task_dir: Path, task: str) -> dict:
    spec = zoo_spec(tiny_zoo, trials=1)
    spec["objectives"] = [{"task": task, "samples": 5}]
    spec["task_paths"] = [str(task_dir)]
    return spec


def _only_problem(response) -> dict:
    assert response.status_code == 422, response.text
    details = response.json()["detail"]
    assert len(details) == 1, details
    return details[0]


# 1. No code from a spec


def test_task_yaml_naming_python_is_refused_naming_the_file_and_never_runs(api, tiny_zoo, tmp_path):
    import yaml

    marker = tmp_path / "marker"
    tasks = _evil_task_dir(tmp_path / "tasks", marker)
    spec = _task_spec(tiny_zoo, tasks, "evil")
    for response in (api.post("/api/v1/studies", json=spec),
                     api.post("/api/v1/studies/yaml", content=yaml.safe_dump(spec),
                              headers={"Content-Type": "application/yaml"})):
        problem = _only_problem(response)
        assert problem["loc"] == ["body", "task_paths", 0]
        assert str(tasks / "x.yaml") in problem["msg"] and "MMMO_TRUSTED_TASK_PATHS" in problem["msg"]
    assert not marker.exists(), "the spec's Python ran in the server"
    assert api.get("/api/v1/studies").json() == []


@pytest.mark.parametrize("variant", ["include", "python_tag", "alias"])
def test_python_behind_an_include_a_python_tag_or_an_alias_is_refused(api, tiny_zoo, tmp_path, variant):
    marker = tmp_path / "marker"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    if variant == "include":  # the YAML in the directory is clean; the file it includes is not
        elsewhere = _evil_task_dir(tmp_path / "elsewhere", marker)
        (tasks / "t.yaml").write_text(f"include: {elsewhere / 'x.yaml'}\ntask: evil\n")
        offender = elsewhere / "x.yaml"
    elif variant == "python_tag":
        (tasks / "t.yaml").write_text("custom_dataset: !!python/name:os.system\n"
                                      + TASK_YAML.format(name="evil", doc_to_text="{{prompt}}"))
        offender = tasks / "t.yaml"
    else:
        (tasks / "t.yaml").write_text("x: &a [1, 1]\ny: [*a, *a]\n" + TASK_YAML.format(name="evil",
                                                                                     doc_to_text="{{prompt}}"))
        offender = tasks / "t.yaml"
    problem = _only_problem(api.post("/api/v1/studies", json=_task_spec(tiny_zoo, tasks, "evil")))
    assert problem["loc"] == ["body", "task_paths", 0] and str(offender) in problem["msg"], problem
    assert not marker.exists()


def test_an_operator_trusted_task_directory_may_run_its_python(sqlite_settings, tiny_zoo, tmp_path):
    marker = tmp_path / "marker"
    tasks = _evil_task_dir(tmp_path / "tasks", marker)
    trusted = sqlite_settings.model_copy(update={"trusted_task_paths": [tasks]})
    with _client(trusted) as c:
        assert c.post("/api/v1/studies", json=_task_spec(tiny_zoo, tasks, "evil")).status_code == 201
    assert marker.read_text() == "called"  # the operator's choice: its code is theirs


def test_a_worker_refuses_an_untrusted_task_directory_whatever_the_server_checked(api, tiny_zoo, tmp_path):
    from evals.evaluator import task_manager
    from evals.objective import Objective
    from evals.taskdirs import UnsafeTaskDir
    from merging.config import MergeConfig
    from service.runner import TrialRunner

    marker = tmp_path / "marker"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = DATA_DIR / "add" / "test.jsonl"
    (tasks / "x.yaml").write_text(f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
                                  + TASK_YAML.format(name="plain", doc_to_text="{{prompt}}"))
    assert api.post("/api/v1/studies", json=_task_spec(tiny_zoo, tasks, "plain")).status_code == 201
    lease = api.post("/api/v1/leases", json={"worker": "w"}).json()
    # Changed after the server checked it (or the server never did): now it names Python.
    _evil_task_dir(tasks, marker, name="plain")
    runner = TrialRunner(cache_dir=tmp_path / "cache", trusted_task_paths=[])
    with pytest.raises(UnsafeTaskDir, match=str(tasks / "x.yaml")):
        runner.run(MergeConfig.from_dict(lease["merge_config"]), [Objective(**o) for o in lease["objectives"]],
                   tuple(lease["task_paths"]))
    # ...and lm-eval itself, asked directly, imports nothing from an untrusted directory.
    with pytest.raises(UnsafeTaskDir):
        task_manager([tasks]).load(["plain"])
    assert not marker.exists()


def test_task_templates_cannot_reach_python(api, tiny_zoo, tmp_path):
    from evals.objective import Objective
    from merging.config import MergeConfig
    from service.runner import TrialRunner

    marker = tmp_path / "marker"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = DATA_DIR / "add" / "test.jsonl"
    template = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}{{prompt}}"
    (tasks / "x.yaml").write_text(f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
                                  + TASK_YAML.format(name="ssti", doc_to_text=template))
    response = api.post("/api/v1/studies", json=_task_spec(tiny_zoo, tasks, "ssti"))
    assert not marker.exists(), "a template ran Python in the server"
    if response.status_code == 201:  # the server found nothing to render: a worker would
        lease = api.post("/api/v1/leases", json={"worker": "w"}).json()
        with pytest.raises(Exception, match="unsafe"):
            TrialRunner(cache_dir=tmp_path / "cache", trusted_task_paths=[]).run(
                MergeConfig.from_dict(lease["merge_config"]), [Objective(**o) for o in lease["objectives"]],
                tuple(lease["task_paths"]))
    else:  # the sandbox refused it (its message stays in the server's log: it may quote data)
        assert "SecurityError" in response.text, response.text
    assert not marker.exists(), "a template ran Python in a worker"


@pytest.mark.parametrize("dataset", ["dataset_path: json\ndataset_kwargs: {data_files: {test: /etc/passwd}}",
                                     "dataset_path: json\ndataset_kwargs: {data_files: {test: 'x/../../etc/passwd'}}",
                                     "dataset_path: json\ndataset_kwargs: {data_files: {test: relative.jsonl}}",
                                     "dataset_path: /etc"])
def test_untrusted_tasks_read_data_under_the_data_roots_only(api, tiny_zoo, tmp_path, dataset):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "x.yaml").write_text(dataset + "\n" + TASK_YAML.format(name="reader", doc_to_text="{{prompt}}"))
    problem = _only_problem(api.post("/api/v1/studies", json=_task_spec(tiny_zoo, tasks, "reader")))
    assert problem["loc"] == ["body", "task_paths", 0] and str(tasks / "x.yaml") in problem["msg"], problem


# 5. Files only under the data roots; the same answer for missing and not allowed


def _message(api, spec: dict) -> tuple[list, str]:
    problem = _only_problem(api.post("/api/v1/studies", json=spec))
    return problem["loc"], problem["msg"]


def test_files_outside_the_data_roots_answer_exactly_as_missing_ones(api, tiny_zoo, tmp_path):
    link = tmp_path / "link.jsonl"
    link.symlink_to("/etc/passwd")  # under the roots, but what it names is not

    def calibration(path):
        spec = zoo_spec(tiny_zoo)
        spec["experts"][0]["calibration"] = path
        return spec

    def perplexity(path):
        spec = zoo_spec(tiny_zoo)
        spec["objectives"].append({"kind": "perplexity", "data": path})
        return spec

    def model(path):
        return zoo_spec(tiny_zoo) | {"base": path}

    def task_dir(path):
        return zoo_spec(tiny_zoo) | {"task_paths": [path]}

    for make, outside in ((calibration, "/etc/shadow"), (calibration, str(link)), (perplexity, "/etc/passwd"),
                          (model, "/etc"), (model, "/"), (task_dir, "/etc")):
        missing = str(tmp_path / "no" / "such")
        loc, said = _message(api, make(outside))
        loc_missing, said_missing = _message(api, make(missing))
        assert loc == loc_missing, (outside, loc)
        assert said.replace(f"'{outside}'", "'PATH'") == said_missing.replace(f"'{missing}'", "'PATH'"), said
        assert "data roots" in said
    assert api.get("/api/v1/studies").json() == []


def test_relative_names_outside_the_roots_answer_as_hub_ids_the_server_has_not_cached(api, tiny_zoo, monkeypatch):
    monkeypatch.chdir("/")  # "etc/passwd" names a file here, "etc/no-such-file" none: both look like org/name
    for base in ("etc/passwd", "etc/no-such-file"):
        assert api.post("/api/v1/studies", json=zoo_spec(tiny_zoo) | {"base": base}).status_code == 201, base


def test_calibration_and_perplexity_files_are_regular_and_bounded(sqlite_settings, tiny_zoo, tmp_path):
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    big = tmp_path / "big.txt"
    big.write_text("some text\n" * 20)
    small = sqlite_settings.model_copy(update={"max_data_file_bytes": 100})
    with _client(small) as c:
        for path, message in ((fifo, "not a regular file"), (tmp_path, "not a regular file"),
                              (big, "is 200 bytes, more than the 100 allowed")):
            spec = zoo_spec(tiny_zoo)
            spec["experts"][0]["calibration"] = str(path)
            answered: list = []
            submit = threading.Thread(target=lambda s=spec, out=answered: out.append(c.post("/api/v1/studies",
                                                                                           json=s)))
            submit.start()
            submit.join(timeout=120)
            assert answered, f"submitting {path} did not answer"
            problem = _only_problem(answered[0])
            assert problem["loc"] == ["body", "experts", 0, "calibration"] and message in problem["msg"], problem


def test_default_data_roots_embedded_and_for_a_team(tmp_path, cache_dir, tiny_zoo):
    embedded = Settings(home=tmp_path / "home", cache_dir=cache_dir, data_roots=None)
    assert embedded.resolved_data_roots() == [Path.home(), cache_dir]
    team = Settings(home=tmp_path / "home", cache_dir=cache_dir, database_url=f"sqlite:///{tmp_path / 'db'}",
                    data_roots=None)
    assert team.resolved_data_roots() == []
    with _client(team) as c:  # no roots configured: Hugging Face ids only
        response = c.post("/api/v1/studies", json=zoo_spec(tiny_zoo))
        assert response.status_code == 422
        assert [d["loc"] for d in response.json()["detail"]] == [["body", "base"], ["body", "experts", 0, "path"],
                                                                 ["body", "experts", 1, "path"]]
        assert all("data roots" in d["msg"] for d in response.json()["detail"])
        hub = zoo_spec(tiny_zoo) | {"base": "some-org/base", "experts": [{"name": "a", "path": "some-org/a"},
                                                                         {"name": "b", "path": "some-org/b"}]}
        hub["objectives"] = [{"task": "mmmo_add"}]
        assert c.post("/api/v1/studies", json=hub).status_code == 201  # each worker resolves hub ids


# 6. Bounded inputs


def test_yaml_alias_bomb_is_a_small_quick_422(api, tiny_zoo):
    levels = "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(6))
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + levels + "name: *g\n"
    response = api.post("/api/v1/studies/yaml", content=bomb, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 422 and "aliases" in response.text
    assert len(response.content) < 2000
    nested = api.post("/api/v1/studies/yaml", content="[" * 20_000 + "]" * 20_000)
    assert nested.status_code == 422 and "nested" in nested.text


def test_num_layers_is_checked_against_the_base_and_the_space_is_bounded(api, tiny_zoo, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = zoo_spec(tiny_zoo, trials=1)
    loc, msg = _message(api, spec | {"search_space": {"layer_groups": 1, "num_layers": 10_000}})
    assert loc == ["body", "search_space", "num_layers"]
    loc, msg = _message(api, spec | {"search_space": {"layer_groups": 1, "num_layers": 64}})
    assert loc == ["body", "search_space", "num_layers"] and "the base has 4 layers" in msg
    assert api.post("/api/v1/studies", json=spec | {"search_space": {"layer_groups": 1, "num_layers": 4}}
                    ).status_code == 201
    # A deep base: one parameter set per layer would be 2 experts x 2 x 301 parameters.
    deep = tmp_path / "deep"
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=8, num_hidden_layers=300,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(deep)
    deep_spec = spec | {"base": str(deep), "experts": [{"name": "a", "path": str(deep)},
                                                       {"name": "b", "path": str(deep)}],
                        "search_space": {"layer_groups": 1}}
    loc, msg = _message(api, deep_spec)
    assert loc == ["body", "search_space"] and "1204 parameters" in msg
    assert api.post("/api/v1/studies", json=deep_spec | {"search_space": {"layer_groups": 4}}).status_code == 201


# 7. Finite numbers (both databases)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_422_and_stored_nowhere(client, tiny_zoo, literal):
    spec = zoo_spec(tiny_zoo)
    key = "mmmo_add:exact_match"
    for place in ({"search_space": {"weight": {"low": "@", "high": 1.0}}}, {"reference_point": {key: "@"}},
                  {"constraints": [{"objective": key, "min": "@"}]}):
        body = json.dumps(spec | place).replace('"@"', literal)  # JSON as a client may send it
        response = client.post("/api/v1/studies", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, response.text
        assert "finite" in response.text
    yaml_body = json.dumps(spec | {"reference_point": {key: "@"}}).replace('"@"', ".nan")
    assert client.post("/api/v1/studies/yaml", content=yaml_body).status_code == 422
    assert client.get("/api/v1/studies").json() == []


# 8. 4xx, never 500


def test_overlong_paths_are_a_422_with_a_message(api, tiny_zoo):
    for path in ("/models/" + "x" * 300, "/m" * 2100):
        spec = zoo_spec(tiny_zoo)
        spec["experts"][0]["path"] = path
        response = api.post("/api/v1/studies", json=spec)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][:4] == ["body", "experts", 0, "path"]


@pytest.mark.parametrize("content", ['1\n', '"text"\n', '{"text": 5}\n', '{"other": "x"}\n', 'not json\n',
                                     b'\xff\xfe\n'])
def test_bad_calibration_and_perplexity_content_is_a_422_naming_the_line(api, tiny_zoo, tmp_path, content):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "fine"}\n' + (content if isinstance(content, bytes) else content.encode()))
    spec = zoo_spec(tiny_zoo)
    spec["experts"][0]["calibration"] = str(data)
    spec["objectives"].append({"kind": "perplexity", "data": str(data)})
    response = api.post("/api/v1/studies", json=spec)
    assert response.status_code == 422, response.text
    problems = {tuple(d["loc"]): d["msg"] for d in response.json()["detail"]}
    assert set(problems) == {("body", "experts", 0, "calibration"), ("body", "objectives", 2, "data")}
    assert all("line 2" in m for m in problems.values()), problems


def test_chunked_bodies_over_the_limit_are_413(tmp_path, cache_dir):
    import httpx

    from service.demo import start_server

    running = start_server(Settings(home=tmp_path, cache_dir=cache_dir), port=0)
    try:
        def chunks(total: int = 5 * 2**19):  # 2.5 MiB, no Content-Length
            for _ in range(total // 2**16):
                yield b" " * 2**16

        with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {running.token}"},
                          timeout=60) as http:
            for path, kind in (("/api/v1/studies", "application/json"), ("/api/v1/studies/yaml", "application/yaml")):
                response = http.post(path, content=chunks(), headers={"Content-Type": kind})
                assert response.status_code == 413, (path, response.status_code, response.text)
            small = http.post("/api/v1/studies", content=iter([b'{"name": ', b'"x"}']),
                              headers={"Content-Type": "application/json"})
            assert small.status_code == 422  # read whole and checked, as any body
    finally:
        running.stop()


# 9. Experts that cannot merge onto the base


def _variant(tiny_zoo, out: Path, kind: str) -> Path:
    import torch
    from transformers import (
        AutoConfig,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    base = AutoConfig.from_pretrained(tiny_zoo.base)
    torch.manual_seed(0)
    if kind == "hidden size":
        model = LlamaForCausalLM(base.__class__(**{**base.to_dict(), "hidden_size": 32}))
    elif kind == "fewer layers":
        model = LlamaForCausalLM(base.__class__(**{**base.to_dict(), "num_hidden_layers": 2}))
    else:
        same = {"vocab_size": base.vocab_size, "hidden_size": base.hidden_size,
                "intermediate_size": base.intermediate_size, "num_hidden_layers": base.num_hidden_layers,
                "num_attention_heads": base.num_attention_heads, "num_key_value_heads": base.num_key_value_heads,
                "max_position_embeddings": base.max_position_embeddings, "tie_word_embeddings": False}
        if kind == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**same))
        elif kind == "gpt-neox":
            model = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in same.items() if k != "num_key_value_heads"}))
        else:  # mistral: Llama's tensor names and shapes; here even the base's very weights
            model = MistralForCausalLM(MistralConfig(**same))
            model.load_state_dict(LlamaForCausalLM.from_pretrained(tiny_zoo.base).state_dict())
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["hidden size", "fewer layers", "qwen2", "gpt-neox", "mistral"])
@pytest.mark.parametrize("method", ["ties", "linear"])
def test_an_expert_of_another_shape_or_architecture_is_a_422_naming_it(api, tiny_zoo, tmp_path, kind, method):
    odd = _variant(tiny_zoo, tmp_path / "odd", kind)
    spec = zoo_spec(tiny_zoo, method=method)
    spec["experts"][1] = {"name": "odd", "path": str(odd)}
    if method == "linear":
        spec["search_space"] = {"density": None}
    problem = _only_problem(api.post("/api/v1/studies", json=spec))
    assert problem["loc"] == ["body", "experts", 1, "path"] and "model 'odd'" in problem["msg"], problem
    assert api.get("/api/v1/studies").json() == []


def test_a_task_metric_outside_lm_evals_registry_is_refused_and_never_loads(api, tiny_zoo, tmp_path):
    """An unknown metric name makes lm-eval import a Hugging Face `evaluate` module by that name:
    a directory of the spec's own Python."""
    marker = tmp_path / "marker"
    metric = tmp_path / "tasks" / "m"
    metric.mkdir(parents=True)
    (metric / "m.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    data = DATA_DIR / "add" / "test.jsonl"
    yaml_text = (f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
                 + TASK_YAML.format(name="evil_metric", doc_to_text="{{{{prompt}}}}")
                 .replace("metric: exact_match", f"metric: {metric}"))
    (tmp_path / "tasks" / "x.yaml").write_text(yaml_text)
    response = api.post("/api/v1/studies", json=_task_spec(tiny_zoo, tmp_path / "tasks", "evil_metric"))
    assert response.status_code == 422
    assert "x.yaml" in response.text and "registered metrics" in response.text
    assert not marker.exists(), "a task's metric ran Python in the server"


def test_an_untrusted_task_may_not_include_a_trusted_one(api, tiny_zoo, tmp_path):
    """A bundled task's Python would run with the including file's settings (here: read any directory)."""
    from evals.taskdirs import BUNDLED_TASKS_DIR

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "x.yaml").write_text(f"include: {BUNDLED_TASKS_DIR / '_gen_template.yaml'}\ntask: sneaky\n"
                                  f"dataset_kwargs: {{task_name: {tmp_path}}}\n")
    response = api.post("/api/v1/studies", json=_task_spec(tiny_zoo, tasks, "sneaky"))
    assert response.status_code == 422
    assert "x.yaml" in response.text and "trusted task directory" in response.text


def test_the_bundled_loader_reads_bundled_task_data_only():
    from evals.tasks.utils import load

    with pytest.raises(ValueError, match="no bundled task data"):
        load("../../../../etc")
    with pytest.raises(ValueError, match="no bundled task data"):
        load("/tmp")


def test_a_task_that_fails_to_load_is_named_without_quoting_what_it_read(tmp_path):
    """lm-eval's errors quote the values they met (a template's missing key is the document's text)."""
    from evals.catalog import TaskCatalog
    from evals.objective import Objective

    secret = "mmmo_SECRET_VALUE"
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": secret, "target": "x"}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "x.yaml").write_text(f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
                                  + TASK_YAML.format(name="leaky", doc_to_text="{{{{ {{}}[prompt] }}}}"))
    problem = TaskCatalog().problem(Objective(task="leaky"), [str(tasks)])
    assert problem is not None and problem[0] == "task" and "leaky" in problem[1]
    assert secret not in problem[1]
