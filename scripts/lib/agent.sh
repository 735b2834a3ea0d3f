# Shell helpers for scripts that run a real `deployd run`: a fresh host
# set up with `deployd init` in a temporary directory, the test bed's sample
# app configured, and its PostgreSQL and Redis on a network of their own.
# Source it; every function is prefixed `agent_`.
#
#   agent_bed                    the test bed up, debug deployd and deployctl
#                                built, the test bed's settings loaded
#   agent_free_port              a port nothing listens on now (the kernel's pick)
#   agent_init DIR PORT          init into DIR, API on 127.0.0.1:PORT
#   agent_services NAME [DRIVER] network NAME with db and redis (healthy);
#                                DRIVER overlay: an attachable overlay
#                                network of the engine's Swarm
#   agent_add_app DIR APP NAME   the sample app APP, from the test bed's
#                                repository, on network NAME; its first
#                                release task is `check --deploy` (on
#                                deploys), unless AGENT_CHECK=0; on
#                                deployd's swarm backend if AGENT_BACKEND
#                                is swarm
#   agent_start DIR              run deployd (AGENT_PID), wait until ready;
#                                AGENT_ARGS are passed before `run`, and
#                                AGENT_WRAP runs it (prlimit ..., say)
#   agent_token DIR SCOPES       a 1 h token for `ops`, e.g. read,deploy
#   agent_cleanup DIR NAME       stop deployd, remove Swarm services,
#                                containers and network

AGENT_BIN=${AGENT_BIN:-target/debug/deployd}
# Where `scripts/testbed.sh up` wrote the test bed's settings.
DEPLOYD_TESTBED_ENV_FILE=${DEPLOYD_TESTBED_ENV:-${DEPLOYD_TESTBED_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/deployd-testbed}/testbed.env}

agent_bed() {
    bash scripts/testbed.sh up >&2
    cargo build --locked -q -p deployd -p deployctl
    # shellcheck disable=SC1090
    . "$DEPLOYD_TESTBED_ENV_FILE"
}

agent_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

agent_init() {
    local dir=$1 port=$2
    "$AGENT_BIN" init --dir "$dir/etc" --san localhost --san 127.0.0.1 \
        --listen "127.0.0.1:$port" --state-dir "$dir/state" >"$dir/init.txt"
}

agent_services() {
    local name=$1 driver=${2:-bridge} attachable=
    # shellcheck disable=SC1090
    . "$DEPLOYD_TESTBED_ENV_FILE"
    [ "$driver" = overlay ] && attachable=--attachable
    # shellcheck disable=SC2086
    docker network create --label "deployd.script=$name" --driver "$driver" $attachable "$name" >/dev/null
    docker run -d --label "deployd.script=$name" --network "$name" --network-alias db \
        --env-file "$DEPLOYD_TESTBED_DB_ENV" "$DEPLOYD_TESTBED_POSTGRES_IMAGE" >/dev/null
    docker run -d --label "deployd.script=$name" --network "$name" --network-alias redis \
        "$DEPLOYD_TESTBED_REDIS_IMAGE" >/dev/null
    local id
    id=$(docker ps -q --filter "label=deployd.script=$name" --filter "ancestor=$DEPLOYD_TESTBED_POSTGRES_IMAGE")
    for _ in $(seq 1 120); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] && return 0
        sleep 0.5
    done
    echo "PostgreSQL did not become healthy" >&2
    return 1
}

agent_add_app() {
    local dir=$1 app=$2 name=$3 backend=
    # shellcheck disable=SC1090
    . "$DEPLOYD_TESTBED_ENV_FILE"
    # Only when asked: a deployd older than the key refuses it.
    [ -z "${AGENT_BACKEND:-}" ] || backend=$'\nbackend = "'"$AGENT_BACKEND"'"'
    # Each Swarm node has its own static volume: collectstatic fills each.
    local every_node=
    [ "${AGENT_BACKEND:-}" != swarm ] || every_node=$'\nevery_node = true'
    cat >>"$dir/etc/deployd.toml" <<EOF

[apps.$app]$backend
image = "$DEPLOYD_TESTBED_REPOSITORY"
registry_auth_file = "$DEPLOYD_TESTBED_REGISTRY_AUTH"
env_file = "$DEPLOYD_TESTBED_APP_ENV"
network = "$name"
volumes = ["$name-static:/app/static"]
verify = "5s"
retain = 10
EOF
    if [ "${AGENT_CHECK:-1}" = 1 ]; then
        cat >>"$dir/etc/deployd.toml" <<EOF
[[apps.$app.release]]
name = "check"
command = ["python", "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
on = ["deploy"]
EOF
    fi
    cat >>"$dir/etc/deployd.toml" <<EOF
[[apps.$app.release]]
name = "migrate"
command = ["python", "manage.py", "migrate", "--noinput"]
[[apps.$app.release]]
name = "collectstatic"
command = ["python", "manage.py", "collectstatic", "--noinput"]$every_node
[apps.$app.services.web]
port = 8000
replicas = 2
health = { path = "/healthz/", host = "$DEPLOYD_TESTBED_APP_HOST", headers = { "X-Forwarded-Proto" = "https" }, timeout = "30s" }
stop_timeout = "10s"
[apps.$app.services.worker]
command = ["celery", "-A", "config", "worker", "-l", "info", "-Q", "default,etl"]
stop_timeout = "30s"
min_healthy = "3s"
[apps.$app.services.beat]
command = ["celery", "-A", "config", "beat", "-l", "info"]
min_healthy = "3s"
stop_timeout = "10s"
EOF
}

agent_start() {
    local dir=$1
    local before
    before=$(grep -sc 'deployd ready' "$dir/deployd.log" || true)
    before=${before:-0}
    # shellcheck disable=SC2086
    ${AGENT_WRAP:-} "$AGENT_BIN" ${AGENT_ARGS:-} run --config "$dir/etc/deployd.toml" 2>>"$dir/deployd.log" &
    AGENT_PID=$!
    for _ in $(seq 1 1200); do
        [ "$(grep -c 'deployd ready' "$dir/deployd.log" || true)" -gt "$before" ] && return 0
        kill -0 "$AGENT_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$dir/deployd.log" >&2
    echo "deployd did not get ready" >&2
    return 1
}

agent_token() {
    local dir=$1 scopes=$2
    "$AGENT_BIN" token issue --config "$dir/etc/deployd.toml" --sub ops --scope "$scopes" --ttl 1h
}

agent_cleanup() {
    local dir=$1 name=${2:-}
    if [ -n "${AGENT_PID:-}" ]; then
        kill "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    if [ -n "$name" ]; then
        if [ "$(docker info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null)" = true ]; then
            docker service ls -q --filter "label=deployd.app=$name" | xargs -r docker service rm >/dev/null || true
        fi
        # A removed service's tasks may be going already: not an error.
        docker ps -aq --filter "label=deployd.script=$name" | xargs -r docker rm -f -v >/dev/null 2>&1 || true
        docker ps -aq --filter "label=deployd.app=$name" | xargs -r docker rm -f -v >/dev/null 2>&1 || true
        # A Swarm service's tasks leave the network a moment after it goes.
        for _ in $(seq 1 60); do
            docker network rm "$name" >/dev/null 2>&1 && break
            docker network inspect "$name" >/dev/null 2>&1 || break
            sleep 0.5
        done
        docker volume rm "$name-static" >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}
