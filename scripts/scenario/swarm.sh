#!/usr/bin/env bash
# Availability under continuous load on deployd's swarm backend.
#
# The engine is made a single-node Swarm for the run (and left again if this
# made it). The sample app runs as Swarm services on an attachable overlay
# network, PostgreSQL and Redis on it as containers. Swarm's routing mesh
# needs the kernel's IPVS, which the test machines lack (see README, "Moving
# to Docker Swarm"); in its place, Debian's HAProxy runs in a container on
# the overlay network, reached on a loopback port, and balances
# `tasks.<app>_web`: the web tasks Swarm's DNS lists, which are the tasks
# Swarm holds running and healthy, re-read every second. HAProxy runs no
# health check of its own: which tasks get traffic is Swarm's decision, as
# with the mesh. It retries a request whose connection failed on another
# task (`retries 3`, `option redispatch`, `retry-on conn-failure
# empty-response`); with --no-retry it does not (`retries 0`), to measure
# what that costs.
#
# With --nodes 2, the Swarm has a second node (scripts/testbed.sh swarm up
# --nodes 2: an engine in a container). Swarm spreads the web tasks it
# creates over both nodes; the scenario shows it (deployctl status, then
# which node's task answered each of 40 requests for the home page through
# HAProxy: both must, so each node's static volume must hold the release's
# files, which collectstatic, a job on every node, wrote; then deployctl
# logs --service web, which must show each task's lines) and shows again where the tasks ended after the rollbacks, which
# Swarm does not spread again (see README, "Moving to Docker Swarm").
#
# Load: scripts/lib/http_load.py, 2 keep-alive clients and 2 clients opening
# a new connection per request, looping on GET /release/ (which release
# answered). Under load: release 1 -> release 2 (deployctl deploy), a
# release whose health check fails after 5 answers (rolled back
# automatically), then deployctl rollback.
#
# Prints requests and failed requests per phase, which releases served
# them, and what the automatic rollback was for; exits non-zero if a
# deployment ended with another exit code than the docker backend's, or
# (without --no-retry) if any request failed.
#
#   scripts/scenario/swarm.sh [--no-retry] [--nodes 2]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

retry="retries 3
    option redispatch
    retry-on conn-failure empty-response"
retries="retries 3"
nodes=1
nodes_said="one node"
while [ $# -gt 0 ]; do
    case $1 in
        --no-retry) retry="retries 0"; retries="no retries" ;;
        --nodes) [[ ${2:-} =~ ^[12]$ ]] || { echo "usage: $0 [--no-retry] [--nodes 1|2]" >&2; exit 2; }
            nodes=$2; [ "$nodes" = 1 ] || nodes_said="two nodes"; shift ;;
        *) echo "usage: $0 [--no-retry] [--nodes 1|2]" >&2; exit 2 ;;
    esac
    shift
done
agent_bed
haproxy_image=$(bash scripts/testbed.sh haproxy-image)

dir=$(mktemp -d)
name=swarm$$
load=
lb=
# Every step of the cleanup runs, whatever an earlier one said: the engine
# must leave the Swarm this made.
cleanup() {
    set +e
    touch "$dir/stop"
    [ -z "$load" ] || wait "$load" 2>/dev/null || true
    [ -z "$lb" ] || docker rm -f "$lb" >/dev/null 2>&1 || true
    agent_cleanup "$dir" "$name"
    bash scripts/testbed.sh swarm down
}
trap cleanup EXIT
bash scripts/testbed.sh swarm up --nodes "$nodes"
say() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
now() { date +%s.%N; }
phases=$dir/phases.tsv
# phase NAME COMMAND...: runs it, records when it ran, returns its status.
phase() {
    local label=$1 start rc=0
    shift
    say "$label"
    start=$(now)
    "$@" || rc=$?
    printf '%s\t%s\t%s\n' "$label" "$start" "$(now)" >>"$phases"
    return "$rc"
}
settle() { sleep 5; }

api_port=$(agent_free_port)
lb_port=$(agent_free_port)
agent_init "$dir" "$api_port"
AGENT_BACKEND=swarm agent_add_app "$dir" "$name" "$name"
agent_services "$name" overlay
agent_start "$dir"
export DEPLOYCTL_URL=https://localhost:$api_port DEPLOYCTL_CA_CERT=$dir/etc/tls/cert.pem DEPLOYCTL_APP=$name
deployctl() {
    DEPLOYCTL_TOKEN=$(agent_token "$dir" read,deploy,rollback) ./target/debug/deployctl "$@" \
        >>"$dir/deployctl.log" 2>&1
}
# exits CODE COMMAND...: the command exits CODE (0 deployed, 4 rolled back).
exits() {
    local want=$1 code=0
    shift
    "$@" || code=$?
    [ "$code" = "$want" ] && return 0
    echo "$* exited $code, not $want; deployctl said:" >&2
    tail -n 30 "$dir/deployctl.log" >&2
    return 1
}

say "release 1, before the load starts"
exits 0 deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1"

cat >"$dir/haproxy.cfg" <<EOF
global
    maxconn 1000
    # Refused requests only, so that a failed run says what went wrong.
    log stderr format raw local0 info
resolvers swarm
    # The engine's DNS on every overlay network: tasks.<service> lists the
    # service's running tasks.
    nameserver engine 127.0.0.11:53
    hold valid 1s
    hold obsolete 0s
    timeout resolve 1s
defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    $retry
    option http-server-close
