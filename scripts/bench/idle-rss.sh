#!/usr/bin/env bash
# Idle memory of the agent: starts a release build of `deployd run` with the
# example configuration (state in a temporary directory), waits until it is
# ready, lets it idle, then prints its resident set size. Floor: 30 MB.
#
#   scripts/bench/idle-rss.sh [idle seconds, default 10]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

idle=${1:-10}
cargo build --release --locked -q -p deployd
state=$(mktemp -d)
log=$state/deployd.log
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$state"' EXIT

DEPLOYD__STATE_DIR=$state ./target/release/deployd run --config agent/deployd.example.toml 2>"$log" &
pid=$!
for _ in $(seq 1 100); do
    grep -q 'deployd ready' "$log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
done
grep -q 'deployd ready' "$log" || { cat "$log" >&2; echo "deployd did not get ready" >&2; exit 1; }
sleep "$idle"
rss_kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
echo "deployd idle RSS after ${idle} s: $((rss_kb / 1024)) MiB ($rss_kb kB); floor 30 MB"
[ "$rss_kb" -le $((30 * 1000)) ]
