#!/usr/bin/env bash
# A fleet deployed as one: three deployd agents on this machine, each with
# its own state, API port, app and network, sharing one PostgreSQL and one
# Redis as one production would; each app behind its agent's switch, the
# three switches behind an HAProxy (Debian's package) that balances them.
# Only the first host runs celery beat. Continuous load through HAProxy
# (scripts/lib/http_load.py) during:
#
# 1. fleet deploy release 1 -> release 2 (max_parallel 1): floors: 0 failed
#    requests, migrations ran once (on the first host only), all three
#    hosts on release 2, exit 0;
# 2. fleet deploy of `needs-feature-key`, healthy only where
#    SHOP_FEATURE_KEY is set, which the second host's env lacks: the second
#    host rolls itself back, the first is reverted, the third never touched;
#    floors: exit 4, all three on release 2, 0 failed requests;
# 3. deployctl rollback --fleet: floors: all on release 1, 0 failed;
# 4. deployctl killed (SIGKILL) while the first host deploys release 2;
#    `fleet status` shows the fleet deployment holding the hosts; `deploy
#    --fleet --resume` finishes it: floors: all on release 2, unlocked, 0
#    failed requests.
# Beat: never two running fleet-wide (Docker events), across every step.
# Then wall time, without load: release 1 -> 2 on one host alone, and on
# the three hosts with max_parallel 3 and first_wave 3 (the once host
# starts first, the other two once its migrations are done); both figures
# and their ratio are printed.
#
#   scripts/scenario/fleet.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

agent_bed
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    echo "installing haproxy (Debian package)" >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q haproxy >/dev/null
fi
haproxy_bin=$(command -v haproxy || echo /usr/sbin/haproxy)

dir=$(mktemp -d)
name=fleet$$
hosts=(a b c)
pids=()
lb_pid=
load_pid=
events_pid=
cleanup() {
    touch "$dir/stop-load"
    [ -z "$load_pid" ] || wait "$load_pid" 2>/dev/null || true
    [ -z "$lb_pid" ] || kill "$lb_pid" 2>/dev/null || true
    [ -z "$events_pid" ] || kill "$events_pid" 2>/dev/null || true
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for h in "${hosts[@]}"; do
        AGENT_PID='' agent_cleanup "$dir/$h" "$name$h" >/dev/null 2>&1 || true
    done
    # By tag: the images are the test bed's, under another name.
    docker images --format '{{.Repository}}:{{.Tag}}' "$repo" | xargs -r docker rmi >/dev/null 2>&1 || true
    AGENT_PID='' agent_cleanup "$dir" "$name"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    for h in "${hosts[@]}"; do
        echo "--- deployd $h" >&2
        tail -n 15 "$dir/$h/deployd.log" >&2 || true
    done
    exit 1
}
log() { printf '[fleet %s] %s\n' "$(date +%T)" "$*" >&2; }
field() { python3 -c "import json, sys; print(json.loads(sys.argv[1])$2)" "$1"; }

# The releases in a repository of the fleet's own: the agents prune what
# they pulled, and must not prune the test bed's own tags.
repo=$DEPLOYD_TESTBED_REGISTRY/$name
mkdir -p "$dir/docker-config"
python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["password"])' "$DEPLOYD_TESTBED_REGISTRY_AUTH" \
    | docker --config "$dir/docker-config" login --password-stdin \
        -u "$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["username"])' "$DEPLOYD_TESTBED_REGISTRY_AUTH")" \
        "$DEPLOYD_TESTBED_REGISTRY" >/dev/null
for sha in "$DEPLOYD_TESTBED_SHA_RELEASE_1" "$DEPLOYD_TESTBED_SHA_RELEASE_2" "$DEPLOYD_TESTBED_SHA_NEEDS_FEATURE_KEY"; do
    docker tag "$DEPLOYD_TESTBED_REPOSITORY:$sha" "$repo:$sha"
    docker --config "$dir/docker-config" push -q "$repo:$sha" >/dev/null
done

