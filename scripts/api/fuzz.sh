#!/usr/bin/env bash
# Fuzzes the API from its own OpenAPI document with schemathesis (PyPI),
# against a real `deployd run` over TLS, each request with a fresh valid
# token: no answer may be a 5xx, and every answer must conform to the
# document (status, content type, headers, schema).
#
#   scripts/api/fuzz.sh [max seconds, default 120]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

max_time=${1:-120}
# More schemathesis options from the environment, e.g. ST_OPTIONS="--report ndjson".
read -r -a ST_EXTRA <<<"${ST_OPTIONS:-}"
bash scripts/testbed.sh up >&2
cargo build --locked -q -p deployd

# schemathesis in a virtualenv of its own, kept with the test bed.
venv=$(dirname "$DEPLOYD_TESTBED_ENV_FILE")/venv-schemathesis
if [ ! -x "$venv/bin/st" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==4.32.5"
fi

dir=$(mktemp -d)
trap 'agent_cleanup "$dir" shop' EXIT
port=$(agent_free_port)
agent_init "$dir" "$port"
agent_add_app "$dir" shop shop
# The fuzzer sends broken tokens on purpose: do not lock it out for them.
sed -i 's/^\[auth\]$/[auth]\nmax_failures_per_minute = 1000000/' "$dir/etc/deployd.toml"
agent_start "$dir"

DEPLOYD_BIN=$PWD/$AGENT_BIN DEPLOYD_CONFIG=$dir/etc/deployd.toml \
    PYTHONPATH=scripts/api SCHEMATHESIS_HOOKS=schemathesis_hooks \
    "$venv/bin/st" run "https://localhost:$port/openapi.json" \
    --tls-verify "$dir/etc/tls/cert.pem" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
    --max-time "$max_time" --workers 2 --request-timeout 20 "${ST_EXTRA[@]}"
