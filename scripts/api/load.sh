#!/usr/bin/env bash
# Load on the API while a deployment runs: a release build of `deployd run`
# (fresh `deployd init` host, the test bed's app with its PostgreSQL and
# Redis) deploys release 1, then release 2; as release 2 starts, 200 clients
# read the app's status for 10 s. Floor: zero errors. Prints p50/p99.
#
#   scripts/api/load.sh [clients, default 200] [seconds, default 10]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
AGENT_BIN=target/release/deployd
. scripts/lib/agent.sh

clients=${1:-200}
seconds=${2:-10}
bash scripts/testbed.sh up >&2
cargo build --release --locked -q -p deployd --bin deployd --example load_status
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
second=$(deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2")
echo "release 2 started; $clients clients read status for $seconds s"
./target/release/examples/load_status "$url" "$ca" "$(agent_token "$dir" read)" "$name" "$clients" "$seconds"
echo "release 2: $(wait_for "$second")"
