#!/usr/bin/env bash
# Builds the Debian package: release binaries of deployd and deployctl, their
# man pages and deployctl's bash completion, then `cargo deb` (installed from
# crates.io when missing). Prints the .deb's path.
#
#   scripts/package/deb.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb (crates.io, about a minute)" >&2
    cargo install --locked --quiet cargo-deb >&2
fi
cargo build --release --locked --quiet -p deployd -p deployctl >&2
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p "$target/release/man"
"$target/release/deployd" manpage >"$target/release/man/deployd.8"
"$target/release/deployctl" manpage >"$target/release/man/deployctl.1"
"$target/release/deployctl" completions bash >"$target/release/man/deployctl.bash"
cargo deb --quiet --no-build --strip -p deployd --output "$target/debian" | tail -n 1
