"""``mmmo demo``: the whole system on one machine — zoo, server, worker, a study over HTTP."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from evals.zoo import Zoo, ensure_zoo
from service.app import create_app
from service.auth import ensure_local_token
from service.client import ApiClient, HttpLeaseSource
from service.runner import TrialRunner
from service.services import Services
from service.settings import Settings
from service.states import FINISHED_TRIAL, StudyStatus
from service.worker import Worker


def demo_spec(zoo: Zoo, trials: int, samples: int = 100) -> dict:
    """TIES over every expert of the zoo, one objective per expert's task."""
    experts = [{"name": name, "path": str(path), "calibration": str(zoo.calibration[name])}
               for name, path in zoo.experts.items()]
    return {
        "name": "demo: TIES over the demo zoo",
        "base": str(zoo.base),
        "experts": experts,
        "method": "ties",
        "method_params": {"normalize": False},
        "search_space": {"weight": {"low": 0.0, "high": 1.5}, "density": {"low": 0.2, "high": 1.0}},
        "objectives": [{"task": t, "samples": samples} for name in zoo.experts for t in zoo.expert_tasks[name]],
        "sampler": {"name": "nsga2", "population_size": 8},
        "budget": {"trials": trials},
        "seed": 0,
    }


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str
    token: str  # the local team's token (made if the database has none valid in the token file)
    token_file: Path

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(settings: Settings, host: str = "127.0.0.1", port: int = 8765) -> RunningServer:
    """Run uvicorn in a thread with the local team's token ready; port 0 picks a free port."""
    services = Services.start(settings)
    with services.sessions() as session:
        token, _ = ensure_local_token(session, settings.resolved_token_file())
    app = create_app(settings, services)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="mmmo-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server could not start on {host}:{port} (is the port taken?)")
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start within 60 s")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, f"http://{host}:{bound}", token, settings.resolved_token_file())


@contextmanager
def in_process_worker(url: str, token: str, name: str = "demo-worker", cache_dir: Path | None = None):
    stop = threading.Event()
    client = ApiClient(url, token=token)
    # The server shares this process's cores: no prefetching (see Worker).
    worker = Worker(HttpLeaseSource(client), TrialRunner(cache_dir=cache_dir), name=name, poll_seconds=0.2,
                    prefetch=False)
    thread = threading.Thread(target=worker.run, args=(stop,), name="mmmo-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join(timeout=120)
        client.close()


def _mean(values: dict[str, float] | None) -> float:
    return sum(values.values()) / len(values) if values else float("nan")


def _by_expert(params: dict[str, float]) -> dict[str, str]:
    """``{"add.weight": 1.0, "add.density": 0.5}`` -> ``{"add": "1.00/0.50"}`` (values in key order)."""
    grouped: dict[str, list[str]] = {}
    for key, value in params.items():  # "method" (a searched method) has its own column: no expert
        grouped.setdefault(key.split(".", 1)[0], []).append(f"{value:.2f}" if isinstance(value, float) else str(value))
    return {expert: "/".join(values) for expert, values in grouped.items()}


def pareto_table(pareto: dict) -> Table:
    keys = [o["key"] for o in pareto["objectives"]]
    front = sorted(pareto["front"], key=lambda t: -_mean(t["values"]))
    table = Table(title=f"Pareto front ({len(front)} trials, hypervolume {pareto['hypervolume']:.4f})")
    table.add_column("trial", justify="right")
    for key in keys:
        table.add_column(key.split(":")[0], justify="right")
    table.add_column("mean", justify="right")
    param_names = "/".join(dict.fromkeys(k.split(".", 1)[1] for k in front[0]["params"] if "." in k)) if front else ""
    experts = list(_by_expert(front[0]["params"])) if front else []
    for expert in experts:
        table.add_column(expert if expert == "method" else f"{expert}\n{param_names}", justify="right")
    for t in front:
        mark = " *" if t["number"] == pareto["selected"] else ""
        cells = _by_expert(t["params"])
        table.add_row(f"{t['number']}{mark}", *(f"{t['values'][k]:.3f}" for k in keys), f"{_mean(t['values']):.3f}",
                      *(cells[e] for e in experts))
    table.caption = "* knee point (the default selection)"
    return table


def watch_study(client: ApiClient, study_id: int, console: Console) -> dict:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[best]}"))
    with Progress(*columns, console=console) as progress:
        study = client.study(study_id)
        bar = progress.add_task("trials", total=study["budget"], best="")
        while True:
            study = client.study(study_id)
            finished = [t for t in study["trials"] if t["state"] in FINISHED_TRIAL]
            best = max((_mean(t["values"]) for t in finished if t["values"]), default=None)
            progress.update(bar, completed=len(finished),
                            best=f"best mean so far {best:.3f}" if best is not None else "")
            if study["status"] != StudyStatus.RUNNING:
                return study
            time.sleep(0.5)


def run_demo(settings: Settings, *, port: int, trials: int, exit_when_done: bool, console: Console) -> int:
    started = time.monotonic()
    zoo = ensure_zoo(settings.cache_dir, progress=lambda msg: console.print(f"[dim]zoo:[/dim] {msg}"))
    console.print(f"demo zoo: {zoo.root}")
    running = start_server(settings, port=port)
    console.print(f"server: {running.url}  (database {settings.resolved_database_url()})")
    console.print(f"API token of team 'local': {running.token_file} (the dashboard's login asks for it)")
    client = ApiClient(running.url, token=running.token)
    try:
        with in_process_worker(running.url, running.token, cache_dir=settings.cache_dir):
            study = client.create_study(demo_spec(zoo, trials))
            console.print(f"study {study['id']} submitted; dashboard: {running.url}/studies/{study['id']}")
            final = watch_study(client, study["id"], console)
        console.print(pareto_table(client.pareto(study["id"])))
        counts = final["counts"]
        console.print(f"{counts.get('complete', 0)} trials complete, {counts.get('failed', 0)} failed, "
                      f"in {time.monotonic() - started:.0f} s")
        console.print(f"dashboard: {running.url}/studies/{study['id']}")
        if not exit_when_done:
            console.print("serving until Ctrl-C")
            while running.thread.is_alive():
                running.thread.join(timeout=1.0)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        client.close()
        running.stop()
    return 0
