#!/usr/bin/env bash
# The public edge and the API against hostile or merely slow clients, with
# the real binary: deployd started under systemd's default open-file soft
# limit (1024; the hard limit as the host has it), the sample app's two gunicorn containers (sync
# workers) behind the switch, deployd as the edge (no proxy in front).
#
# 1. Slow bodies: 8 clients POST a JSON body one byte a second to /echo/, a
#    view that reads it, for 40 s; meanwhile other clients GET /release/.
#    Floors: their p99 under 1 s, none failed, no WORKER TIMEOUT in
#    gunicorn's log. For comparison, the same against one container's own
#    address (no switch in front), as a site behind a streaming proxy sees.
# 2. Idle flood: 5,000 connections that send nothing, from 127.0.0.2 and
#    up, held open. Floors: `deployctl status` works, the site answers,
#    release 2 deploys.
# 3. Unauthenticated flood: 5,000 PATCH requests with 60 KB paths to the
#    API. Floors: the store grows by under 1 MB, 429 appears.
# 4. The audit log tampered with, in two copies of the store: the newest
#    three records deleted, and the chain rewritten from one record on with
#    every hash recomputed. Floor: `deployd audit verify` (against the head
#    file and the log's anchors) names both.
# 5. A full disk: the store lives on a 64 MiB tmpfs, filled up. Floors: a
#    change is refused with a clear error (deployctl exits 1, 507
#    store_full), status still answers, and once space is back the change
#    goes through and the store verifies.
# 6. An OIDC rule binding only `environment` is refused by check-config.
#
# Prints each phase's figures; exits non-zero if a floor is not met.
#
#   scripts/scenario/edge.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

agent_bed
command -v prlimit >/dev/null || { echo "prlimit (util-linux) is needed" >&2; exit 1; }
# Sources 127.0.0.2 and up: Linux routes all of 127.0.0.0/8 to loopback.

dir=$(mktemp -d)
name=edge$$
idler=
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
cleanup() {
    touch "$dir/stop-idle"
    [ -z "$idler" ] || wait "$idler" 2>/dev/null || true
    if [ -n "${AGENT_PID:-}" ]; then
        kill "$AGENT_PID" 2>/dev/null || true
        wait "$AGENT_PID" 2>/dev/null || true
    fi
    mountpoint -q "$dir/state" && as_root umount "$dir/state"
    AGENT_PID='' agent_cleanup "$dir" "$name"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    tail -n 20 "$dir/deployd.log" >&2 || true
    exit 1
}
log() { printf '[edge %s] %s\n' "$(date +%T)" "$*" >&2; }
clients() { python3 scripts/scenario/edge_clients.py "$@"; }
field() { python3 -c "import json, sys; print(json.loads(sys.argv[1])$2)" "$1"; }

api_port=$(agent_free_port)
public_port=$(agent_free_port)
public=127.0.0.1:$public_port
host=$DEPLOYD_TESTBED_APP_HOST
agent_init "$dir" "$api_port"
# deployd is the edge here, serving plain HTTP: no TLS redirect in the app,
# which `check --deploy` rightly refuses (security.W008), so it does not run.
AGENT_CHECK=0 agent_add_app "$dir" "$name" "$name"
cp "$DEPLOYD_TESTBED_APP_ENV" "$dir/app.env"
echo "DJANGO_SECURE_SSL_REDIRECT=false" >>"$dir/app.env"
sed -i "s|^env_file = .*|env_file = \"$dir/app.env\"|" "$dir/etc/deployd.toml"
printf '[apps.%s.switch]\nlisten = "%s"\n' "$name" "$public" >>"$dir/etc/deployd.toml"
agent_services "$name"
# The store on a small disk of its own, to be filled in phase 5.
mkdir -p "$dir/state"
as_root mount -t tmpfs -o size=64m,mode=0700 deployd-edge "$dir/state" \
    || fail "cannot mount a tmpfs for the store (phase 5 fills it); run as root or with sudo"
# Soft 1024 as systemd starts services; the hard limit stays as it is.
export AGENT_WRAP="prlimit --nofile=1024:"
agent_start "$dir"
pid=$AGENT_PID
limit=$(awk '/^Max open files/ { print $4 }' "/proc/$pid/limits")
log "deployd started with a soft limit of 1024 open files; it runs with $limit"

export DEPLOYCTL_URL=https://localhost:$api_port DEPLOYCTL_CA_CERT=$dir/etc/tls/cert.pem DEPLOYCTL_APP=$name
deployctl() {
    DEPLOYCTL_TOKEN=$(agent_token "$dir" read,deploy) ./target/debug/deployctl "$@"
}
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" >"$dir/deploy-1.log" 2>&1 \
    || fail "release 1 did not deploy: $(cat "$dir/deploy-1.log")"
