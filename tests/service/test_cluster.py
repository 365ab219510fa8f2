"""A team deployment without Docker: PostgreSQL, two `mmmo serve` processes, three `mmmo worker`
processes; one server and one worker are killed (SIGKILL) and restarted mid-study.

Every trial must still be evaluated exactly once: the budget is met, Optuna and our rows agree,
nothing is left leased, and the killed worker's trial was leased again and completed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import optuna
import pytest

from tests.conftest import zoo_spec

pytestmark = pytest.mark.slow
LEASE_SECONDS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mmmo(*args: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Cluster:
    def __init__(self, tmp: Path, db: str, cache_dir: Path) -> None:
        self.tmp, self.db = tmp, db
        self.env = {**os.environ, "MMMO_DATABASE_URL": db, "MMMO_CACHE_DIR": str(cache_dir),
                    "MMMO_LEASE_SECONDS": str(LEASE_SECONDS), "MMMO_ARTIFACT_DIR": str(tmp / "artifacts")}
        self.servers: dict[str, tuple[int, subprocess.Popen]] = {}
        self.workers: dict[str, tuple[str, subprocess.Popen]] = {}

    def _log(self, name: str):
        return (self.tmp / f"{name}.log").open("ab")

    def start_server(self, name: str, port: int | None = None) -> str:
        port = port or _free_port()
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                                 "--home", str(self.tmp / name)], env=self.env, stdout=self._log(name),
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (self.tmp / f"{name}.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server {name} did not start"
            time.sleep(0.3)
        self.servers[name] = (port, proc)
        return url

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.servers[name][0]}"

    def start_worker(self, name: str, server: str, token: str) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--server", self.url(server),
                                 "--token", token, "--name", name, "--batch-size", "32"],
                                env=self.env, stdout=self._log(name), stderr=subprocess.STDOUT)
        self.workers[name] = (server, proc)

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for _, proc in [*self.servers.values(), *self.workers.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.mark.parametrize("db", ["postgres", "sqlite"])
def test_servers_and_workers_survive_killed_processes(db, request, tmp_path, zoo, cache_dir):
    """PostgreSQL: two servers, three workers. SQLite (one server owns the file): one server, two workers."""
    url = request.getfixturevalue("postgres_url") if db == "postgres" else f"sqlite:///{tmp_path / 'mmmo.db'}"
    second = "server-b" if db == "postgres" else "server-a"
    cluster = Cluster(tmp_path, url, cache_dir)
    env = cluster.env
    _mmmo("db", "upgrade", env=env)
    _mmmo("admin", "create-team", "research", env=env)
    team_token = _mmmo("admin", "create-token", "--team", "research", "--user", "ada", env=env).splitlines()[-1]
    pool_token = _mmmo("admin", "create-token", "--workers", "--name", "gpu-pool", env=env).splitlines()[-1]
    try:
        cluster.start_server("server-a")
        if second != "server-a":
            cluster.start_server(second)
        api = httpx.Client(base_url=cluster.url(second), headers={"Authorization": f"Bearer {team_token}"},
                           timeout=60, transport=httpx.HTTPTransport(retries=5))
        budget = 30
        study = api.post("/api/v1/studies", json=zoo_spec(zoo, trials=budget, samples=20)).json()
        sid = study["id"]
        workers = (("w1", "server-a"), ("w2", second), ("w3", "server-a"))[: 3 if db == "postgres" else 2]
        for name, server in workers:
            cluster.start_worker(name, server, pool_token)

        def trials() -> list[dict]:
            return api.get(f"/api/v1/studies/{sid}/trials").json()

        deadline = time.monotonic() + 600
        while sum(t["state"] == "complete" for t in trials()) < 5:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.5)

        # kill worker w1 while it holds a lease, then server a (w3's server) under load
        while not any(t["state"] == "leased" and t["worker"] == "w1" for t in trials()):
            assert time.monotonic() < deadline, "w1 never leased a trial"
            time.sleep(0.1)
        victim = next(t["number"] for t in trials() if t["state"] == "leased" and t["worker"] == "w1")
        cluster.kill(cluster.workers["w1"][1])
        # (w1 may have posted its result just before the kill; then nothing was interrupted)
        interrupted = next(t for t in trials() if t["number"] == victim)["state"] == "leased"
        port_a = cluster.servers["server-a"][0]
        cluster.kill(cluster.servers["server-a"][1])
        time.sleep(2)
        cluster.start_server("server-a", port_a)
        cluster.start_worker("w1", "server-a", pool_token)

        while api.get(f"/api/v1/studies/{sid}").json()["status"] == "running":
            assert time.monotonic() < deadline, f"study did not finish: {trials()}"
            for name, (_, proc) in cluster.workers.items():
                assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            time.sleep(1)

        final = trials()
        assert api.get(f"/api/v1/studies/{sid}").json()["status"] == "done"
        numbers = [t["number"] for t in final]
        assert len(final) == budget and len(set(numbers)) == budget
        assert all(t["state"] == "complete" for t in final), [t for t in final if t["state"] != "complete"]
        again = next(t for t in final if t["number"] == victim)
        if interrupted:
            assert again["attempts"] == 2, f"the killed worker's trial is leased again once: {again}"
        by_worker = {t["worker"] for t in final if not t["cached"]}
        assert {"w2", "w3"} & by_worker
        storage = optuna.storages.RDBStorage(url)
        (name,) = optuna.get_all_study_names(storage)
        told = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        assert sorted(t.number for t in told if t.state == optuna.trial.TrialState.COMPLETE) == sorted(numbers)
        # a server killed between asking Optuna and recording the trial leaves an orphan: failed, never run
        orphans = [t for t in told if t.state != optuna.trial.TrialState.COMPLETE]
        assert all(t.state == optuna.trial.TrialState.FAIL and t.number not in numbers for t in orphans)
        # both servers answer for the same state
        other = httpx.get(f"{cluster.url('server-a')}/api/v1/studies/{sid}/pareto",
                          headers={"Authorization": f"Bearer {team_token}"}).json()
        assert other == api.get(f"/api/v1/studies/{sid}/pareto").json()
        api.close()
    finally:
        cluster.stop_all()
