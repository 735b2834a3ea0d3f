#!/usr/bin/env bash
# The one-command demo: on a fresh machine, brings the test bed up, sets up
# a host with `deployd init` (self-signed TLS certificate, signing key),
# starts `deployd run`, and with `deployctl` deploys release 1, then
# release 2 while status is checked every second, then a broken release
# (its worker crashes) that is rolled back automatically; then shows the
# history and the status. Everything printed is deployctl's real output.
# Cleans up after itself (Ctrl-C included).
#
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/agent.sh

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

agent_bed
started=$(date +%s)

dir=$(mktemp -d)
name=demo$$
checker=
trap '[ -z "$checker" ] || kill "$checker" 2>/dev/null || true; agent_cleanup "$dir" "$name"' EXIT
port=$(agent_free_port)
say "a new host: deployd init"
agent_init "$dir" "$port"
cat "$dir/init.txt"
agent_add_app "$dir" "$name" "$name"
sed -i 's/^verify = "5s"$/verify = "3s"/' "$dir/etc/deployd.toml"
agent_services "$name"
agent_start "$dir"

export DEPLOYCTL_URL=https://localhost:$port DEPLOYCTL_CA_CERT=$dir/etc/tls/cert.pem DEPLOYCTL_APP=$name
deployctl() { ./target/debug/deployctl "$@"; }
# A token per change: deployd spends a token's id on the change it makes.
token() { agent_token "$dir" read,deploy,rollback; }

say "deployctl deploy <release 1>"
DEPLOYCTL_TOKEN=$(token) deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" --reason "first release"

say "deployctl deploy <release 2>, while status is checked every second"
status_log=$dir/status.log
(
    set +e
    export DEPLOYCTL_TOKEN
    DEPLOYCTL_TOKEN=$(token)
    while true; do
        if deployctl status --json >"$dir/status.json" 2>/dev/null; then
            python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); web=[c for v in s["services"] if v["name"]=="web" for c in v["containers"] if c["state"]=="running"]; print(sum(c.get("health")=="healthy" for c in web))' "$dir/status.json" >>"$status_log"
        else
            echo fail >>"$status_log"
        fi
        sleep 1
    done
) &
checker=$!
DEPLOYCTL_TOKEN=$(token) deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" --reason "release 2"
kill "$checker" 2>/dev/null || true
wait "$checker" 2>/dev/null || true
checker=
checks=$(wc -l <"$status_log")
failures=$(grep -c fail "$status_log" || true)
no_healthy_web=$(grep -cx 0 "$status_log" || true)
echo "status checks during the deployment: $checks, failed: $failures, with no healthy web container: $no_healthy_web"

say "deployctl deploy <a release whose worker crashes>: rolled back automatically"
set +e
DEPLOYCTL_TOKEN=$(token) deployctl deploy "$DEPLOYD_TESTBED_SHA_WORKER_CRASH" --reason "broken worker"
code=$?
set -e
echo "deployctl exited with $code (4: rolled back)"
[ "$code" = 4 ]

say "deployctl history"
DEPLOYCTL_TOKEN=$(token) deployctl history
say "deployctl status"
DEPLOYCTL_TOKEN=$(token) deployctl status

say "done in $(($(date +%s) - started)) s (after the build); cleaning up"
