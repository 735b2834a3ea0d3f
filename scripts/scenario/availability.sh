#!/usr/bin/env bash
# Availability under continuous load, deployd next to the reference
# deploy.sh with docker-compose, in one run on one test bed.
#
# Load: scripts/lib/http_load.py, 2 keep-alive clients and 2 clients
# opening a new connection per request, looping on GET /release/ of the
# sample app (which release answered), Host and X-Forwarded-Proto as a TLS
# terminator in front would send them.
#
# deployd: its public address is a socket held as systemd's deployd.socket
# would hold it (scripts/lib/socket_holder.py, LISTEN_FDS); under load it
# goes release 1 -> release 2 (deployctl deploy), a release that fails
# verification after the switch (rolled back automatically), deployctl
# rollback, then a restart of deployd itself.
#
# Then why deployd plans migrations: the app has `[migrations] unsafe =
# "refuse"`, release 2 runs, and the load moves to GET /heartbeats/, which
# reads the column `queue`. The drop-column build, which drops it, is
# refused by the plan; then forced through with --allow-unsafe-migrations:
# between its migrate and the switch, release 2 answers 500 for a column
# that is gone.
#
# Reference: the document's docker-compose.prod.yml and deploy.sh, as
# written but for what an offline host forces (the test bed's images for
# postgres and redis and its registry, python instead of curl in the
# image's healthcheck, sending the X-Forwarded-Proto its TLS proxy would (the
# app redirects plain HTTP), Debian's docker-compose for `docker compose`,
# localhost in ALLOWED_HOSTS for deploy.sh's own curl, a loopback port);
# under load it goes release 1 -> release 2, then back to release 1 with
# deploy.sh (it has no rollback).
#
# Prints requests and failed requests per phase for both, and which
# releases served them. Exits non-zero if deployd failed any request in
# its release phases or while refusing drop-column (the forced deploy's
# failures are what the plan prevents: counted, not checked).
#
#   scripts/scenario/availability.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

agent_bed
if ! command -v docker-compose >/dev/null; then
    echo "installing docker-compose (Debian package)" >&2
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_=sudo
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q docker-compose >/dev/null
fi

dir=$(mktemp -d)
name=avail$$
holder=
load=
ref() {
    (cd "$dir/ref" && DOCKER_CONFIG=$dir/docker COMPOSE_PROJECT_NAME=$name-ref "$@")
}
cleanup() {
    touch "$dir/stop"
    [ -z "$load" ] || wait "$load" 2>/dev/null || true
    if [ -n "$holder" ]; then
        kill "$holder" 2>/dev/null || true
        wait "$holder" 2>/dev/null || true
    fi
    if [ -f "$dir/ref/docker-compose.prod.yml" ]; then
        ref env IMAGE_TAG=none docker-compose -f docker-compose.prod.yml down -v >/dev/null 2>&1 || true
    fi
    AGENT_PID='' agent_cleanup "$dir" "$name"
}
trap cleanup EXIT
say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
now() { date +%s.%N; }
# phase NAME COMMAND...: runs it and records when it ran.
phase() {
    local label=$1 start
    shift
    say "$label"
    start=$(now)
    "$@"
    printf '%s\t%s\t%s\n' "$label" "$start" "$(now)" >>"$phases"
}
# start_load PORT OUT [PATH]: clients loop on GET PATH (/release/).
start_load() {
    rm -f "$dir/stop"
    python3 scripts/lib/http_load.py run "http://127.0.0.1:$1${3:-/release/}" "$DEPLOYD_TESTBED_APP_HOST" \
        "$2" "$dir/stop" --keep-alive 2 --fresh 2 &
    load=$!
}
stop_load() {
    touch "$dir/stop"
    wait "$load"
    load=
}
settle() { sleep 5; }

# ---- deployd ----------------------------------------------------------------
api_port=$(agent_free_port)
public_port=$(agent_free_port)
agent_init "$dir" "$api_port"
agent_add_app "$dir" "$name" "$name"
printf '[apps.%s.switch]\nlisten = "127.0.0.1:%s"\ntrust_forwarded_headers = true\n' \
    "$name" "$public_port" >>"$dir/etc/deployd.toml"
printf '[apps.%s.migrations]\nunsafe = "refuse"\n' "$name" >>"$dir/etc/deployd.toml"
agent_services "$name"
python3 scripts/lib/socket_holder.py "127.0.0.1:$public_port" -- \
    "$PWD/$AGENT_BIN" run --config "$dir/etc/deployd.toml" 2>"$dir/deployd.log" &
holder=$!
# ready N: deployd has said "deployd ready" N times (once per start).
ready() {
    for _ in $(seq 1 1200); do
        [ "$(grep -c 'deployd ready' "$dir/deployd.log")" -ge "$1" ] && return 0
        sleep 0.1
    done
    echo "deployd did not get ready" >&2
    tail -20 "$dir/deployd.log" >&2
    return 1
}
ready 1
export DEPLOYCTL_URL=https://localhost:$api_port DEPLOYCTL_CA_CERT=$dir/etc/tls/cert.pem DEPLOYCTL_APP=$name
deployctl() {
    DEPLOYCTL_TOKEN=$(agent_token "$dir" read,deploy,rollback) ./target/debug/deployctl "$@" \
        >>"$dir/deployctl.log" 2>&1
}
# deployctl exits 3 when the deployment failed before changing anything.
# refused SHA: the deployment failed, changing nothing, because of its plan.
refused() {
    local code=0 before
    before=$(grep -c 'refused: a migration would break' "$dir/deployctl.log" || true)
    deployctl deploy "$1" || code=$?
    [ "$code" = 3 ] &&
        [ "$(grep -c 'refused: a migration would break' "$dir/deployctl.log")" -gt "$before" ]
}
forced() {
    DEPLOYCTL_TOKEN=$(agent_token "$dir" read,deploy,admin) ./target/debug/deployctl deploy "$1" \
        --allow-unsafe-migrations --reason "availability scenario: what the gate prevents" \
        >>"$dir/deployctl.log" 2>&1
}
# deployctl exits 4 when the deployment was rolled back.
rolled_back() {
    local code=0
    deployctl deploy "$1" || code=$?
    [ "$code" = 4 ]
}
restart() {
    kill -HUP "$holder"
    ready 2
}

