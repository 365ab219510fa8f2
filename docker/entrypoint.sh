#!/usr/bin/env bash
# The entrypoint of the mmmo images: `mmmo-entrypoint ROLE [extra mmmo arguments]`.
#
#   server       wait for the database, `mmmo db upgrade` (unless MMMO_MIGRATE_ON_START=0), exec `mmmo serve`
#   worker       wait for the API token (MMMO_TOKEN, or the file MMMO_TOKEN_FILE), with MMMO_DEVICE=auto
#                and MMMO_GPU_LOCK_DIR claim one free GPU of the host, exec `mmmo worker`
#   init         wait for the database, `mmmo db upgrade`, create team MMMO_TEAM if missing, write a
#                worker-pool token to MMMO_TOKEN_FILE unless that file already holds one
#   migrate      wait for the database, `mmmo db upgrade` (the Kubernetes Job)
#   healthcheck  exit 0 when http://127.0.0.1:$MMMO_PORT/healthz answers 200 (the image's HEALTHCHECK)
#
# Any other first argument is run as a command (`docker compose run --rm init mmmo admin list-teams`);
# arguments that start with '-' go to the role named by MMMO_ROLE. All configuration comes from
# environment variables (docker/README.md has the table). mmmo reads and validates its own MMMO_*
# settings (host, port, device, batch size, ...): this script turns none of them into flags, it only
# does what must happen before mmmo starts. No secret ever goes on a command line.
#
# MMMO_DRY_RUN=1 prints what would run instead of running it ("+ CMD" for a step, "export NAME=VALUE",
# "exec CMD" for the final command), shell-quoted; the test suite drives the roles through it.
set -euo pipefail
shopt -s inherit_errexit # a failure inside $(...) stops the script too

readonly PROG=mmmo-entrypoint
readonly EX_CONFIG=78   # sysexits: configuration error
readonly EX_TEMPFAIL=75 # sysexits: something did not come up in time

die() { # die [CODE] MESSAGE: one line on stderr, then exit
    local code=$EX_CONFIG
    if [[ $# -gt 1 ]]; then code=$1; shift; fi
    printf '%s: %s\n' "$PROG" "$*" >&2
    exit "$code"
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

case "${MMMO_DRY_RUN:-0}" in
    1 | true | yes) DRY_RUN=1 ;;
    0 | false | no | "") DRY_RUN=0 ;;
    *) die "MMMO_DRY_RUN must be 0 or 1, not '${MMMO_DRY_RUN}'" ;;
esac

show() { # show WORD...: the words shell-quoted on one line of stdout
    local line
    printf -v line '%q ' "$@"
    printf '%s\n' "${line% }"
}

run() { # run CMD...: a step that must succeed
    if ((DRY_RUN)); then show + "$@"; else "$@"; fi
}

finish() { # finish CMD...: replace this shell with CMD
    if ((DRY_RUN)); then
        show exec "$@"
        exit 0
    fi
    exec "$@"
}

set_env() { # set_env NAME VALUE: export for the final command
    export "$1=$2"
    if ((DRY_RUN)); then show export "$1=$2"; fi
}

require() { # require NAME HINT
    [[ -n "${!1:-}" ]] || die "$1 is not set: $2"
}

int_var() { # int_var NAME DEFAULT: the variable's value, a non-negative integer
    local value="${!1:-$2}"
    [[ "$value" =~ ^[0-9]+$ ]] || die "$1 must be a whole number, not '$value'"
    printf '%s' "$((10#$value))"
}

python_cmd() { printf '%s' "${MMMO_PYTHON:-python3}"; }

require_database_url() {
    require MMMO_DATABASE_URL "the shared database, e.g. postgresql+psycopg://mmmo:PASSWORD@db:5432/mmmo \
(sqlite:////var/lib/mmmo/mmmo.db is fine for a single server)"
}

