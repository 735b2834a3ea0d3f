#!/usr/bin/env bash
# Checks with Prometheus' own promtool: the example alert rules load
# (docs/alerts.yml) and fire as their unit tests expect
# (docs/alerts.test.yml), and, given a scrape of deployd's /metrics, that it
# passes `promtool check metrics`. promtool comes from Debian's prometheus
# package, unpacked into the test bed's cache (never installed: the package
# would start a Prometheus server).
#
#   scripts/metrics/check.sh [METRICS_FILE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

cache=${DEPLOYD_TESTBED_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/deployd-testbed}/promtool
promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
    promtool=$cache/usr/bin/promtool
    if [ ! -x "$promtool" ]; then
        echo "unpacking promtool from Debian's prometheus package" >&2
        mkdir -p "$cache"
        sudo_=""
        [ "$(id -u)" -eq 0 ] || sudo_=sudo
        (
            cd "$cache"
            apt-get download -q prometheus >/dev/null 2>&1 \
                || { $sudo_ apt-get update -qq && apt-get download -q prometheus >/dev/null; }
            dpkg-deb -x prometheus_*.deb . && rm prometheus_*.deb
        )
    fi
fi
"$promtool" check rules docs/alerts.yml
"$promtool" test rules docs/alerts.test.yml
if [ $# -gt 0 ]; then
    # Lint problems (naming, help text) are printed; only a parse error fails.
    report=$("$promtool" check metrics <"$1" 2>&1 || true)
    [ -z "$report" ] || echo "$report"
    if grep -qi 'error while linting\|parsing error' <<<"$report"; then
        echo "promtool cannot parse $1" >&2
        exit 1
    fi
    echo "promtool check metrics: $1 parses"
fi
