#!/usr/bin/env bash
# The whole test suite, against real parts: brings the test bed up (Docker
# engine, locally built images, private registry), then runs every unit and
# integration test of the workspace. Meanwhile it records Docker's events
# for every beat container deployd starts, and checks at the end that no
# two beats of one app ever ran at once. Then deployd is stopped
# mid-deployment and started again (once mid-canary, under load), an
# operator works with their own key, the edge is attacked, a fleet of three
# agents is deployed as one, the Debian package is installed and run under
# systemd, the unit's exposure scored, and schemathesis fuzzes the API.
# Last, the engine is made a single-node Swarm for the swarm backend's
# tests (a swarm app's beat tasks are watched too), and left again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/testbed.sh up

events=$(mktemp)
docker events --filter type=container --filter label=deployd.service=beat \
    --format '{{json .}}' >"$events" &
watcher=$!
trap 'kill "$watcher" 2>/dev/null || true; rm -f "$events"; bash scripts/testbed.sh swarm down' EXIT

# Every test but the swarm backend's (below).
cargo test --workspace --locked "$@" -- --skip _on_swarm

# The real binary stopped (SIGTERM) mid-deployment and started again, with
# JSON logs and the plain-HTTP metrics listener (about a minute).
bash scripts/scenario/stop.sh
# The same mid-canary, under load through the switch, its socket held as
# systemd holds it: no request fails, the canary ends safely (about a
# minute).
bash scripts/scenario/canary-stop.sh

# An operator's day with their own key, then one held by ssh-agent: keygen,
# trust (SIGHUP), deploy, a manage.py command, logs, rollback, revocation
# (about a minute).
bash scripts/scenario/operator.sh >/dev/null

# The public edge and the API against slow, idle and unauthenticated floods
# (about three minutes).
bash scripts/scenario/edge.sh

# Three agents behind HAProxy deployed as one fleet: waves, a host-specific
# failure reverted fleet-wide, a fleet rollback, deployctl killed and
# resumed, beat moved from one host to another, under load (about seven
# minutes).
bash scripts/scenario/fleet.sh

# The Debian package, installed into a clean Debian image, then run by a
# real systemd with the packaged unit. Of the debug build, already made
# for the tests above (scripts/package/deb.sh alone packages a release
# build, five more minutes).
export DEPLOYD_DEB_PROFILE=${DEPLOYD_DEB_PROFILE:-dev}
bash scripts/package/test-deb.sh
bash scripts/package/test-systemd.sh
bash scripts/systemd/security.sh

# The API against its own OpenAPI document (under 2 minutes).
bash scripts/api/fuzz.sh 60

# The swarm backend's tests deploy to the engine as a single-node Swarm;
# the engine leaves it again after them (unless it was a Swarm before).
# They come last, so that the engine's iptables, which joining and leaving
# a Swarm rewrite, are as a newcomer's for everything above (about seven
# minutes).
bash scripts/testbed.sh swarm up
cargo test --workspace --locked "$@" -- _on_swarm
bash scripts/testbed.sh swarm down

# Events arrive asynchronously: give the last ones a moment.
sleep 1
kill "$watcher"
python3 scripts/check-beat-singleton.py "$events"
