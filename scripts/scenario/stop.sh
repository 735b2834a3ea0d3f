#!/usr/bin/env bash
# deployd stopped (SIGTERM, as `systemctl stop` sends) while a deployment
# rolls the services, then started again. What a user sees:
#
# - deployd exits 0 at once: the deployment starts no further step, the
#   step under way is cut, the event stream ends;
# - `deployctl deploy`, following it, waits for deployd to come back and
#   exits 9 (interrupted);
# - at the next start, before it reports ready, deployd reconciles: the
#   deployment is recorded `interrupted`, with an account of what runs, and
#   every service of the app runs one release again, healthy;
# - every log line is JSON (`--log-format json`), and those of the
#   deployment carry its id;
# - the plain-HTTP metrics listener ([metrics] listen) counts the
#   interruption, and promtool parses its output.
#
#   scripts/scenario/stop.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

agent_bed

dir=$(mktemp -d)
name=stop$$
follower=
cleanup() {
    # The follower is a subshell running deployctl: end both.
    [ -z "$follower" ] || { pkill -P "$follower" 2>/dev/null; kill "$follower" 2>/dev/null; } || true
    agent_cleanup "$dir" "$name"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    tail -n 30 "$dir/deployd.log" >&2 || true
    exit 1
}
log() { printf '[stop %s] %s\n' "$(date +%T)" "$*" >&2; }

api_port=$(agent_free_port)
agent_init "$dir" "$api_port"
agent_services "$name"
agent_add_app "$dir" "$name" "$name"
metrics_port=$(agent_free_port)
printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$metrics_port" >>"$dir/etc/deployd.toml"
export AGENT_ARGS="--log-format json"
agent_start "$dir"

export DEPLOYCTL_URL=https://localhost:$api_port DEPLOYCTL_CA_CERT=$dir/etc/tls/cert.pem DEPLOYCTL_APP=$name
# A token makes one change: one per command, as each CI job has its own.
deployctl() {
    DEPLOYCTL_TOKEN=$(agent_token "$dir" read,deploy,rollback) ./target/debug/deployctl "$@"
}
log "deploying release 1"
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" >"$dir/deploy-1.log" 2>&1 \
    || fail "release 1 did not deploy: $(cat "$dir/deploy-1.log")"

log "deploying release 2; SIGTERM once it rolls the services"
rolls() { grep -c '"message":"step started","step":"roll:' "$dir/deployd.log" || true; }
rolled=$(rolls)
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" >"$dir/deploy-2.log" 2>&1 &
follower=$!
rolling=
for _ in $(seq 1 1200); do
    if [ "$(rolls)" -gt "$rolled" ]; then
        rolling=yes
        break
    fi
    sleep 0.1
done
[ -n "$rolling" ] || fail "the roll step never started"
sleep 1
stop_started=$(date +%s.%N)
kill -TERM "$AGENT_PID"
code=0
wait "$AGENT_PID" || code=$?
AGENT_PID=
stop_took=$(echo "$(date +%s.%N) - $stop_started" | bc)
[ "$code" -eq 0 ] || fail "deployd exited $code on SIGTERM"
log "deployd exited 0, ${stop_took}s after SIGTERM"
kill -0 "$follower" 2>/dev/null || fail "deployctl gave up while deployd was down: $(cat "$dir/deploy-2.log")"

log "starting deployd again (deployctl deploy still follows)"
agent_start "$dir"
follow_code=0
wait "$follower" || follow_code=$?
follower=
log "deployctl deploy exited $follow_code"
[ "$follow_code" -eq 9 ] || fail "deployctl deploy exited $follow_code, not 9: $(cat "$dir/deploy-2.log")"
deployctl --json history --limit 1 >"$dir/history.json"
python3 - "$dir/history.json" "$dir/deployd.log" <<'EOF'
import json
import sys

last = json.load(open(sys.argv[1]))["deployments"][0]
assert last["state"] == "interrupted", last
print(f"[stop] deployment {last['id']}: {last['state']}: {last.get('error')}", file=sys.stderr)

lines = open(sys.argv[2]).read().splitlines()
records = [json.loads(line) for line in lines]  # every line is JSON
mine = [r for r in records if (r.get("span") or {}).get("deployment.id") == last["id"]]
steps = [r["fields"]["step"] for r in mine if r["fields"].get("message") == "step started"]
assert "pull" in steps and any(s.startswith("roll:") for s in steps), steps
recovered = [r for r in mine if r["fields"].get("message") == "recovered"]
assert recovered, "no 'recovered' line in the deployment's span"
print(f"[stop] {len(records)} JSON log lines; {len(mine)} carry the deployment's id "
      f"(steps {', '.join(steps)}; recovered at restart)", file=sys.stderr)
EOF

deployctl --json status >"$dir/status.json"
python3 - "$dir/status.json" <<'EOF'
import json
import sys

status = json.load(open(sys.argv[1]))
services = status["services"]
releases = {c["sha"] for s in services for c in s["containers"]}
assert len(releases) == 1, f"services run several releases: {status}"
down = [c for s in services for c in s["containers"]
        if c["state"] != "running" or (c.get("health") or "healthy") != "healthy"]
assert not down, down
print(f"[stop] every service runs one release: {releases.pop()[:12]}", file=sys.stderr)
EOF
# The metrics, in plain HTTP on [metrics] listen, without a token.
curl -fsS "http://127.0.0.1:$metrics_port/metrics" >"$dir/metrics.txt"
for line in \
    "deployd_deployments_total{app=\"$name\",kind=\"deploy\",outcome=\"interrupted\"} 1" \
    "deployd_release_info{app=\"$name\",service=\"web\"," \
    'deployd_ready{check="docker"} 1'; do
    grep -qF "$line" "$dir/metrics.txt" || fail "metrics lack: $line"
done
log "metrics on [metrics] listen: the interruption counted, the live release shown"
bash scripts/metrics/check.sh "$dir/metrics.txt" >&2
log "passed"