log "release 1 deployed"

web_containers() { docker ps -q --filter "label=deployd.app=$name" --filter "label=deployd.service=web"; }
worker_timeouts() {
    local id n=0
    for id in $(web_containers); do
        n=$((n + $(docker logs "$id" 2>&1 | grep -c 'WORKER TIMEOUT' || true)))
    done
    echo "$n"
}

# ---- 1. slow request bodies ---------------------------------------------------
# slow_bodies TARGET KEY LABEL: tricklers and checkers against TARGET; writes
# $dir/KEY-checks.json, KEY-trickle.json and KEY-timeouts.
slow_bodies() {
    local target=$1 key=$2 label=$3 before trickled
    before=$(worker_timeouts)
    clients trickle "$target" "$host" --clients 8 --seconds 40 >"$dir/$key-trickle.json" &
    trickled=$!
    sleep 2
    clients check "$target" "$host" /release/ --seconds 36 --clients 2 >"$dir/$key-checks.json"
    wait "$trickled"
    echo $(( $(worker_timeouts) - before )) >"$dir/$key-timeouts"
    log "$label: checks $(cat "$dir/$key-checks.json"); tricklers $(cat "$dir/$key-trickle.json"); WORKER TIMEOUT lines: $(cat "$dir/$key-timeouts")"
}
slow_bodies "$public" switch "through the switch"
checks=$(cat "$dir/switch-checks.json")
p99=$(field "$checks" '["p99_ms"]')
failed=$(field "$checks" '["failed"]')
[ "$failed" -eq 0 ] || fail "through the switch, $failed checks failed while bodies trickled"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < 1000 else 1)" "$p99" \
    || fail "through the switch, p99 $p99 ms while bodies trickled (floor: under 1 s)"
[ "$(cat "$dir/switch-timeouts")" -eq 0 ] || fail "gunicorn logged WORKER TIMEOUT behind the switch"

# The same clients against one container's own address, for comparison.
container=$(web_containers | head -n 1)
container_ip=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$name\").IPAddress}}" "$container")
slow_bodies "$container_ip:8000" direct "one container directly (no switch)"

# ---- 2. idle connection flood -----------------------------------------------
log "opening 5,000 idle connections from 127.0.0.2 and up"
clients idle "$public" --count 5000 --per-source 200 --ready "$dir/idle-ready" --stop "$dir/stop-idle" \
    >"$dir/idle.json" &
idler=$!
for _ in $(seq 1 600); do [ -e "$dir/idle-ready" ] && break; sleep 0.2; done
[ -e "$dir/idle-ready" ] || fail "the idle clients did not finish connecting"
open_now=$(ls "/proc/$pid/fd" | wc -l)
started=$(date +%s%N)
deployctl status >"$dir/status.txt" 2>&1 || fail "deployctl status failed under the idle flood: $(cat "$dir/status.txt")"
status_ms=$(( ($(date +%s%N) - started) / 1000000 ))
site=$(clients check "$public" "$host" /release/ --seconds 3 --clients 1)
[ "$(field "$site" '["failed"]')" -eq 0 ] || fail "the site failed under the idle flood: $site"
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" >"$dir/deploy-2.log" 2>&1 \
    || fail "release 2 did not deploy under the idle flood: $(cat "$dir/deploy-2.log")"
touch "$dir/stop-idle"
wait "$idler"
idler=
log "idle flood: $(cat "$dir/idle.json"), deployd held $open_now files; deployctl status in $status_ms ms; site $site; release 2 deployed"
grep -q 'Too many open files' "$dir/deployd.log" && fail "deployd ran out of files"

# ---- 3. unauthenticated flood of the API --------------------------------------
store_size() { du -cb "$dir/state"/deployd.sqlite3* | tail -n 1 | cut -f1; }
before=$(store_size)
flood=$(clients flood "127.0.0.1:$api_port" --ca "$dir/etc/tls/cert.pem" --count 5000 --path-bytes 60000)
after=$(store_size)
grew=$((after - before))
log "unauthenticated flood: $flood; the store grew by $grew bytes"
[ "$(field "$flood" '["flood_statuses"].get("429", 0)')" -gt 0 ] || fail "no 429 in the flood: $flood"
[ "$grew" -lt 1000000 ] || fail "the store grew by $grew bytes (floor: under 1 MB)"

