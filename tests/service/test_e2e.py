"""Whole-system runs: a real HTTP server, an in-process worker, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from service.client import ApiClient
from service.demo import in_process_worker, start_server
from service.settings import Settings
from tests.conftest import zoo_spec

pytestmark = pytest.mark.slow


def test_study_over_http_runs_to_completion(tmp_path, zoo, cache_dir):
    settings = Settings(home=tmp_path, cache_dir=cache_dir)
    running = start_server(settings, port=0)
    client = ApiClient(running.url, token=running.token)
    try:
        with in_process_worker(running.url, running.token, name="test-worker"):
            study = client.create_study(zoo_spec(zoo, trials=6, samples=30))
            deadline = time.monotonic() + 600
            while client.study(study["id"])["status"] == "running":
                assert time.monotonic() < deadline, "study did not finish in time"
                time.sleep(0.5)
        detail = client.study(study["id"])
        assert detail["status"] == "done"
        assert [t["state"] for t in detail["trials"]] == ["complete"] * 6
        assert all(t["worker"] == "test-worker" for t in detail["trials"] if not t["cached"])
        distinct = {tuple(t["values"].values()) for t in detail["trials"]}
        assert len(distinct) > 1, "different merges must score differently"
        selected = client.pareto(study["id"])["selected"]
        assert selected is not None

        env = {"MMMO_CACHE_DIR": str(cache_dir), "MMMO_SERVER_URL": running.url, "MMMO_HOME": str(tmp_path)}
        exported = _mmmo("study", "export", str(study["id"]), "--trial", str(selected), "--mergekit", env=env)
        assert exported.returncode == 0, exported.stderr
        assert "merge_method: ties" in exported.stdout
        out = tmp_path / "materialized"
        made = _mmmo("study", "materialize", str(study["id"]), "--trial", str(selected), str(out), env=env)
        assert made.returncode == 0, made.stderr
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 128
        missing = _mmmo("study", "export", str(study["id"]), "--trial", "999", env=env)
        assert missing.returncode == 1 and "no trial 999" in missing.stderr
    finally:
        client.close()
        running.stop()


def test_prefetching_worker_runs_every_trial_exactly_once(tmp_path, zoo, cache_dir):
    import threading

    from service.client import HttpLeaseSource
    from service.runner import TrialRunner
    from service.worker import Worker

    settings = Settings(home=tmp_path, cache_dir=cache_dir)
    running = start_server(settings, port=0)
    client = ApiClient(running.url, token=running.token)
    runs: list[dict] = []
    runner = TrialRunner(cache_dir=cache_dir)
    runner.on_timing = runs.append
    stop = threading.Event()
    worker = Worker(HttpLeaseSource(ApiClient(running.url, token=running.token)), runner, name="pipelined",
                    poll_seconds=0.2, prefetch=True)
    thread = threading.Thread(target=worker.run, args=(stop,))
    try:
        study = client.create_study(zoo_spec(zoo, trials=5, samples=20))
        thread.start()
        deadline = time.monotonic() + 600
        while client.study(study["id"])["status"] == "running":
            assert time.monotonic() < deadline, "study did not finish in time"
            time.sleep(0.3)
        stop.set()
        thread.join(timeout=60)
        trials = client.study(study["id"])["trials"]
        assert [t["state"] for t in trials] == ["complete"] * 5
        assert all(t["attempts"] == 1 for t in trials if not t["cached"])
        assert len(runs) == sum(not t["cached"] for t in trials), "each trial evaluated exactly once"
    finally:
        stop.set()
        client.close()
        running.stop()


def _mmmo(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def test_demo_exit_when_done_prints_the_front(tmp_path, zoo, cache_dir):
    env = {"MMMO_HOME": str(tmp_path), "MMMO_CACHE_DIR": str(cache_dir)}
    result = _mmmo("demo", "--exit-when-done", "--trials", "12", "--port", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "Pareto front" in result.stdout
    assert "12 trials complete" in result.stdout
    assert "/studies/1" in result.stdout


def test_eval_cli_prints_json_scores(zoo, cache_dir):
    result = _mmmo("eval", str(zoo.experts["add"]), "--task", "mmmo_add", "--task", "mmmo_add_mc",
                   "--samples", "20", "--json", env={})
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(scores) == {"mmmo_add", "mmmo_add_mc"}
    assert 0 <= scores["mmmo_add"]["exact_match"] <= 1


def test_cli_errors_are_one_line(tmp_path):
    result = _mmmo("eval", str(tmp_path / "missing"), "--task", "mmmo_add", env={})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmmo: error:") and "missing" in lines[0]


def test_study_run_resumes_after_being_killed(tmp_path, zoo, cache_dir):
    import signal

    import optuna
    import sqlalchemy as sa
    import yaml

    db = f"sqlite:///{tmp_path / 'run.db'}"
    spec = zoo_spec(zoo, trials=8, samples=20)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "MMMO_CACHE_DIR": str(cache_dir), "MMMO_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "study", "run", str(tmp_path / "spec.yaml"),
                             "--db", db], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    engine = sa.create_engine(db)
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no progress"
            try:
                with engine.connect() as conn:
                    done = conn.execute(sa.text("SELECT count(*) FROM mmmo_trials WHERE state='complete'")).scalar()
            except sa.exc.OperationalError:
                done = 0
            if done >= 3:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = _mmmo("study", "resume", "1", "--db", db, env={"MMMO_CACHE_DIR": str(cache_dir),
                                                              "MMMO_HOME": str(tmp_path)})
    assert resumed.returncode == 0, resumed.stderr
    assert "study 1: done" in resumed.stdout
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT number, state FROM mmmo_trials WHERE study_id=1")).all()
    numbers = [n for n, _ in rows]
    assert len(rows) == 8 and len(set(numbers)) == 8, "the budget holds and no trial is counted twice"
    assert all(state == "complete" for _, state in rows)
    name = optuna.get_all_study_names(db)[0]
    trials = {t.number: t.state for t in optuna.load_study(study_name=name, storage=db).trials}
    assert all(trials[n] == optuna.trial.TrialState.COMPLETE for n in numbers)
    # A kill between Optuna's ask and our row leaves an asked-but-unrecorded trial: failed on resume.
    assert all(state == optuna.trial.TrialState.FAIL for n, state in trials.items() if n not in numbers)
    engine.dispose()


def test_worker_finishes_its_trial_on_sigterm_and_hands_back_the_rest(tmp_path, zoo, cache_dir):
    import signal

    settings = Settings(home=tmp_path, cache_dir=cache_dir)
    running = start_server(settings, port=0)
    client = ApiClient(running.url, token=running.token)
    try:
        study = client.create_study(zoo_spec(zoo, trials=30, samples=60))
        env = {**os.environ, "MMMO_CACHE_DIR": str(cache_dir), "MMMO_TOKEN": running.token}
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--server", running.url,
                                 "--name", "w-term"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 300
        while not any(t["state"] == "complete" for t in client.study(study["id"])["trials"]):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        trials = client.study(study["id"])["trials"]
        assert not [t for t in trials if t["state"] == "leased"], "nothing may stay leased by a stopped worker"
        assert all(t["state"] in ("complete", "queued") for t in trials)
        assert "finishing the current trial" in proc.stderr.read()
    finally:
        client.close()
        running.stop()


def test_server_sent_events_follow_a_study_to_its_end(tmp_path, zoo, cache_dir):
    import threading

    import httpx

    running = start_server(Settings(home=tmp_path, cache_dir=cache_dir), port=0)
    client = ApiClient(running.url, token=running.token)
    events: list[tuple[str, dict]] = []
    arrived = threading.Condition()

    def listen(study_id: int) -> None:
        with httpx.stream("GET", f"{running.url}/api/v1/studies/{study_id}/events", timeout=60,
                          headers={"Authorization": f"Bearer {running.token}"}) as r:
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    with arrived:
                        events.append((kind, json.loads(line.removeprefix("data: "))))
                        arrived.notify_all()

    try:
        spec = zoo_spec(zoo, trials=2)
        study = client.create_study(spec)
        listener = threading.Thread(target=listen, args=(study["id"],))
        listener.start()
        keys = [f"{o['task']}:exact_match" for o in spec["objectives"]]
        for value in (0.2, 0.7):
            lease = client.lease("w")
            leased = ("trial", lease["trial_number"], "leased")
            with arrived:  # the stream sees the lease before the result is posted
                assert arrived.wait_for(lambda leased=leased: leased in [(k, e.get("number"), e.get("state"))
                                                                         for k, e in events], timeout=60)
            client.complete(lease["token"], dict.fromkeys(keys, value))
        listener.join(timeout=30)
        assert not listener.is_alive(), "the stream must end with the study"
        states = [(e["number"], e["state"]) for k, e in events if k == "trial"]
        assert (0, "complete") in states and (1, "complete") in states
        # each trial's events come in order
        for number in (0, 1):
            seen = [s for n, s in states if n == number]
            assert seen[-1] == "complete" and seen == sorted(seen, key=["leased", "complete"].index)
        assert events[-1] == ("study", {"study": study["id"], "status": "done"})
        with httpx.Client(headers={"Authorization": f"Bearer {running.token}"}) as http:
            assert http.get(f"{running.url}/api/v1/studies/999/events").status_code == 404
    finally:
        client.close()
        running.stop()
