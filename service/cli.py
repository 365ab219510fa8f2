"""The ``mmmo`` command. Errors print one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import httpx
from pydantic import ValidationError


def _configure(verbose: bool, offline: bool) -> None:
    # Before lm-eval, datasets and huggingface_hub import (they read these variables when they do):
    # hub calls only where the settings allow them, no tqdm bars under our own progress bar.
    from evals.offline import set_offline

    set_offline(offline)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("lm_eval", "datasets", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)
    # Which models a worker loads, and in which memory plan, is worth a line without -v.
    logging.getLogger("service.runner").setLevel(logging.INFO)


def _settings(args: argparse.Namespace):
    from service.settings import Settings

    # A flag given on the command line wins over the environment; an absent one leaves it alone.
    flags = {"db": "database_url", "home": "home", "host": "host", "port": "port", "device": "device",
             "batch_size": "batch_size", "max_memory": "max_memory", "name": "worker_name", "server": "server_url",
             "memory_plan": "memory_plan", "dtype": "dtype"}
    overrides = {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag, None) is not None}
    if getattr(args, "no_prefetch", False):
        overrides["prefetch"] = False
    return Settings(**overrides)


def embedded_access(settings, services) -> str | None:
    """The embedded default makes a local team and token; tell where the token is stored."""
    from service.auth import ensure_local_token

    if not settings.is_embedded():
        return None
    with services.sessions() as session:
        token, made = ensure_local_token(session, settings.resolved_token_file())
    print(f"mmmo: {'new ' if made else ''}API token of team 'local' in {settings.resolved_token_file()} "
          "(CLI commands and workers on this machine read it from there)", file=sys.stderr)
    return token


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.services import Services

    settings = _settings(args)
    services = Services.start(settings)
    embedded_access(settings, services)
    uvicorn.run(create_app(settings, services), host=settings.host, port=settings.port, log_level="info")
    return 0


def cmd_admin_create_team(args: argparse.Namespace) -> int:
    from service import auth

    with _admin_session(args) as session:
        team = auth.create_team(session, args.name)
        print(f"team {team.name} created (id {team.id})")
    return 0


def cmd_admin_list_teams(args: argparse.Namespace) -> int:
    from service import auth

    with _admin_session(args) as session:
        for team in auth.list_teams(session):
            print(team.name)
    return 0


def cmd_admin_create_token(args: argparse.Namespace) -> int:
    from service import auth

    if (args.team is None) == (not args.workers):
        raise ValueError("give either --team NAME or --workers (a worker-pool token)")
    with _admin_session(args) as session:
        issued = auth.create_token(session, args.team, name=args.name, user=args.user)
    owner = f"team {issued.team}" if issued.team else "the worker pool (leases of every team, nothing else)"
    print(f"token {issued.id} ({issued.name}) for {owner}; it is shown only now:", file=sys.stderr)
    print(issued.token)
    return 0


def cmd_admin_list_tokens(args: argparse.Namespace) -> int:
    from service import auth

    with _admin_session(args) as session:
        for t in auth.list_tokens(session, args.team):
            state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
            used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
            print(f"{t.id}\t{t.prefix}…\t{t.team.name if t.team else '(worker pool)'}\t{t.name}\t{state}\t"
                  f"last used {used}")
    return 0


def cmd_admin_revoke(args: argparse.Namespace) -> int:
    from service import auth

    with _admin_session(args) as session:
        token = auth.revoke_token(session, args.token_id)
        print(f"token {token.id} ({token.name}) revoked")
    return 0


def _admin_session(args: argparse.Namespace):
    """A session on the migrated database, for admin commands (they need no server)."""
    from service.db.session import migrated_session

    return migrated_session(_settings(args).resolved_database_url())


def cmd_worker(args: argparse.Namespace) -> int:
    import threading

    from service.client import ApiClient, HttpLeaseSource
    from service.runner import TrialRunner
    from service.worker import Worker, default_worker_name

    settings = _settings(args)
    client = ApiClient(settings.server_url, token=args.token or settings.resolved_token())
    runner = TrialRunner.from_settings(settings)
    worker = Worker(HttpLeaseSource(client), runner, name=settings.worker_name or default_worker_name(),
                    poll_seconds=settings.poll_seconds, prefetch=settings.prefetch)
    stop = threading.Event()

    def finish_then_exit(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C aborts the trial; its lease expires
        stop.set()
        print("mmmo worker: finishing the current trial, then exiting (Ctrl-C again to abort)", file=sys.stderr)

    signal.signal(signal.SIGTERM, finish_then_exit)
    signal.signal(signal.SIGINT, finish_then_exit)
    worker.run(stop)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from service.demo import run_demo

    console = Console()
    # The Pareto table has a column per objective and per expert: never squeeze it below 120.
    console = Console(width=max(console.width, 120))
    return run_demo(_settings(args), port=args.port, trials=args.trials, exit_when_done=args.exit_when_done,
                    console=console)


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from evals.zoo import build_zoo, default_zoo_dir, ensure_zoo

    settings = _settings(args)
    if args.out:
        zoo = build_zoo(Path(args.out), progress=print)
    else:
        zoo = ensure_zoo(settings.cache_dir, progress=print)
    print(f"zoo: {zoo.root} (zoo.json lists base and experts; default cache {default_zoo_dir(settings.cache_dir)})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.evaluator import Evaluator
    from evals.objective import Objective
    from merging.io import check_checkpoint

    check_checkpoint(Path(args.model_dir))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    objectives = [Objective(task=t, samples=args.samples) for t in args.task]
    by_task = Evaluator(model, tokenizer, objectives, batch_size=args.batch_size).all_metrics()
    if args.json:
        print(json.dumps(by_task))
    else:
        for task, metrics in by_task.items():
            print(f"{task}: " + ", ".join(f"{m}={v:.4f}" for m, v in metrics.items()))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from merging.mergekit_yaml import parse_mergekit
    from merging.slices import load_slices, merge_slices_to_dir
    from service.materialize import write_model

    config_path = Path(args.config)
    text = config_path.read_text()
    # mergekit's `slices:` form (layer stacking) has a merge of its own; everything else is `models:`
    slices = load_slices(text, relative_to=config_path.parent)
    plan = None if slices is not None else parse_mergekit(text, relative_to=config_path.parent)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task("merging tensors", total=None)

        def step(_name: str, done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        if slices is not None:
            out = merge_slices_to_dir(slices, Path(args.out_dir), dtype=args.dtype, device=args.device,
                                      max_shard_bytes=int(args.max_shard_gb * 2**30), progress=step)
        else:
            config = replace(plan.config, allow_unrelated=True) if args.allow_unrelated else plan.config
            out = write_model(config, Path(args.out_dir), dtype=args.dtype or plan.dtype, device=args.device,
                              cache_dir=_settings(args).cache_dir, max_shard_bytes=int(args.max_shard_gb * 2**30),
                              progress=step)
    print(f"merged model written to {out}")
    return 0


def _client(args: argparse.Namespace):
    from service.client import ApiClient

    settings = _settings(args)
    token = getattr(args, "token", None) or settings.resolved_token()
    return ApiClient(settings.server_url, token=token)


def cmd_study_export(args: argparse.Namespace) -> int:
    client = _client(args)
    print(client.export(args.study_id, args.trial, "mergekit" if args.mergekit else "spec"), end="")
    return 0


def cmd_study_materialize(args: argparse.Namespace) -> int:
    import yaml

    from merging.config import MergeConfig
    from service.materialize import write_model

    if args.on_worker:
        return _materialize_on_worker(args)
    config = MergeConfig.from_dict(yaml.safe_load(_client(args).export(args.study_id, args.trial, "spec")))
    out = write_model(config, Path(args.out_dir), dtype=args.dtype, device=args.device,
                      cache_dir=_settings(args).cache_dir)
    print(f"trial {args.trial} of study {args.study_id} written to {out}")
    return 0


def _materialize_on_worker(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.materialize_into(args.study_id, args.trial, Path(args.out_dir), args.dtype,
                                  on_queued=lambda j: print(f"job {j['id']} queued; waiting for a worker",
                                                            file=sys.stderr))
    print(f"trial {args.trial} of study {args.study_id} written to {args.out_dir} (by worker {job['worker']})")
    return 0


def _run_local(args: argparse.Namespace, study_id: int | None) -> int:
    from rich.console import Console

    from search.spec import load_spec
    from service import local
    from service.demo import pareto_table
    from service.runner import TrialRunner
    from service.services import Services
    from service.studies import get_study, pareto

    settings = _settings(args)
    services = Services.start(settings)
    console = Console(width=max(Console().width, 120))
    try:
        if study_id is None:
            study_id = local.create(services, load_spec(Path(args.spec)))
        else:
            with services.sessions() as session:
                if get_study(session, study_id, None) is None:
                    raise ValueError(f"no study {study_id} in {settings.resolved_database_url()}")
        console.print(f"study {study_id} (database {settings.resolved_database_url()})")
        runner = TrialRunner.from_settings(settings)

        def on_trial(number: int, done: int, values: dict | None, error: str | None, rung: str) -> None:
            if values is not None:
                console.print(f"trial {number} done ({done} finished{'; ' + rung if rung else ''})")
            elif error is not None:  # the reason, where a script or a log collector sees it
                print(f"mmmo: trial {number} failed: {error}", file=sys.stderr, flush=True)
            else:
                console.print(f"trial {number} abandoned: its lease was lost")

        final = local.run(services, study_id, runner, on_trial=on_trial)
        with services.sessions() as session:
            console.print(pareto_table(pareto(get_study(session, study_id, None)).model_dump(mode="json")))
        console.print(f"study {study_id}: {final['status']}")
        if final["error"]:
            raise RuntimeError(f"study {study_id} failed: {final['error']}")
        if not final["counts"].get("complete"):
            failed = final["counts"].get("failed", 0)
            raise RuntimeError(f"study {study_id}: no trial completed ({failed} failed; their reasons are above)")
    finally:
        services.close()
    return 0


def cmd_study_run(args: argparse.Namespace) -> int:
    return _run_local(args, None)


def cmd_study_resume(args: argparse.Namespace) -> int:
    return _run_local(args, args.study_id)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from service.db.migrate import current, upgrade

    url = _settings(args).resolved_database_url()
    upgrade(url)
    print(f"database at revision {current(url)}: {url}")
    return 0


def cmd_study_validate(args: argparse.Namespace) -> int:
    from search.spec import load_spec

    spec = load_spec(Path(args.spec))
    print(f"ok: {spec.name} ({len(spec.experts)} experts, {len(spec.objectives)} objectives, "
          f"{spec.budget.trials} trials, method {spec.method})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmmo", description="Multi-objective search for LLM merges.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_db(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--db", help="database URL (default: MMMO_DATABASE_URL, else SQLite in MMMO_HOME)")
        p.add_argument("--home", help="state directory (default: MMMO_HOME or ~/.mmmo)")
        return p

    p = with_db(sub.add_parser("serve", help="run the API server and dashboard"))
    p.add_argument("--host", help="address to bind (default: MMMO_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: MMMO_PORT or 8765)")
    p.set_defaults(func=cmd_serve)

    def with_memory(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--max-memory", help="what model sets may take, e.g. 40GB; several stay resident up to it "
                       "(default: MMMO_MAX_MEMORY, else the memory free when a set loads, one set at a time)")
        p.add_argument("--memory-plan", choices=["auto", "resident", "host", "files"],
                       help="where a set's experts live (default: MMMO_MEMORY_PLAN or auto: the fastest that fits)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="hold and merge models in this dtype when the spec names none (default: MMMO_DTYPE, "
                       "else each checkpoint's own)")
        return p

    p = with_memory(sub.add_parser("worker", help="lease and run trials from a server"))
    p.add_argument("--server", help="API URL (default: MMMO_SERVER_URL or http://127.0.0.1:8765)")
    p.add_argument("--token", help="API token (default: MMMO_TOKEN, MMMO_TOKEN_FILE, or ~/.mmmo/token)")
    p.add_argument("--home", help="state directory holding the default token file")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: MMMO_DEVICE or cpu)")
    p.add_argument("--name", help="worker name (default: MMMO_WORKER_NAME, else host name and pid)")
    p.add_argument("--batch-size", help="lm-eval batch size, or 'auto' (default: MMMO_BATCH_SIZE or 64)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="do not lease the next trial during the current one (for a server on the same cores; "
                   "MMMO_PREFETCH=0)")
    p.set_defaults(func=cmd_worker)

    p = with_db(sub.add_parser("demo", help="build the demo zoo and run a study end to end"))
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--exit-when-done", action="store_true", help="print the Pareto front and exit")
    p.set_defaults(func=cmd_demo)

    zoo = sub.add_parser("zoo", help="the demo model zoo").add_subparsers(dest="zoo_command", required=True)
    p = with_db(zoo.add_parser("build", help="build (or reuse) the demo zoo"))
    p.add_argument("--out", help="directory to build into (default: the cache directory)")
    p.set_defaults(func=cmd_zoo_build)

    p = sub.add_parser("eval", help="score a model directory on lm-eval tasks")
    p.add_argument("model_dir")
    p.add_argument("--task", action="append", required=True)
    p.add_argument("--samples", type=int, default=None, help="fixed seeded subset size (default: all)")
    p.add_argument("--batch-size", default=64, type=lambda v: v if v == "auto" else int(v))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    db = sub.add_parser("db", help="the database").add_subparsers(dest="db_command", required=True)
    p = with_db(db.add_parser("upgrade", help="apply the service's migrations (Optuna's tables are Optuna's)"))
    p.set_defaults(func=cmd_db_upgrade)

    p = with_db(sub.add_parser("merge", help="merge checkpoints from a mergekit-style YAML into OUT_DIR"))
    p.add_argument("config")
    p.add_argument("out_dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="what the merged model is written in (mergekit's out_dtype; default: the YAML's)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--allow-unrelated", action="store_true",
                   help="merge experts that do not look fine-tuned from the base (a warning, not a refusal)")
    p.set_defaults(func=cmd_merge)

    admin = sub.add_parser("admin", help="teams and API tokens (works on the database directly)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    p = with_db(admin_sub.add_parser("create-team", help="a new team"))
    p.add_argument("name")
    p.set_defaults(func=cmd_admin_create_team)
    p = with_db(admin_sub.add_parser("list-teams", help="team names, one a line"))
    p.set_defaults(func=cmd_admin_list_teams)
    p = with_db(admin_sub.add_parser("create-token", help="a new API token; printed alone on the last line"))
    p.add_argument("--team", help="the team whose studies the token opens")
    p.add_argument("--workers", action="store_true", help="a worker-pool token: leases trials of every team")
    p.add_argument("--name", help="a label for listings")
    p.add_argument("--user", help="the person it is for (recorded as the creator of their studies)")
    p.set_defaults(func=cmd_admin_create_token)
    p = with_db(admin_sub.add_parser("list-tokens", help="tokens (never their secrets)"))
    p.add_argument("--team")
    p.set_defaults(func=cmd_admin_list_tokens)
    p = with_db(admin_sub.add_parser("revoke", help="revoke a token by its id"))
    p.add_argument("token_id", type=int)
    p.set_defaults(func=cmd_admin_revoke)

    study = sub.add_parser("study", help="study specs").add_subparsers(dest="study_command", required=True)
    p = study.add_parser("validate", help="check a spec (YAML or JSON) without running it")
    p.add_argument("spec")
    p.set_defaults(func=cmd_study_validate)

    p = with_memory(with_db(study.add_parser("run", help="run a whole study in this process (no server)")))
    p.add_argument("spec")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: MMMO_DEVICE or cpu)")
    p.set_defaults(func=cmd_study_run)
    p = with_memory(with_db(study.add_parser("resume", help="go on with a study that `study run` did not finish")))
    p.add_argument("study_id", type=int)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: MMMO_DEVICE or cpu)")
    p.set_defaults(func=cmd_study_resume)

    def with_server(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", help="API URL (default: MMMO_SERVER_URL or http://127.0.0.1:8765)")
        p.add_argument("--token", help="API token (default: MMMO_TOKEN, MMMO_TOKEN_FILE, or ~/.mmmo/token)")
        p.add_argument("--home", help="state directory holding the default token file")
        p.add_argument("study_id", type=int)
        p.add_argument("--trial", type=int, required=True)
        return p

    p = with_server(study.add_parser("export", help="print a trial's merge config (ours, or mergekit YAML)"))
    p.add_argument("--mergekit", action="store_true")
    p.set_defaults(func=cmd_study_export)
    p = with_server(study.add_parser("materialize", help="write a trial's merged model to OUT_DIR"))
    p.add_argument("out_dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--on-worker", action="store_true",
                   help="have a worker write it (a job) and download the result, instead of merging here")
    p.set_defaults(func=cmd_study_materialize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # The demo and the zoo use only what is bundled: they never need the hub.
        offline = args.func in (cmd_demo, cmd_zoo_build) or _settings(args).offline
        _configure(args.verbose, offline)
        return args.func(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"mmmo: error: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
    except (OSError, ValueError, RuntimeError, KeyError, httpx.HTTPError) as exc:
        print(f"mmmo: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("mmmo: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
