#!/usr/bin/env bash
# The whole test suite, against real parts: brings the test bed up (Docker
# engine, locally built images, private registry), then runs every unit and
# integration test of the workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/testbed.sh up
cargo test --workspace --locked "$@"
