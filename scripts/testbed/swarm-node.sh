#!/bin/sh
# The entrypoint of a second Swarm node (scripts/testbed.sh swarm up
# --nodes 2): a Docker engine inside a container.
#
#   swarm-node.sh GATEWAY REGISTRY_PORT
#
# The container is not --privileged: the test machines' bounding set lacks
# CAP_SYS_RESOURCE, which runc then fails to grant. It gets every other
# capability, no seccomp or AppArmor profile, its own cgroup namespace and
# every device, and mounts here what a privileged container would find
# writable: /sys and the cgroup (v1) hierarchies, rooted at its own cgroup.
set -eu
gateway=$1
registry_port=$2

mount -o remount,rw /sys
if [ ! -e /sys/fs/cgroup/cgroup.controllers ]; then
    # Each hierarchy as the host mounts it (cpu and cpuacct apart, say).
    hierarchies=$(awk '$3 == "cgroup" {
        n = split($4, o, ","); s = ""
        for (i = 1; i <= n; i++)
            if (o[i] !~ /^(ro|rw|nosuid|nodev|noexec|relatime|noatime|nodiratime)$/) s = s (s ? "," : "") o[i]
        print $2, s
    }' /proc/mounts)
    echo "$hierarchies" | while read -r dir _; do umount "$dir"; done
    umount /sys/fs/cgroup
    mount -t tmpfs cgroup /sys/fs/cgroup
    echo "$hierarchies" | while read -r dir opts; do
        mkdir -p "$dir"
        mount -t cgroup -o "$opts" cgroup "$dir"
    done
else
    # cgroup v2 (not what the test machines run, so not tried here).
    mount -o remount,rw /sys/fs/cgroup
fi

# The releases are pinned as 127.0.0.1:<port>/shop@sha256:...: the same name
# must reach the test bed's registry from in here. The host forwards its
# bridge gateway's port to the registry on its loopback.
socat "TCP-LISTEN:$registry_port,bind=127.0.0.1,fork,reuseaddr" "TCP:$gateway:$registry_port" &

# Address pools away from the host's own networks.
exec dockerd --default-address-pool base=10.201.0.0/16,size=24
