#!/usr/bin/env bash
# Load on the API while a deployment runs: a release build of `deployd run`
# (fresh `deployd init` host, the test bed's app with its PostgreSQL and
# Redis) deploys release 1; then, three rounds, each a deployment (release
# 2, 1, 2) during which 200 clients, connected first, read the app's status
# for 10 s, each every 100 ms (2,000 requests a second offered: latency is
# the agent's own), then back to back for 10 s (the most it serves while a
# deployment runs; latency there is mostly the queue of 200 clients). The
# deployment's own containers compete for the same cores, so rounds vary:
# the floor is on their median. Floors: zero errors; median p99 of the
# paced load under 20 ms. Prints every round's p50/p99.
#
#   scripts/api/load.sh [clients, default 200] [seconds, default 10] [period ms, default 100]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# LOAD_AGENT_BIN: another deployd binary to compare, e.g. one built from an older commit.
AGENT_BIN=${LOAD_AGENT_BIN:-target/release/deployd}
. scripts/lib/agent.sh

clients=${1:-200}
seconds=${2:-10}
period=${3:-100}
bash scripts/testbed.sh up >&2
# Apart: an example takes the dev-dependencies, and with them the test
# kit's feature, which the measured binary must not have.
cargo build --release --locked -q -p deployd --bin deployd
cargo build --release --locked -q -p deployd --example load_status
. "$DEPLOYD_TESTBED_ENV_FILE"

dir=$(mktemp -d)
name=load$$
trap 'agent_cleanup "$dir" "$name"' EXIT
port=$(agent_free_port)
agent_init "$dir" "$port"
agent_add_app "$dir" "$name" "$name"
agent_services "$name"
agent_start "$dir"
url=https://localhost:$port
ca=$dir/etc/tls/cert.pem

# Each change gets a token of its own (a token's id is spent by its change).
deploy() {
    curl -sS --fail-with-body --cacert "$ca" -H "Authorization: Bearer $(agent_token "$dir" deploy,read)" \
        -H 'content-type: application/json' -d "{\"sha\": \"$1\"}" "$url/v1/apps/$name/deployments" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])'
}
wait_for() {
    local token state
    token=$(agent_token "$dir" read)
    for _ in $(seq 1 600); do
        state=$(curl -sS --cacert "$ca" -H "Authorization: Bearer $token" "$url/v1/deployments/$1" |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])')
        case $state in queued | running) sleep 0.5 ;; *) echo "$state"; return ;; esac
    done
    echo timeout
}

first=$(deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1")
echo "release 1: $(wait_for "$first")"
token=$(agent_token "$dir" read)
: >"$dir/p99s"
for round in 1 2 3; do
    case $round in 2) sha=$DEPLOYD_TESTBED_SHA_RELEASE_1 ;; *) sha=$DEPLOYD_TESTBED_SHA_RELEASE_2 ;; esac
    id=$(deploy "$sha")
    echo "round $round: a deployment started; $clients clients read status, each every $period ms, for $seconds s"
    ./target/release/examples/load_status "$url" "$ca" "$token" "$name" "$clients" "$seconds" "$period" \
        | tee "$dir/paced.txt"
    sed -n 's/.*p99 \([0-9.]*\) ms.*/\1/p' "$dir/paced.txt" >>"$dir/p99s"
    echo "round $round: then back to back for $seconds s"
    ./target/release/examples/load_status "$url" "$ca" "$token" "$name" "$clients" "$seconds"
    state=$(wait_for "$id")
    echo "round $round: the deployment $state"
    [ "$state" = succeeded ] || { echo "FAIL: the deployment under load ended $state" >&2; exit 1; }
done
median=$(sort -n "$dir/p99s" | sed -n 2p)
echo "paced p99 per round: $(paste -sd' ' "$dir/p99s") ms; median $median ms"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < 20 else 1)" "$median" \
    || { echo "FAIL: median p99 $median ms with each client every $period ms (floor: under 20 ms)" >&2; exit 1; }
