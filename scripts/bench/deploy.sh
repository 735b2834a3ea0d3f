#!/usr/bin/env bash
# Deploy speed: deployd's engine next to the bare Docker operations the same
# deployment needs, run by hand in sequence, in one run (see
# agent/examples/bench_deploy.rs). Prints both medians and their ratio.
#
#   scripts/bench/deploy.sh [runs per side, default 5]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

bash scripts/testbed.sh up
cargo run --release --locked -q -p deployd --example bench_deploy -- "${1:-5}"