# One PostgreSQL and one Redis for the fleet, reachable from each app's own
# network by the names the app uses (db, redis).
agent_services "$name"
db=$(docker ps -q --filter "label=deployd.script=$name" --filter "ancestor=$DEPLOYD_TESTBED_POSTGRES_IMAGE")
redis=$(docker ps -q --filter "label=deployd.script=$name" --filter "ancestor=$DEPLOYD_TESTBED_REDIS_IMAGE")

lb_port=$(agent_free_port)
servers=""
for h in "${hosts[@]}"; do
    d=$dir/$h
    mkdir -p "$d"
    api_port=$(agent_free_port)
    public_port=$(agent_free_port)
    agent_init "$d" "$api_port"
    echo "$api_port" >"$d/api_port"
    # The app redirects plain HTTP; HAProxy and the switch speak plain HTTP
    # on loopback here, so `check --deploy` (which refuses that) stays off.
    AGENT_CHECK=0 agent_add_app "$d" "$name$h" "$name$h"
    cp "$DEPLOYD_TESTBED_APP_ENV" "$d/app.env"
    echo "DJANGO_SECURE_SSL_REDIRECT=false" >>"$d/app.env"
    # The host-specific fault of step 2: the second host lacks this key.
    [ "$h" = b ] || echo "SHOP_FEATURE_KEY=on" >>"$d/app.env"
    sed -i "s|^env_file = .*|env_file = \"$d/app.env\"|; s|^image = .*|image = \"$repo\"|" "$d/etc/deployd.toml"
    # Migrate runs once per fleet deployment; beat only on the first host.
    sed -i "/^name = \"migrate\"/a once = true" "$d/etc/deployd.toml"
    [ "$h" = a ] || sed -i "/^\[apps\.$name$h\.services\.beat\]/,\$d" "$d/etc/deployd.toml"
    printf '[apps.%s.switch]\nlisten = "127.0.0.1:%s"\n' "$name$h" "$public_port" >>"$d/etc/deployd.toml"
    # One signing key for the fleet, as ops would hand every host the same
    # public key: a token of the first host's key is good on all three.
    [ "$h" = a ] || cp "$dir/a/etc/keys/ops.key" "$dir/a/etc/keys/ops.pub" "$d/etc/keys/"
    docker network create --label "deployd.script=$name$h" "$name$h" >/dev/null
    docker network connect --alias db "$name$h" "$db"
    docker network connect --alias redis "$name$h" "$redis"
    agent_start "$d"
    pids+=("$AGENT_PID")
    servers+="    server $h 127.0.0.1:$public_port check inter 500ms fall 2 rise 2"$'\n'
    cat >"$d/host.toml" <<EOF

[[hosts]]
name = "$h"
url = "https://localhost:$api_port"
ca_cert = "$d/etc/tls/cert.pem"
app = "$name$h"
EOF
done
AGENT_PID=
log "three agents up"

fleet_file() { # NAME MAX_PARALLEL FIRST_WAVE HOST...
    local file=$dir/$1.toml h
    printf 'max_parallel = %s\nfirst_wave = %s\nfailure_budget = 0\n' "$2" "$3" >"$file"
    shift 3
    for h in "$@"; do cat "$dir/$h/host.toml" >>"$file"; done
    echo "$file"
}
prod=$(fleet_file prod 1 1 a b c)
export DEPLOYCTL_TOKEN_FILE=$dir/token
token() { agent_token "$dir/a" read,deploy,rollback >"$dir/token"; }
deployctl() { ./target/debug/deployctl "$@"; }
live_of() { # HOST -> the sha its status says is live
    local h=$1
    DEPLOYCTL_URL=https://localhost:$(cat "$dir/$h/api_port") DEPLOYCTL_CA_CERT=$dir/$h/etc/tls/cert.pem DEPLOYCTL_APP=$name$h \
        deployctl status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["live_sha"])'
}
all_on() { # SHA WHAT
    local h live
    for h in "${hosts[@]}"; do
        live=$(live_of "$h")
        [ "$live" = "$1" ] || fail "$2: host $h runs $live, not $1"
    done
}

# Release 1 everywhere, before the load starts (HAProxy has nothing to
# balance before it).
token
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" --fleet-file "$prod" >"$dir/deploy-0.log" 2>&1 \
    || fail "release 1 did not deploy to the fleet: $(tail -n 30 "$dir/deploy-0.log")"
