#!/usr/bin/env bash
# The production Django recipe (README, "A production Django project"), run
# for real: the sample app with the usual production settings (HTTPS
# redirect behind a TLS proxy, manifest static files, `check --deploy
# --fail-level WARNING`) deployed with deployctl by a fresh `deployd run`.
#
#   1. the health check without the header the TLS proxy sets: the app
#      redirects it to HTTPS, and the deployment fails naming the 301;
#   2. with `health.headers`, release 1 deploys on the first try;
#   3. release 2 (one migration);
#   4. a rollback: `check` (deploy only) is skipped, and the migration that
#      stays applied is named.
#
# Everything printed is deployctl's real output.
#
#   scripts/scenario/recipe.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

agent_bed
dir=$(mktemp -d)
name=recipe$$
trap 'agent_cleanup "$dir" "$name"' EXIT
port=$(agent_free_port)
agent_init "$dir" "$port"
agent_add_app "$dir" "$name" "$name"
agent_services "$name"
config=$dir/etc/deployd.toml
headers='headers = { "X-Forwarded-Proto" = "https" }, '
grep -qF "$headers" "$config"
# As a first try would have it: no header on the health check.
sed -i "s/$headers//" "$config"
agent_start "$dir"

export DEPLOYCTL_URL=https://localhost:$port DEPLOYCTL_CA_CERT=$dir/etc/tls/cert.pem DEPLOYCTL_APP=$name
deployctl() { ./target/debug/deployctl "$@"; }
token() { agent_token "$dir" read,deploy,rollback; }

say "health check without X-Forwarded-Proto: deployctl deploy <release 1>"
set +e
DEPLOYCTL_TOKEN=$(token) deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1"
code=$?
set -e
echo "deployctl exited with $code"
[ "$code" = 3 ]

say "health.headers = { \"X-Forwarded-Proto\" = \"https\" }; deployd restarted"
kill "$AGENT_PID"
wait "$AGENT_PID" || true
sed -i "s/health = { path = \"\/healthz\/\", /health = { path = \"\/healthz\/\", $headers/" "$config"
grep -qF "$headers" "$config"
agent_start "$dir"

say "deployctl deploy <release 1>"
DEPLOYCTL_TOKEN=$(token) deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1"

say "deployctl deploy <release 2>"
DEPLOYCTL_TOKEN=$(token) deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2"

say "deployctl rollback"
DEPLOYCTL_TOKEN=$(token) deployctl rollback --reason "recipe"

say "deployctl history"
DEPLOYCTL_TOKEN=$(token) deployctl history
