#!/usr/bin/env bash
# Runs inside a clean Debian container (scripts/package/test-deb.sh): installs
# the package, checks what it put where with which owner and mode, runs the
# binaries, verifies the units, sets up a host as README's operations
# section says, then removes and reinstalls the package.
#
#   check-installed.sh DEB
set -euo pipefail
deb=$1
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok: $*"; }

# owner:group mode of a path, as stat prints them.
expect_mode() {
    local path=$1 want=$2 got
    got=$(stat -c '%U:%G %a' "$path") || fail "$path is missing"
    [ "$got" = "$want" ] || fail "$path is $got, not $want"
}

dpkg -i "$deb" >/dev/null
ok "dpkg -i $(basename "$deb")"

for entry in \
    "/usr/bin/deployd root:root 755" \
    "/usr/bin/deployctl root:root 755" \
    "/lib/systemd/system/deployd.service root:root 644" \
    "/lib/systemd/system/deployd.socket root:root 644" \
    "/usr/lib/sysusers.d/deployd.conf root:root 644" \
    "/usr/lib/tmpfiles.d/deployd.conf root:root 644" \
    "/usr/share/man/man8/deployd.8 root:root 644" \
    "/usr/share/man/man1/deployctl.1 root:root 644" \
    "/usr/share/bash-completion/completions/deployctl root:root 644" \
    "/usr/share/doc/deployd/deployd.example.toml root:root 644" \
    "/usr/share/doc/deployd/alerts.yml root:root 644" \
    "/usr/share/doc/deployd/README.md root:root 644" \
    "/etc/deployd root:root 755" \
    "/etc/deployd/tls root:root 755" \
    "/etc/deployd/keys root:root 755" \
    "/etc/deployd/secrets root:root 700"; do
    read -r path owner mode <<<"$entry"
    expect_mode "$path" "$owner $mode"
done
ok "files, owners and modes"

IFS=: read -r _ _ uid _ _ home shell <<<"$(getent passwd deployd)" || fail "no deployd user"
[ "$uid" -lt 1000 ] || fail "deployd is not a system user (uid $uid)"
[ "$home" = /var/lib/deployd ] || fail "deployd's home is $home"
case $shell in */nologin) ;; *) fail "deployd's shell is $shell" ;; esac
ok "system user deployd (uid $uid, home $home, shell $shell)"

version=$(deployd --version)
[ "$version" = "deployd $EXPECTED_VERSION" ] || fail "deployd --version: $version"
ctl_version=$(deployctl --version)
[ "$ctl_version" = "deployctl $EXPECTED_VERSION" ] || fail "deployctl --version: $ctl_version"
ok "$version, $ctl_version"
deployd --help | grep -q 'check-config' || fail "deployd --help lacks check-config"
grep -q '^\.TH deployd 8' /usr/share/man/man8/deployd.8 || fail "deployd.8 is no section 8 page"
deployd default-config | cmp -s - /usr/share/doc/deployd/deployd.example.toml \
    || fail "default-config differs from the packaged example"
ok "--help, man pages, default-config"

# systemd is installed here (not running): the units load as systemd reads them.
# --man=no: man-db is not installed here (the page is checked above).
systemd-analyze verify --man=no /lib/systemd/system/deployd.socket /lib/systemd/system/deployd.service
ok "systemd-analyze verify"
systemd-analyze security --offline=true /lib/systemd/system/deployd.service | tail -n 1

# First run, as README's operations section does it.
deployd init --san deploy-1.example.com --san 127.0.0.1 --credentials-dir >/root/init.txt
grep -q 'SHA-256 fingerprint' /root/init.txt || fail "init printed no fingerprint"
expect_mode /etc/deployd/deployd.toml "root:root 600"
expect_mode /etc/deployd/tls/key.pem "root:root 600"
expect_mode /etc/deployd/keys/ops.key "root:root 600"
grep -q 'tls_key = "/run/credentials/deployd.service/tls-key.pem"' /etc/deployd/deployd.toml \
    || fail "init did not name the TLS key as a credential"
deployd check-config --config /etc/deployd/deployd.toml 2>/dev/null || fail "check-config refused init's config"
deployd token issue --config /etc/deployd/deployd.toml --sub ops --scope read --ttl 5m >/dev/null \
    || fail "no token from init's key"
ok "deployd init, check-config, token issue"

# Removal keeps configuration and state; a reinstall (an upgrade's path) works.
dpkg -r deployd >/dev/null
[ ! -e /usr/bin/deployd ] || fail "deployd still installed after dpkg -r"
[ -f /etc/deployd/deployd.toml ] || fail "dpkg -r removed the configuration"
dpkg -i "$deb" >/dev/null
deployd --version >/dev/null
ok "dpkg -r keeps /etc/deployd; reinstall"
