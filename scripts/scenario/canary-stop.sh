#!/usr/bin/env bash
# deployd restarted (SIGTERM, as `systemctl restart` sends) in the middle of
# a canary, under load through its switch, with the public socket held as
# systemd's deployd.socket holds it (scripts/lib/socket_holder.py). What a
# user sees:
#
# - while the canary runs, the load's users (each its own X-Forwarded-For)
#   are split between the running release and the canary;
# - at the restart no request fails: connections made meanwhile wait in
#   the held socket's queue;
# - the canary ends safely: from the restart on, every client is on the
#   running release; the canary's containers are drained and removed; the
#   deployment is recorded `interrupted` with an account of what runs, and
#   `deployctl deploy --canary`, following it, exits 9.
#
#   scripts/scenario/canary-stop.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

agent_bed

dir=$(mktemp -d)
name=canary$$
holder=
load=
follower=
cleanup() {
    touch "$dir/stop"
    [ -z "$load" ] || wait "$load" 2>/dev/null || true
    # The follower is a subshell running deployctl: end both.
    [ -z "$follower" ] || { pkill -P "$follower" 2>/dev/null; kill "$follower" 2>/dev/null; } || true
    if [ -n "$holder" ]; then
        kill "$holder" 2>/dev/null || true
        wait "$holder" 2>/dev/null || true
    fi
    AGENT_PID='' agent_cleanup "$dir" "$name"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    tail -n 30 "$dir/deployd.log" >&2 || true
    exit 1
}
log() { printf '[canary-stop %s] %s\n' "$(date +%T)" "$*" >&2; }
now() { date +%s.%N; }
phases=$dir/phases.tsv
# phase NAME COMMAND...: runs it and records when it ran.
phase() {
    local label=$1 start
    shift
    log "$label"
    start=$(now)
    "$@"
    printf '%s\t%s\t%s\n' "$label" "$start" "$(now)" >>"$phases"
}
settle() { sleep 5; }
# count PATTERN: lines of deployd's log that hold it.
count() { grep -c -- "$1" "$dir/deployd.log" || true; }
# wait_for PATTERN N: deployd's log holds it N times.
wait_for() {
    for _ in $(seq 1 1200); do
        [ "$(count "$1")" -ge "$2" ] && return 0
        kill -0 "$holder" 2>/dev/null || fail "the socket holder (and deployd) exited"
        sleep 0.1
    done
    fail "deployd's log never held '$1' $2 time(s)"
}

api_port=$(agent_free_port)
public_port=$(agent_free_port)
agent_init "$dir" "$api_port"
agent_add_app "$dir" "$name" "$name"
# One step long enough that only the restart ends it.
cat >>"$dir/etc/deployd.toml" <<EOF
[apps.$name.switch]
listen = "127.0.0.1:$public_port"
trust_forwarded_headers = true
[apps.$name.canary]
steps = [50]
step_time = "30m"
min_requests = 1
EOF
agent_services "$name"
python3 scripts/lib/socket_holder.py "127.0.0.1:$public_port" -- \
    "$PWD/$AGENT_BIN" --log-format json run --config "$dir/etc/deployd.toml" 2>"$dir/deployd.log" &
holder=$!
wait_for 'deployd ready' 1

export DEPLOYCTL_URL=https://localhost:$api_port DEPLOYCTL_CA_CERT=$dir/etc/tls/cert.pem DEPLOYCTL_APP=$name
deployctl() {
    DEPLOYCTL_TOKEN=$(agent_token "$dir" read,deploy,rollback) ./target/debug/deployctl "$@"
}
log "deploying release 1, before the load starts"
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" >"$dir/deploy-1.log" 2>&1 \
    || fail "release 1 did not deploy: $(cat "$dir/deploy-1.log")"

python3 scripts/lib/http_load.py run "http://127.0.0.1:$public_port/release/" "$DEPLOYD_TESTBED_APP_HOST" \
    "$dir/load.ndjson" "$dir/stop" --keep-alive 2 --fresh 2 --users 1000 &
load=$!
phase "before" settle

canary() {
    deployctl deploy --canary "$DEPLOYD_TESTBED_SHA_RELEASE_2" >"$dir/deploy-2.log" 2>&1 &
    follower=$!
    wait_for '"decision":"step"' 1
}
phase "release 2 deployed; canary step 1 begins" canary
phase "canary at 50%" settle

restart() {
    kill -HUP "$holder"
    wait_for 'deployd ready' 2
}
phase "deployd restarted mid-canary" restart
finish() {
    local code=0
    wait "$follower" || code=$?
    follower=
    [ "$code" -eq 9 ] || fail "deployctl deploy --canary exited $code, not 9: $(cat "$dir/deploy-2.log")"
}
phase "deployctl follows it to its end" finish
phase "after" settle
touch "$dir/stop"
wait "$load"
load=

python3 scripts/lib/http_load.py report "$dir/load.ndjson" "$phases" >"$dir/report.json"
python3 scripts/lib/http_load.py table "deployd restarted mid-canary (GET /release/, 1,000 users)" \
    "$dir/report.json" >&2
deployctl --json history --limit 1 >"$dir/history.json"
deployctl --json status >"$dir/status.json"
python3 - "$dir/report.json" "$dir/history.json" "$dir/status.json" \
    "$DEPLOYD_TESTBED_SHA_RELEASE_1" "$DEPLOYD_TESTBED_SHA_RELEASE_2" <<'EOF'
import json
import sys

report, history, status = (json.load(open(p)) for p in sys.argv[1:4])
one, two = sys.argv[4], sys.argv[5]
phases = {p["phase"]: p for p in report["phases"]}
failed = report["total"]["failed"]
assert failed == 0, f"{failed} request(s) failed: {report}"

served = lambda phase: phases[phase]["served"]
# The sample app's served_by is "<release>@<host>": the release is the
# test bed's name for it, which the sha's tag names too.
split = served("canary at 50%")
assert len(split) == 2, f"the canary step was not split between two releases: {split}"
after = served("after")
# The sample app names its release "<number>/<variant>": 1/good.
assert list(after) == ["1/good"], f"after the restart, not every client was on release 1: {after}"
print(f"[canary-stop] during the canary: {split}; after the restart: {after}", file=sys.stderr)

last = history["deployments"][0]
assert last["sha"] == two and last["state"] == "interrupted", last
assert "its canary ended" in (last.get("error") or ""), last
print(f"[canary-stop] deployment {last['id']}: {last['state']}: {last.get('error')}", file=sys.stderr)

services = status["services"]
releases = {c["sha"] for s in services for c in s["containers"]}
assert releases == {one}, f"services do not all run release 1 again: {status}"
down = [c for s in services for c in s["containers"]
        if c["state"] != "running" or (c.get("health") or "healthy") != "healthy"]
assert not down, down
print(f"[canary-stop] every service runs release 1 again ({one[:12]}); "
      f"{report['total']['requests']} requests, 0 failed", file=sys.stderr)
EOF
log "passed"
