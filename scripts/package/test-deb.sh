#!/usr/bin/env bash
# Builds the .deb and installs it into a clean Debian container built by the
# test bed (debootstrap, systemd installed but not running, no network):
# files, owners, modes, the deployd user, `--version`, the units verified
# by systemd-analyze, first-run setup, removal and reinstall
# (scripts/package/check-installed.sh does the checking inside).
#
#   scripts/package/test-deb.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

deb=$(bash scripts/package/deb.sh)
image=$(bash scripts/testbed.sh debian-image)
version=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "deployd"))')
echo "installing $(basename "$deb") into $image" >&2
docker run --rm --network none -e EXPECTED_VERSION="$version" \
    -v "$deb:/pkg/$(basename "$deb"):ro" \
    -v "$PWD/scripts/package/check-installed.sh:/check-installed.sh:ro" \
    "$image" bash /check-installed.sh "/pkg/$(basename "$deb")"