frontend site
    bind :8080
    default_backend web
backend web
    balance roundrobin
    server-template task 4 tasks.${name}_web:8000 resolvers swarm init-addr none
EOF
lb=$(docker run -d --label "deployd.script=$name" --network "$name" -p "127.0.0.1:$lb_port:8080" \
    -v "$dir/haproxy.cfg:/etc/haproxy/haproxy.cfg:ro" "$haproxy_image" \
    haproxy -f /etc/haproxy/haproxy.cfg -db)
# HAProxy's log, timed: which tasks Swarm's DNS listed when, and every
# request refused.
lb_log() { docker logs -t "$lb" 2>&1 | grep -v '^[^ ]* \[WARNING\]' | grep -v ' 200 [0-9]* - - ' || true; }
# HAProxy answers once it resolved the tasks.
answered=
for _ in $(seq 1 240); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $DEPLOYD_TESTBED_APP_HOST" \
        -H 'X-Forwarded-Proto: https' "http://127.0.0.1:$lb_port/release/" || true)" = 200 ]; then
        answered=1
        break
    fi
    sleep 0.5
done
if [ -z "$answered" ]; then
    echo "HAProxy did not answer 200 through tasks.${name}_web within 2 minutes; it logged:" >&2
    lb_log | tail -n 20 >&2
    exit 1
fi

# The node each web task runs on, by its container's hostname (the short
# container id, which the sample app names in served_by); then which node
# answered each of 40 requests for the home page (a page using static
# files). With --both, fails unless both did.
spread() {
    say "where the web tasks run"
    DEPLOYCTL_TOKEN=$(agent_token "$dir" read) ./target/debug/deployctl status >&2
    declare -A node_of=() answered=()
    local task cid node served
    for task in $(docker service ps -q --filter desired-state=running "${name}_web"); do
        read -r cid node < <(docker inspect -f '{{.Status.ContainerStatus.ContainerID}} {{.NodeID}}' "$task") || continue
        [ -n "$cid" ] || continue
        node_of[${cid:0:12}]=$(docker node inspect -f '{{.Description.Hostname}}' "$node")
    done
    for _ in $(seq 1 40); do
        # The home page: its stylesheet's name comes from the static files'
        # manifest, which collectstatic wrote into the node's own volume.
        served=$(curl -s -H "Host: $DEPLOYD_TESTBED_APP_HOST" -H 'X-Forwarded-Proto: https' \
            "http://127.0.0.1:$lb_port/" | sed -n 's|.*Served by <code>[^@]*@\([0-9a-f]*\)</code>.*|\1|p')
        node="no task (the page failed)"
        [ -z "$served" ] || node=${node_of[$served]:-"an unknown task"}
        answered[$node]=$(( ${answered[$node]:-0} + 1 ))
    done
    for node in "${!answered[@]}"; do echo "home page requests answered on $node: ${answered[$node]} of 40" >&2; done
    if [ "${1:-}" = --both ] && { [ "${#answered[@]}" != 2 ] || [ -n "${answered[no task (the page failed)]:-}" ] \
        || [ -n "${answered[an unknown task]:-}" ]; }; then
        echo "the home page was not answered from both nodes" >&2
        return 1
    fi
    # deployctl logs reads each task through the manager, wherever it runs.
    local logs
    logs=$(DEPLOYCTL_TOKEN=$(agent_token "$dir" logs) ./target/debug/deployctl logs --service web --tail 2)
    for node in "${node_of[@]}"; do
        if grep -q "${name}_web\.[0-9]* on $node" <<<"$logs"; then
            echo "deployctl logs --service web: lines of the task on $node" >&2
        else
            echo "deployctl logs --service web showed no line of the task on $node:" >&2
            echo "$logs" >&2
            return 1
        fi
    done
}
[ "$nodes" = 1 ] || spread --both

python3 scripts/lib/http_load.py run "http://127.0.0.1:$lb_port/release/" "$DEPLOYD_TESTBED_APP_HOST" \
    "$dir/load.ndjson" "$dir/stop" --keep-alive 2 --fresh 2 &
load=$!
code=0
phase "before" settle
phase "deploy 1 -> 2" exits 0 deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" || code=1
phase "after" settle
phase "health failing after 5 answers, rolled back" \
    exits 4 deployctl deploy "$DEPLOYD_TESTBED_SHA_UNHEALTHY_AFTER_5_CHECKS" || code=1
phase "after" settle
phase "deployctl rollback (-> 1)" exits 0 deployctl rollback || code=1
phase "after" settle
touch "$dir/stop"
wait "$load"
load=
[ "$nodes" = 1 ] || spread

python3 scripts/lib/http_load.py report "$dir/load.ndjson" "$phases" >"$dir/report.json"
python3 scripts/lib/http_load.py table "deployd, swarm backend ($nodes_said), through HAProxy on the overlay network ($retries)" \
    "$dir/report.json"
# What the automatic rollback was for, in deployd's words.
grep -m1 '^deployment .* rolled_back: ' "$dir/deployctl.log" || true
if [ "$retries" = "no retries" ]; then
    lb_log | tail -n 30 >&2
elif ! python3 -c '
import json, sys
sys.exit(1 if any(p["failed"] for p in json.load(open(sys.argv[1]))["phases"]) else 0)
' "$dir/report.json"; then
    echo "requests failed; HAProxy logged:" >&2
    lb_log | tail -n 40 >&2
    code=1
fi
exit "$code"