all_on "$DEPLOYD_TESTBED_SHA_RELEASE_1" "release 1"
log "release 1 on every host"
deployctl fleet check --fleet-file "$prod" >"$dir/check.txt" 2>&1 \
    || fail "fleet check refused the fleet: $(cat "$dir/check.txt")"
grep -q "wave 3: c" "$dir/check.txt" || fail "fleet check did not plan three waves: $(cat "$dir/check.txt")"

cat >"$dir/haproxy.cfg" <<EOF
global
    maxconn 1000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
    option http-server-close
frontend site
    bind 127.0.0.1:$lb_port
    default_backend switches
backend switches
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz/ hdr Host $DEPLOYD_TESTBED_APP_HOST hdr X-Forwarded-Proto https
$servers
EOF
"$haproxy_bin" -f "$dir/haproxy.cfg" -db >"$dir/haproxy.log" 2>&1 &
lb_pid=$!
for _ in $(seq 1 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $lb_port), 1)" 2>/dev/null && break
    sleep 0.1
done

docker events --filter type=container --filter label=deployd.service=beat \
    --format '{{json .}}' >"$dir/beat-events.ndjson" &
events_pid=$!
python3 scripts/lib/http_load.py run "http://127.0.0.1:$lb_port/release/" "$DEPLOYD_TESTBED_APP_HOST" \
    "$dir/load.ndjson" "$dir/stop-load" --keep-alive 2 --fresh 2 &
load_pid=$!
phase() { # NAME START END
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$dir/phases.tsv"
}
sleep 3

# ---- 1. release 1 -> release 2 ----------------------------------------------
token
start=$(date +%s.%N)
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" --fleet-file "$prod" >"$dir/deploy-1.log" 2>&1 \
    || fail "step 1: exit $?: $(tail -n 30 "$dir/deploy-1.log")"
phase "1 deploy 1->2" "$start" "$(date +%s.%N)"
all_on "$DEPLOYD_TESTBED_SHA_RELEASE_2" "step 1"
migrated=$(grep -c "task:migrate.*Applying" "$dir/deploy-1.log" || true)
skipped=$(grep -c "skipped: a once task" "$dir/deploy-1.log" || true)
[ "$migrated" -ge 1 ] || fail "step 1: no host applied the migration"
[ "$(grep "task:migrate.*Applying" "$dir/deploy-1.log" | awk '{print $1}' | sort -u)" = a ] \
    || fail "step 1: migrations ran on more than the first host"
[ "$skipped" -eq 2 ] || fail "step 1: migrate was skipped on $skipped hosts, not 2"
log "step 1: every host on release 2; migrate ran on host a only and was skipped on 2 hosts"

# ---- 2. a host-specific fault ---------------------------------------------
token
start=$(date +%s.%N)
set +e
deployctl deploy "$DEPLOYD_TESTBED_SHA_NEEDS_FEATURE_KEY" --fleet-file "$prod" >"$dir/deploy-2.log" 2>&1
code=$?
set -e
phase "2 fault on host b" "$start" "$(date +%s.%N)"
[ "$code" -eq 4 ] || fail "step 2: exit $code, not 4: $(tail -n 30 "$dir/deploy-2.log")"
all_on "$DEPLOYD_TESTBED_SHA_RELEASE_2" "step 2"
grep -q "^c  " "$dir/deploy-2.log" && fail "step 2: host c was touched"
log "step 2: exit 4; host b rolled itself back, host a was reverted, host c never touched"

# ---- 3. fleet rollback ---------------------------------------------------------
token
start=$(date +%s.%N)
deployctl rollback --fleet-file "$prod" >"$dir/rollback-3.log" 2>&1 \
    || fail "step 3: exit $?: $(tail -n 30 "$dir/rollback-3.log")"
phase "3 rollback --fleet" "$start" "$(date +%s.%N)"
all_on "$DEPLOYD_TESTBED_SHA_RELEASE_1" "step 3"
log "step 3: every host back on release 1"

