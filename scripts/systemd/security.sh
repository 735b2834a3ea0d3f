#!/usr/bin/env bash
# The exposure score `systemd-analyze security --offline=true` gives
# deployd.service, next to Debian's own docker.service (package docker.io)
# scored by the same command on this host. Fails above 2.0 for deployd.
#
#   scripts/systemd/security.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

docker_unit=/lib/systemd/system/docker.service
[ -f "$docker_unit" ] || { echo "no $docker_unit: install docker.io" >&2; exit 1; }
score() {
    systemd-analyze security --offline=true "$1" 2>/dev/null \
        | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) \([A-Z]*\).*/\1 \2/p'
}
deployd=$(score systemd/deployd.service)
docker=$(score "$docker_unit")
echo "systemd-analyze security --offline=true ($(systemd-analyze --version | head -n 1))"
printf '  %-62s %s\n' "deployd.service (this repository)" "$deployd" \
    "docker.service (Debian's docker.io $(dpkg-query -W -f='${Version}' docker.io 2>/dev/null || echo '?'))" "$docker"
awk -v s="${deployd%% *}" 'BEGIN { exit !(s != "" && s <= 2.0) }' \
    || { echo "deployd.service exposure ${deployd:-unknown} is above 2.0" >&2; exit 1; }
