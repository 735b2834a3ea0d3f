#!/usr/bin/env bash
# Idle memory of the agent: a release build of `deployd run` on a fresh
# `deployd init` host with the test bed's sample app configured (the HTTPS
# API listening, the engine reconciled), left idle, then its resident set
# size. Floor: 30 MB.
#
#   scripts/bench/idle-rss.sh [idle seconds, default 10]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
AGENT_BIN=target/release/deployd
. scripts/lib/agent.sh

idle=${1:-10}
bash scripts/testbed.sh up >&2
cargo build --release --locked -q -p deployd --bin deployd
dir=$(mktemp -d)
trap 'agent_cleanup "$dir"' EXIT
agent_init "$dir" "$(agent_free_port)"
agent_add_app "$dir" shop shop
agent_start "$dir"
sleep "$idle"
rss_kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$AGENT_PID/status")
echo "deployd idle RSS after ${idle} s: $((rss_kb / 1024)) MiB ($rss_kb kB); floor 30 MB"
[ "$rss_kb" -le $((30 * 1000)) ]
