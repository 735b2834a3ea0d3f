#!/usr/bin/env bash
# A fleet's wall time: release 1 -> release 2 on one host alone, then on
# three hosts with max_parallel 3 and first_wave 3 (the first host runs the
# once tasks, the other two start when they are done; every host pulls at
# once in prepare), alternating, each pair in one round. Three agents on
# this machine, as scripts/scenario/fleet.sh sets them up, without load.
#
# Two passes of ROUNDS rounds each:
# - shared: the three hosts' containers share this machine's cores, so
#   three hosts booting their web containers at once take longer than one
#   for want of CPU, which separate hosts would not;
# - own share: each host's app runs under a cgroup of its own
#   (`cgroup_parent`) capped at a third of this machine's cores, in both
#   the one-host and the three-host runs, as three equal hosts would be.
#   The Docker engine is still one for the three.
# Prints each pass's medians, their ratio, and each round's.
#
#   scripts/bench/fleet.sh [rounds per pass, default 3]
set -euo pipefail
# Failures inside $(...) end the run too.
shopt -s inherit_errexit
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh
. scripts/lib/fleet.sh

rounds=${1:-3}
fleet_up
one=$(fleet_file one 1 1 a)
all3=$(fleet_file all3 3 3 a b c)

timed() { # LOG ARGS... -> seconds
    local out=$1 t0
    shift
    t0=$(date +%s.%N)
    deployctl "$@" >"$out" 2>&1 || fail "deployctl $* failed: $(tail -n 20 "$out")"
    python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)"
}

pass() { # NAME -> a JSON line
    local pass=$1 round t_one t_all
    : >"$dir/times-$pass.tsv"
    for round in $(seq 1 "$rounds"); do
        token
        t_one=$(timed "$dir/$pass-one-$round.log" deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" --fleet-file "$one")
        token
        timed "$dir/$pass-one-back-$round.log" rollback --fleet-file "$one" >/dev/null
        token
        t_all=$(timed "$dir/$pass-all-$round.log" deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" --fleet-file "$all3")
        all_on "$DEPLOYD_TESTBED_SHA_RELEASE_2" "$pass round $round"
        token
        timed "$dir/$pass-all-back-$round.log" rollback --fleet-file "$all3" >/dev/null
        printf '%s\t%s\n' "$t_one" "$t_all" >>"$dir/times-$pass.tsv"
        log "$pass, round $round: one host ${t_one} s, three hosts ${t_all} s"
    done
    python3 - "$pass" "$dir/times-$pass.tsv" <<'PY'
import json, statistics, sys
rows = [tuple(map(float, line.split())) for line in open(sys.argv[2]) if line.strip()]
one = statistics.median(r[0] for r in rows)
three = statistics.median(r[1] for r in rows)
print(json.dumps({
    "pass": sys.argv[1],
    "rounds": [{"one_host_s": a, "three_hosts_s": b, "ratio": round(b / a, 2)} for a, b in rows],
    "one_host_median_s": one,
    "three_hosts_median_s": three,
    "ratio_of_medians": round(three / one, 2),
}))
PY
}

# A cgroup per host, capped at a third of the machine's cores, in the form
# the engine's cgroup driver takes.
cgroups=()
slices=()
cgroup_cleanup() {
    local path
    for path in "${cgroups[@]}"; do
        as_root rmdir "$path" 2>/dev/null || true
    done
    for path in "${slices[@]}"; do
        as_root systemctl stop "$path" 2>/dev/null || true
    done
}
host_cgroup() { # HOST QUOTA_US: sets $parent, the cgroup_parent to configure
    local h=$1 quota=$2 cg=deployd-bench-$name$1
    case $(docker info --format '{{.CgroupDriver}}') in
        systemd)
            as_root systemctl set-property --runtime "$cg.slice" "CPUQuota=$((quota / 1000))%" >&2
            slices+=("$cg.slice")
            parent=$cg.slice
            ;;
        *)
            if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
                grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control \
                    || put +cpu /sys/fs/cgroup/cgroup.subtree_control
                as_root mkdir -p "/sys/fs/cgroup/$cg"
                put "$quota 100000" "/sys/fs/cgroup/$cg/cpu.max"
                cgroups+=("/sys/fs/cgroup/$cg")
            else
                as_root mkdir -p "/sys/fs/cgroup/cpu/$cg"
                put 100000 "/sys/fs/cgroup/cpu/$cg/cpu.cfs_period_us"
                put "$quota" "/sys/fs/cgroup/cpu/$cg/cpu.cfs_quota_us"
                cgroups+=("/sys/fs/cgroup/cpu/$cg")
            fi
            parent=/$cg
            ;;
    esac
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
put() { echo "$1" | as_root tee "$2" >/dev/null; } # VALUE FILE
# The containers go first, then their cgroups.
trap 'fleet_cleanup || true; cgroup_cleanup' EXIT

token
timed "$dir/first.log" deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" --fleet-file "$all3" >/dev/null
all_on "$DEPLOYD_TESTBED_SHA_RELEASE_1" "release 1"
shared=$(pass shared)

quota=$(($(nproc) * 100000 / 3))
for h in "${hosts[@]}"; do
    host_cgroup "$h" "$quota"
    sed -i "s|^\[apps\.$name$h\]$|&\ncgroup_parent = \"$parent\"|" "$dir/$h/etc/deployd.toml"
    grep -q "^cgroup_parent" "$dir/$h/etc/deployd.toml" || fail "no cgroup_parent in host $h's config"
    restart "$h"
done
log "each host's app capped at $((quota / 1000))% of one core"
own=$(pass own-share)

echo "$shared"
echo "$own"