wait_for_database() {
    local timeout
    timeout=$(int_var MMMO_DB_WAIT_SECONDS 60)
    if ((DRY_RUN)); then
        show + wait-for-database "$timeout"
        return 0
    fi
    # SQLAlchemy is in the image (mmmo needs it); it reads the URL exactly as the service will.
    "$(python_cmd)" - "$timeout" <<'PY'
import os
import sys
import time

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

PROG, timeout = "mmmo-entrypoint", float(sys.argv[1])
try:
    url = sa.engine.make_url(os.environ["MMMO_DATABASE_URL"])
except ArgumentError:
    print(f"{PROG}: MMMO_DATABASE_URL is not a SQLAlchemy URL (dialect+driver://user:password@host:port/db)",
          file=sys.stderr)
    sys.exit(78)
shown = url.render_as_string(hide_password=True)
args = {"connect_timeout": 5} if url.get_backend_name() == "postgresql" else {}
try:
    engine = sa.create_engine(url, connect_args=args)
except (NoSuchModuleError, ModuleNotFoundError) as exc:
    print(f"{PROG}: MMMO_DATABASE_URL {shown}: no driver for it ({exc}); PostgreSQL URLs start with "
          "postgresql+psycopg:// (psycopg 3 is the driver these images ship)", file=sys.stderr)
    sys.exit(78)
deadline = time.monotonic() + timeout
while True:
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        break
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "not yet"
        if time.monotonic() >= deadline:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"{PROG}: the database {shown} did not answer within {timeout:g} s "
                  f"(MMMO_DB_WAIT_SECONDS): {reason}", file=sys.stderr)
            sys.exit(75)
        time.sleep(1)
engine.dispose()
PY
}

migrate() {
    require_database_url
    wait_for_database
    run mmmo db upgrade
}

# --- roles ---------------------------------------------------------------------------------------

role_migrate() { migrate; }

role_server() { # MMMO_HOST (the image: 0.0.0.0) and MMMO_PORT are read by `mmmo serve`
    local migrate_on_start
    migrate_on_start=$(int_var MMMO_MIGRATE_ON_START 1)
    require_database_url
    wait_for_database
    if ((migrate_on_start)); then run mmmo db upgrade; fi
    finish mmmo serve "$@"
}

team_listed() { # team_listed NAME < `mmmo admin list-teams` output (one name a line): is NAME listed?
    awk -v team="$1" '{ gsub(/^[ \t\r]+|[ \t\r]+$/, "") } $0 == team { found = 1 } END { exit !found }'
}

write_worker_token() { # write_worker_token FILE: a new worker-pool token, written atomically, mode 600
    local file=$1 label="${MMMO_WORKER_TOKEN_NAME:-workers}" out token tmp
    if ((DRY_RUN)); then
        show + mmmo admin create-token --workers --name "$label" ">" "$file"
        return 0
    fi
    mkdir -p "$(dirname "$file")"
    out=$(mmmo admin create-token --workers --name "$label") || die 1 "mmmo admin create-token --workers failed"
    token=$(printf '%s\n' "$out" | tail -n 1)
    token="${token//[[:space:]]/}"
    [[ -n "$token" ]] || die 1 "mmmo admin create-token --workers printed no token"
    tmp=$(umask 077 && mktemp "$file.XXXXXX")
    printf '%s\n' "$token" >"$tmp"
    mv -f "$tmp" "$file"
    log "wrote a worker-pool token ('$label') to $file"
}

role_init() {
    local team="${MMMO_TEAM:-default}" teams
    [[ "$team" =~ ^[^[:space:]]+$ ]] || die "MMMO_TEAM must be one word, not '$team'"
    migrate
    if ((DRY_RUN)); then
        run mmmo admin list-teams
        run mmmo admin create-team "$team"
    else
        teams=$(mmmo admin list-teams) || die 1 "mmmo admin list-teams failed"
        if team_listed "$team" <<<"$teams"; then
            log "team '$team' exists"
        else
            mmmo admin create-team "$team"
        fi
    fi
    if [[ -z "${MMMO_TOKEN_FILE:-}" ]]; then
        log "MMMO_TOKEN_FILE is not set: no worker-pool token written"
    elif [[ -s "$MMMO_TOKEN_FILE" ]]; then
        log "$MMMO_TOKEN_FILE already holds a worker token: kept"
    else
        write_worker_token "$MMMO_TOKEN_FILE"
    fi
}

