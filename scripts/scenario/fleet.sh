#!/usr/bin/env bash
# A fleet deployed as one: three deployd agents on this machine, each with
# its own state, API port, app and network, sharing one PostgreSQL and one
# Redis as one production would; each app behind its agent's switch, the
# three switches behind an HAProxy (Debian's package) that balances them.
# Only the first host runs celery beat. Continuous load through HAProxy
# (scripts/lib/http_load.py; each client pauses 20 ms between requests, so
# that the load leaves the two cores of a CI machine to the deployments)
# during:
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
# 5. beat moved from host a to host c (taken out of a's config, put in
#    c's, both agents restarted) and release 1 deployed with the hosts
#    listed c, a, b: host a goes first and stops its beat, then c starts
#    one; floors: all on release 1, beat runs on c only, 0 failed.
# Beat: never two running fleet-wide (Docker events), across every step.
# The fleet's wall time is scripts/bench/fleet.sh.
#
#   scripts/scenario/fleet.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh
. scripts/lib/fleet.sh

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    echo "installing haproxy (Debian package)" >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q haproxy >/dev/null
fi
haproxy_bin=$(command -v haproxy || echo /usr/sbin/haproxy)
field() { python3 -c "import json, sys; print(json.loads(sys.argv[1])$2)" "$1"; }

fleet_up
prod=$(fleet_file prod 1 1 a b c)
lb_port=$(agent_free_port)

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
    # Health-check verdicts and refused requests only (not every request),
    # so that a failed run says which hosts HAProxy held down and why.
    log stderr format raw local0 info
defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    option log-health-checks
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    # A check's answer goes through the switch to a gunicorn that the load
    # keeps busy: on a loaded two-core machine up to 400 ms. Left to its
    # default (the check interval), the timeout took all three hosts down
    # at once for a second, and HAProxy itself answered 503.
    timeout check 3s
    retries 3
    option redispatch
    # As a load balancer in front of agents that restart (step 5): an
    # idempotent request whose connection a stopping switch closed
    # unanswered goes to another host.
    retry-on conn-failure empty-response response-timeout
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
    "$dir/load.ndjson" "$dir/stop-load" --keep-alive 2 --fresh 2 --pause 20 &
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

# ---- 5. beat moves from host a to host c -------------------------------------
beat_of() { # HOST -> its beat section, named for HOST
    sed -n "/^\[apps\.${name}a\.services\.beat\]/,/^\[apps\.${name}a\.switch\]/p" "$dir/a/etc/deployd.toml" \
        | sed '$d' | sed "s/${name}a/${name}$1/"
}
beat_of c >"$dir/beat-c.toml"
grep -q "^command" "$dir/beat-c.toml" || fail "step 5: no beat section in host a's config"
sed -i "/^\[apps\.${name}a\.services\.beat\]/,/^\[apps\.${name}a\.switch\]/{/switch\]/!d}" "$dir/a/etc/deployd.toml"
cat "$dir/beat-c.toml" >>"$dir/c/etc/deployd.toml"
restart a
restart c
token
deployctl fleet check --fleet-file "$prod" >"$dir/check-5.txt" 2>&1 \
    || fail "step 5: fleet check refused the move: $(cat "$dir/check-5.txt")"
grep -q "moves: beat: a -> c" "$dir/check-5.txt" || fail "step 5: fleet check shows no move: $(cat "$dir/check-5.txt")"
moved=$(fleet_file moved 1 1 c a b)
token
start=$(date +%s.%N)
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" --fleet-file "$moved" >"$dir/deploy-5.log" 2>&1 \
    || fail "step 5: exit $?: $(tail -n 30 "$dir/deploy-5.log")"
phase "5 beat moves a -> c" "$start" "$(date +%s.%N)"
all_on "$DEPLOYD_TESTBED_SHA_RELEASE_1" "step 5"
grep -q "beat moves from a to c" "$dir/deploy-5.log" || fail "step 5: the move was not planned: $(head -n 20 "$dir/deploy-5.log")"
grep -q "^a .*remove:beat" "$dir/deploy-5.log" || fail "step 5: host a did not remove its beat"
[ -z "$(docker ps -q --filter "label=deployd.app=${name}a" --filter label=deployd.service=beat)" ] \
    || fail "step 5: host a still runs a beat"
[ "$(docker ps -q --filter "label=deployd.app=${name}c" --filter label=deployd.service=beat | wc -l)" -eq 1 ] \
    || fail "step 5: host c does not run one beat"
log "step 5: beat moved from host a to host c; host a went first"

sleep 2
touch "$dir/stop-load"
wait "$load_pid"
load_pid=
python3 scripts/lib/http_load.py report "$dir/load.ndjson" "$dir/phases.tsv" >"$dir/load.json"
log "load through HAProxy: $(cat "$dir/load.json")"
failed=$(field "$(cat "$dir/load.json")" '["total"]["failed"]')
if [ "$failed" -ne 0 ]; then
    echo "--- HAProxy's health-check verdicts" >&2
    grep -E "Health check|is (DOWN|UP)|no server available" "$dir/haproxy.log" | grep -v '^\[' | tail -n 40 >&2 || true
    fail "$failed requests failed through HAProxy"
fi

sleep 1
kill "$events_pid"
events_pid=
python3 scripts/check-beat-singleton.py --fleet "$name" "$dir/beat-events.ndjson" \
    || fail "two beats ran at once in the fleet"
log "all fleet floors met"