# ---- 4. the audit log tampered with --------------------------------------------
# Two copies of the store (deployd keeps running on the original), each
# tampered with as someone with write access to the database would.
tampered() {
    local copy=$dir/$1
    mkdir -p "$copy"
    python3 - "$dir/state/deployd.sqlite3" "$copy/deployd.sqlite3" <<'PY'
import sqlite3, sys
source = sqlite3.connect(sys.argv[1])
target = sqlite3.connect(sys.argv[2])
source.backup(target)
PY
    cp "$dir/state/audit-head" "$copy/"
    sed "s|^state_dir = .*|state_dir = \"$copy\"|" "$dir/etc/deployd.toml" >"$copy/deployd.toml"
}
verify_copy() {
    local code=0
    "$AGENT_BIN" audit verify --config "$dir/$1/deployd.toml" --anchors "$dir/deployd.log" \
        >"$dir/$1.out" 2>&1 || code=$?
    [ "$code" -eq 1 ] || fail "audit verify exited $code on the $1 copy: $(cat "$dir/$1.out")"
    cat "$dir/$1.out"
}
tampered truncated
python3 - "$dir/truncated/deployd.sqlite3" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("DELETE FROM audit WHERE seq > (SELECT max(seq) - 3 FROM audit)")
db.commit()
PY
truncated=$(verify_copy truncated)
grep -q 'missing: the newest records were deleted' <<<"$truncated" || fail "not named: $truncated"
log "newest three records deleted: $truncated"
tampered rewritten
python3 - "$dir/rewritten/deployd.sqlite3" <<'PY'
import hashlib, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute("SELECT seq, body, prev_hash FROM audit ORDER BY seq").fetchall()
start = len(rows) // 2
previous = rows[start][2]
for seq, body, _ in rows[start:]:
    body = body.replace('"accepted"', '"refused"')
    digest = hashlib.sha256(f"{previous}\n{seq}\n{body}".encode()).hexdigest()
    db.execute("UPDATE audit SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?", (body, previous, digest, seq))
    previous = digest
db.commit()
print(f"rewrote records {rows[start][0]}..{rows[-1][0]}", file=sys.stderr)
PY
rewritten=$(verify_copy rewritten)
grep -q 'rewritten from this record on' <<<"$rewritten" || fail "not named: $rewritten"
log "chain rewritten from one record on: $rewritten"
intact=$("$AGENT_BIN" audit verify --config "$dir/etc/deployd.toml" --anchors "$dir/deployd.log") \
    || fail "the untouched store does not verify: $intact"
log "the untouched store: $intact"

# ---- 5. a full disk --------------------------------------------------------------
admin() { DEPLOYCTL_TOKEN=$(agent_token "$dir" read,admin) ./target/debug/deployctl "$@"; }
dd if=/dev/zero of="$dir/state/filler" bs=1M count=64 2>/dev/null || true
code=0
admin lock --reason "disk full test" >"$dir/full.out" 2>&1 || code=$?
[ "$code" -eq 1 ] || fail "a change on a full disk exited $code: $(cat "$dir/full.out")"
grep -q 'state is full' "$dir/full.out" || fail "the refusal does not say the disk is full: $(cat "$dir/full.out")"
deployctl status >/dev/null || fail "status failed on a full disk"
log "disk full: deployctl lock exits $code: $(head -n 1 "$dir/full.out"); status still answers"
rm -f "$dir/state/filler"
admin lock --reason "disk space back" >/dev/null || fail "lock failed once space was back"
admin unlock >/dev/null || fail "unlock failed"
intact=$("$AGENT_BIN" audit verify --config "$dir/etc/deployd.toml" --anchors "$dir/deployd.log") \
    || fail "the store does not verify after the disk was full: $intact"
integrity=$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("PRAGMA integrity_check").fetchone()[0])' \
    "$dir/state/deployd.sqlite3")
[ "$integrity" = ok ] || fail "SQLite integrity check: $integrity"
log "space back: lock and unlock go through; $intact; SQLite integrity_check: $integrity"

# ---- 6. OIDC rules that would match everyone ----------------------------------
cp "$dir/etc/deployd.toml" "$dir/oidc.toml"
cat >>"$dir/oidc.toml" <<'EOF'
[[auth.oidc]]
name = "github"
issuer = "https://token.actions.githubusercontent.com"
jwks_url = "https://token.actions.githubusercontent.com/.well-known/jwks"
[[auth.oidc.rules]]
audience = "deployd"
claims = { environment = "production" }
apps = ["*"]
scopes = ["deploy"]
EOF
code=0
"$AGENT_BIN" check-config --config "$dir/oidc.toml" >"$dir/oidc.log" 2>&1 || code=$?
[ "$code" -ne 0 ] || fail "check-config accepted a rule binding only environment"
grep -q 'must bind the project exactly' "$dir/oidc.log" || fail "check-config did not say why: $(cat "$dir/oidc.log")"
log "an OIDC rule binding only environment: check-config exits $code: $(grep -o 'auth.oidc\[0\].rules\[0\].claims: [^(]*' "$dir/oidc.log" | head -n 1)"

log "passed"