say "deployd: release 1, before the load starts"
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1"
phases=$dir/deployd-phases.tsv
start_load "$public_port" "$dir/deployd-load.ndjson"
phase "before" settle
phase "deploy 1 -> 2" deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2"
phase "after" settle
phase "broken release, rolled back" rolled_back "$DEPLOYD_TESTBED_SHA_UNHEALTHY_AFTER_5_CHECKS"
phase "after" settle
phase "deployctl rollback (-> 1)" deployctl rollback
phase "after" settle
phase "restart deployd" restart
phase "after" settle
stop_load

say "deployd: release 2 again, then the load moves to /heartbeats/"
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2"
phases=$dir/schema-phases.tsv
start_load "$public_port" "$dir/schema-load.ndjson" /heartbeats/
phase "before" settle
phase "drop-column, refused by the plan" refused "$DEPLOYD_TESTBED_SHA_DROP_COLUMN"
phase "after" settle
phase "drop-column, forced through" forced "$DEPLOYD_TESTBED_SHA_DROP_COLUMN"
phase "after" settle
stop_load

# ---- reference: docker-compose + deploy.sh ----------------------------------
mkdir -p "$dir/ref" "$dir/docker"
ref_port=$(agent_free_port)
auth() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$DEPLOYD_TESTBED_REGISTRY_AUTH" "$1"; }
auth password | ref docker login -u "$(auth username)" --password-stdin "$DEPLOYD_TESTBED_REGISTRY" >/dev/null 2>&1
cp "$DEPLOYD_TESTBED_APP_ENV" "$dir/ref/.env.prod"
cp "$DEPLOYD_TESTBED_DB_ENV" "$dir/ref/.env.db"
sed -e "s|@REPOSITORY@|$DEPLOYD_TESTBED_REPOSITORY|" -e "s|@APP_HOST@|$DEPLOYD_TESTBED_APP_HOST|" \
    -e "s|@PORT@|$ref_port|" -e "s|@POSTGRES@|$DEPLOYD_TESTBED_POSTGRES_IMAGE|" \
    -e "s|@REDIS@|$DEPLOYD_TESTBED_REDIS_IMAGE|" \
    scripts/scenario/reference/docker-compose.prod.yml >"$dir/ref/docker-compose.prod.yml"
sed -e "s|@PORT@|$ref_port|" scripts/scenario/reference/deploy.sh >"$dir/ref/deploy.sh"
# A failed deploy.sh is the reference's own outcome, counted by its load, not
# the end of the comparison.
reference() {
    local code=0
    ref bash deploy.sh "$1" >>"$dir/reference.log" 2>&1 || code=$?
    [ "$code" -eq 0 ] || echo "reference deploy.sh $1 exited $code" >&2
}

say "reference: db and redis, then release 1 with deploy.sh, before the load starts"
ref env IMAGE_TAG="$DEPLOYD_TESTBED_SHA_RELEASE_1" docker-compose -f docker-compose.prod.yml up -d db redis \
    >>"$dir/reference.log" 2>&1
# deploy.sh migrates first: wait for the database to take connections.
for _ in $(seq 1 240); do
    id=$(ref env IMAGE_TAG=none docker-compose -f docker-compose.prod.yml ps -q db 2>/dev/null || true)
    [ -n "$id" ] && docker exec "$id" pg_isready -q 2>/dev/null && break
    sleep 0.5
done
reference "$DEPLOYD_TESTBED_SHA_RELEASE_1"
phases=$dir/reference-phases.tsv
start_load "$ref_port" "$dir/reference-load.ndjson"
phase "before" settle
phase "deploy.sh 1 -> 2" reference "$DEPLOYD_TESTBED_SHA_RELEASE_2"
phase "after" settle
phase "deploy.sh 2 -> 1 (no rollback)" reference "$DEPLOYD_TESTBED_SHA_RELEASE_1"
phase "after" settle
stop_load

# ---- report -----------------------------------------------------------------
python3 scripts/lib/http_load.py report "$dir/deployd-load.ndjson" "$dir/deployd-phases.tsv" >"$dir/deployd.json"
python3 scripts/lib/http_load.py report "$dir/reference-load.ndjson" "$dir/reference-phases.tsv" >"$dir/reference.json"
python3 scripts/lib/http_load.py report "$dir/schema-load.ndjson" "$dir/schema-phases.tsv" >"$dir/schema.json"
python3 scripts/lib/http_load.py table "deployd, a column release 2 reads dropped (GET /heartbeats/)" \
    "$dir/schema.json"
code=0
python3 scripts/lib/http_load.py compare "$dir/deployd.json" "$dir/reference.json" || code=$?
# The refused deployment must have cost nothing.
if ! python3 -c '
import json, sys
phases = json.load(open(sys.argv[1]))["phases"]
sys.exit(1 if any(p["failed"] for p in phases if p["phase"].endswith("refused by the plan")) else 0)
' "$dir/schema.json"; then
    echo "deployd failed requests while refusing drop-column" >&2
    code=1
fi
exit "$code"