# ---- 4. deployctl killed mid-fleet, then --resume ---------------------------------
token
start=$(date +%s.%N)
# The binary itself in the background (not the shell function), so that
# SIGKILL reaches deployctl.
./target/debug/deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" --fleet-file "$prod" >"$dir/deploy-4.log" 2>&1 &
victim=$!
for _ in $(seq 1 1200); do
    grep -q "^a .*roll:web" "$dir/deploy-4.log" && break
    sleep 0.1
done
grep -q "^a .*roll:web" "$dir/deploy-4.log" || fail "step 4: host a never started rolling"
kill -9 "$victim"
wait "$victim" 2>/dev/null || true
deployctl fleet status --fleet-file "$prod" >"$dir/status-4.txt" 2>&1 || true
grep -q "fleet deployment" "$dir/status-4.txt" \
    || fail "step 4: fleet status does not show the fleet deployment: $(cat "$dir/status-4.txt")"
log "step 4: deployctl killed while host a rolled; fleet status:"
cat "$dir/status-4.txt" >&2
set +e
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" --fleet-file "$prod" --resume >"$dir/resume-4.log" 2>&1
code=$?
set -e
phase "4 killed, resumed" "$start" "$(date +%s.%N)"
[ "$code" -eq 0 ] || fail "step 4: --resume exit $code: $(tail -n 30 "$dir/resume-4.log")"
all_on "$DEPLOYD_TESTBED_SHA_RELEASE_2" "step 4"
deployctl fleet status --fleet-file "$prod" >"$dir/status-4b.txt" 2>&1 \
    || fail "step 4: fleet status failed"
grep -q "fleet deployment" "$dir/status-4b.txt" && fail "step 4: a host is still locked"
log "step 4: resumed; every host on release 2 and unlocked"
deployctl history --fleet-file "$prod" --limit 20 --json >"$dir/history.json" \
    || fail "history --fleet failed"
python3 - "$dir/history.json" <<'PY' || fail "history --fleet: $(head -c 2000 "$dir/history.json")"
import json, sys
rows = json.load(open(sys.argv[1]))["deployments"]
hosts = {r["host"] for r in rows}
fleets = {r["deployment"]["fleet"]["id"] for r in rows if r["deployment"].get("fleet")}
assert hosts == {"a", "b", "c"}, hosts
# Release 1, step 1, step 2, the rollback, the killed and resumed one.
assert len(fleets) == 5, fleets
PY

sleep 2
touch "$dir/stop-load"
wait "$load_pid"
load_pid=
python3 scripts/lib/http_load.py report "$dir/load.ndjson" "$dir/phases.tsv" >"$dir/load.json"
log "load through HAProxy: $(cat "$dir/load.json")"
failed=$(field "$(cat "$dir/load.json")" '["total"]["failed"]')
[ "$failed" -eq 0 ] || fail "$failed requests failed through HAProxy"

sleep 1
kill "$events_pid"
events_pid=
python3 scripts/check-beat-singleton.py --fleet "$name" "$dir/beat-events.ndjson" \
    || fail "two beats ran at once in the fleet"

# ---- wall time: one host alone, then three at once ---------------------------
kill "$lb_pid"
lb_pid=
one=$(fleet_file one 1 1 a)
all3=$(fleet_file all3 3 3 a b c)
timed() { # LOG ARGS... -> seconds
    local log=$1 t0
    shift
    t0=$(date +%s.%N)
    deployctl "$@" >"$log" 2>&1 || fail "timed run failed: $(tail -n 20 "$log")"
    python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)"
}
token
timed "$dir/w-back.log" rollback --fleet-file "$prod" >/dev/null
token
t_one=$(timed "$dir/w-one.log" deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" --fleet-file "$one")
token
timed "$dir/w-back2.log" rollback --fleet-file "$one" >/dev/null
token
t_all=$(timed "$dir/w-all.log" deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" --fleet-file "$all3")
ratio=$(python3 -c "import sys; print(f'{float(sys.argv[2]) / float(sys.argv[1]):.2f}')" "$t_one" "$t_all")
log "wall time release 1 -> 2: one host ${t_one} s, three hosts (max_parallel 3) ${t_all} s: ${ratio}x"
echo "{\"one_host_s\": $t_one, \"three_hosts_s\": $t_all, \"ratio\": $ratio}"
log "all fleet floors met"
