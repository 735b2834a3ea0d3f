#!/usr/bin/env bash
# Deploy speed: deployd's engine next to the bare Docker operations the same
# deployment needs, run by hand in sequence, in one run (see
# agent/examples/bench_deploy.rs). Prints both medians and their ratio.
#
# With --swarm: the engine is made a single-node Swarm for the run (and
# left again if this made it), and deployd's docker backend is measured
# beside its swarm backend, a deployment of each in turn.
#
#   scripts/bench/deploy.sh [runs per side, default 5] [--swarm]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

runs=5
swarm=
for arg in "$@"; do
    case $arg in
        --swarm) swarm=--swarm ;;
        [1-9]*) runs=$arg ;;
        *) echo "usage: $0 [runs per side, at least 1] [--swarm]" >&2; exit 2 ;;
    esac
done
bash scripts/testbed.sh up
if [ -n "$swarm" ]; then
    trap 'bash scripts/testbed.sh swarm down' EXIT
    bash scripts/testbed.sh swarm up
fi
cargo run --release --locked -q -p deployd --example bench_deploy -- "$runs" $swarm