wait_for_token_file() {
    local file=$MMMO_TOKEN_FILE timeout waited=0
    timeout=$(int_var MMMO_TOKEN_WAIT_SECONDS 300)
    until [[ -s "$file" ]]; do
        ((waited < timeout)) || die "$EX_TEMPFAIL" "MMMO_TOKEN_FILE $file is still missing or empty after \
${timeout} s (MMMO_TOKEN_WAIT_SECONDS): run the init role, or write a token from \
'mmmo admin create-token --workers' there"
        ((waited % 30 == 0)) && log "waiting for the token file $file"
        sleep 1
        waited=$((waited + 1))
    done
    [[ -r "$file" ]] || die "MMMO_TOKEN_FILE $file is not readable by uid $(id -u)"
}

claim_gpu() { # several worker containers on one host, MMMO_DEVICE=auto: lock one free GPU each
    local dir=$MMMO_GPU_LOCK_DIR uuid uuids
    command -v nvidia-smi >/dev/null || return 0 # no GPU: `auto` is the CPU
    mapfile -t uuids < <(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | tr -d '[:blank:]' | grep . || true)
    ((${#uuids[@]})) || return 0
    command -v flock >/dev/null || die "MMMO_GPU_LOCK_DIR is set but flock(1) is missing"
    mkdir -p "$dir" || die "cannot create MMMO_GPU_LOCK_DIR $dir"
    for uuid in "${uuids[@]}"; do
        exec 9>>"$dir/$uuid.lock" || die "cannot write the lock file $dir/$uuid.lock"
        if flock -n 9; then # fd 9 stays open across exec: the worker holds the lock while it lives
            set_env CUDA_VISIBLE_DEVICES "$uuid"
            set_env MMMO_DEVICE cuda:0
            return 0
        fi
        exec 9>&-
    done
    die "all ${#uuids[@]} GPUs of this host are taken by other workers (locks in $dir): \
run at most ${#uuids[@]} workers here"
}

role_worker() { # MMMO_DEVICE, MMMO_BATCH_SIZE, MMMO_MAX_MEMORY, ... are read by `mmmo worker`
    require MMMO_SERVER_URL "the API the worker leases trials from, e.g. https://mmmo.example.org"
    [[ "$MMMO_SERVER_URL" =~ ^https?://[^[:space:]]+$ ]] \
        || die "MMMO_SERVER_URL must be an http:// or https:// URL, not '$MMMO_SERVER_URL'"
    if [[ -z "${MMMO_TOKEN:-}" ]]; then
        [[ -n "${MMMO_TOKEN_FILE:-}" ]] || die "no API token: set MMMO_TOKEN or MMMO_TOKEN_FILE \
(a worker-pool token from 'mmmo admin create-token --workers')"
        wait_for_token_file
    fi
    if [[ -n "${MMMO_GPU_LOCK_DIR:-}" && "${MMMO_DEVICE:-}" == auto ]]; then claim_gpu; fi
    finish mmmo worker "$@"
}

role_healthcheck() { # the one role that reads MMMO_PORT: `mmmo serve` validates it
    local port
    port=$(int_var MMMO_PORT 8765)
    exec "$(python_cmd)" -c '
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
' "$port"
}

# --- dispatch ------------------------------------------------------------------------------------

if [[ $# -eq 0 || "${1:-}" == -* ]]; then
    role="${MMMO_ROLE:-}"
    [[ -n "$role" ]] || die "no role: pass server, worker, init, migrate or healthcheck (or set MMMO_ROLE)"
else
    role=$1
    shift
fi

case "$role" in
    server | worker | init | migrate | healthcheck) "role_$role" "$@" ;;
    *) finish "$role" "$@" ;;
esac
