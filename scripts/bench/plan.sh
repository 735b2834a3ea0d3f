#!/usr/bin/env bash
# What the migration plan adds to a deployment with no migrations to apply:
# the same engine with and without `[migrations]`, in one run (see
# agent/examples/bench_plan.rs). Prints both medians, their difference and
# the plan step's own median.
#
#   scripts/bench/plan.sh [runs per side, default 6]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

bash scripts/testbed.sh up
cargo run --release --locked -q -p deployd --example bench_plan -- "${1:-6}"
