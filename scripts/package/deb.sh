#!/usr/bin/env bash
# Builds the Debian package: release binaries of deployd and deployctl, their
# man pages and deployctl's bash completion, then `cargo deb` (installed from
# crates.io when missing). Prints the .deb's path. DEPLOYD_DEB_PROFILE=dev
# packages the debug build instead: the test suite does, to check the
# package without a release build's five minutes on two cores.
#
#   scripts/package/deb.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb (crates.io, about a minute)" >&2
    cargo install --locked --quiet cargo-deb >&2
fi
profile=${DEPLOYD_DEB_PROFILE:-release}
case $profile in
    release) built=release ;;
    dev) built=debug ;;
    *) echo "DEPLOYD_DEB_PROFILE is release or dev, not $profile" >&2; exit 2 ;;
esac
cargo build --profile "$profile" --locked --quiet -p deployd -p deployctl >&2
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p "$target/$built/man"
"$target/$built/deployd" manpage >"$target/$built/man/deployd.8"
"$target/$built/deployctl" manpage >"$target/$built/man/deployctl.1"
"$target/$built/deployctl" completions bash >"$target/$built/man/deployctl.bash"
cargo deb --quiet --no-build --profile "$profile" --strip -p deployd --output "$target/debian" | tail -n 1
