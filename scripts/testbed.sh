#!/usr/bin/env bash
# The test bed every deployd test runs against: a Docker engine, images built
# on this machine (no public registry is reachable), and a private registry
# with password authentication on loopback.
#
#   scripts/testbed.sh up       make everything ready (idempotent, cached)
#   scripts/testbed.sh status   show what is running and where the state is
#   scripts/testbed.sh down     stop the registry and remove test containers
#   scripts/testbed.sh purge    down, then delete images and all state
#   scripts/testbed.sh swarm up [--nodes 2]|down
#                               make the engine a single-node Swarm for the
#                               swarm backend's tests (with --nodes 2, add a
#                               second node: an engine in a container), or
#                               leave the Swarm if `swarm up` made it (an
#                               engine that was a Swarm already is left as
#                               it was)
#   scripts/testbed.sh debian-image
#                               a clean Debian image with systemd, for
#                               installing the package into; prints its tag
#   scripts/testbed.sh haproxy-image
#                               Debian's HAProxy as an image; prints its tag
#
# State lives in $DEPLOYD_TESTBED_DIR (default ~/.cache/deployd-testbed); `up`
# writes testbed.env there, which the integration tests read.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${DEPLOYD_TESTBED_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/deployd-testbed}
REGISTRY_PORT=${DEPLOYD_TESTBED_REGISTRY_PORT:-5000}
REGISTRY=127.0.0.1:$REGISTRY_PORT
REPOSITORY=$REGISTRY/shop
REGISTRY_USER=deployd
APP_DIR=$ROOT/examples/django-app
# Containers, networks and volumes made by tests carry this label.
TEST_LABEL=deployd.test

# Release variants pushed to the registry: name, release, overlay directory,
# and a file of the overlay left out, if any. Broken builds sit on top of
# release 2, as the commit after it would.
VARIANTS=(
    "release-1 1 -"
    "release-2 2 -"
    "migrate-fails 2 variants/migrate-fails"
    "healthz-500 2 -"
    "web-crash 2 -"
    "worker-crash 2 -"
    "slow-boot 2 -"
    "unhealthy-after-5-checks 2 -"
    "needs-feature-key 2 -"
    "drop-column 2 variants/drop-column"
    "stop-reading 2 variants/drop-column src/shop/migrations/0003_remove_heartbeat_queue.py"
    "not-null-no-default 2 variants/not-null-no-default"
    "expand 2 variants/expand"
    "irreversible-data 2 variants/irreversible-data"
    "errors-10pct 2 -"
    "slow-3x 2 -"
)

log() { printf '[testbed %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# A stable fake commit sha per variant: tests and the demo name releases by it.
variant_sha() { printf 'deployd-testbed/%s' "$1" | sha1sum | cut -c1-40; }

# Cache key of an image: a hash of a string and of files under a directory,
# by content and relative path, so that every checkout agrees on it.
content_hash() {
    local dir=$1 extra=$2; shift 2
    {
        printf '%s\n' "$extra"
        if [ $# -gt 0 ]; then
            (cd "$dir" && find "$@" -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum)
        fi
    } | sha256sum | cut -c1-12
}

apt_updated=false
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing Debian packages: ${missing[*]}"
    if ! $apt_updated; then as_root apt-get update -qq; apt_updated=true; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_docker() {
    local answer
    answer=$(docker info 2>&1 >/dev/null) && return
    if [ -S /var/run/docker.sock ] && grep -qi 'permission denied' <<<"$answer"; then
        die "the Docker engine runs but $(id -un) may not use it: join the docker group (or run as root)"
    fi
    command -v dockerd >/dev/null || ensure_packages docker.io
    if [ -d /run/systemd/system ]; then
        log "no Docker engine answers; starting docker.service"
        as_root systemctl start docker
    else
        log "no Docker engine answers; starting dockerd (log: $STATE/dockerd.log)"
        as_root sh -c "setsid nohup dockerd >'$STATE/dockerd.log' 2>&1 </dev/null 9>&- &"
    fi
    local i
    for i in $(seq 1 120); do
        docker info >/dev/null 2>&1 && return
        sleep 0.5
    done
    tail -n 20 "$STATE/dockerd.log" >&2 2>/dev/null || true
    die "the Docker engine did not answer within 60 s"
}

# The Debian mirror and suite this host already uses, from its apt sources.
host_mirror() {
    local codename site
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || die "cannot tell this host's Debian codename from /etc/os-release"
    site=$(apt_site_for "$codename")
    if [ -z "$site" ] && ! $apt_updated; then
        as_root apt-get update -qq; apt_updated=true
        site=$(apt_site_for "$codename")
    fi
    [ -n "$site" ] || die "no apt source for suite $codename found on this host"
    echo "$codename $site"
}

# Sources may name the suite by codename (bookworm) or by alias (stable).
apt_site_for() {
    apt-get indextargets --format '$(SITE) $(RELEASE) $(CODENAME) $(TARGET_OF)' 2>/dev/null \
        | awk -v s="$1" '($2 == s || $3 == s) && $4 == "deb" { print $1; exit }'
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }

# Runs a command inside a rootfs, isolated from the host's environment.
in_rootfs() {
    local rootfs=$1; shift
    as_root env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin LANG=C.UTF-8 chroot "$rootfs" "$@"
}

# debootstrap a minbase rootfs with extra packages, let a hook adjust it,
# then `docker import` it. Skipped when the tag already exists.
build_rootfs_image() {
    local image=$1 packages=$2 hook=$3
    shift 3
    image_exists "$image" && return
    local suite mirror rootfs=$STATE/rootfs/${image##*/}
    read -r suite mirror < <(host_mirror)
    log "building $image: debootstrap $suite ($packages), about a minute"
    as_root rm -rf "$rootfs"
    mkdir -p "$STATE/debootstrap-cache" "$(dirname "$rootfs")"
    as_root debootstrap --variant=minbase --cache-dir="$STATE/debootstrap-cache" \
        --include="$packages" "$suite" "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE/debootstrap.log" >&2; die "debootstrap failed"; }
    "$hook" "$rootfs"
    # Package caches and lists, docs and translations are not needed at run time.
    as_root rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/tmp/*
    as_root find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
    as_root tar -C "$rootfs" -c . | docker import "$@" - "$image" >/dev/null
    as_root rm -rf "$rootfs"
    # Earlier builds of this base are stale now; images built on them keep
    # their layers until they are rebuilt.
    docker images --format '{{.Repository}}:{{.Tag}}' "${image%:*}" | grep -vxF "$image" \
        | xargs -r docker rmi >/dev/null 2>&1 || true
}

# Python base: a virtualenv holding exactly the pinned wheels.
python_hook() {
    local rootfs=$1 pyver wheels arch
    # Wheels for the machine's own architecture (x86_64, aarch64, ...).
    arch=$(uname -m)
    pyver=$(in_rootfs "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    wheels=$STATE/wheels/py$pyver
    log "downloading wheels for Python $pyver on the host"
    mkdir -p "$wheels"
    # PIP_* settings of the host (extra find-links, say) must not leak in.
    env -u PIP_FIND_LINKS python3 -m pip download -q --disable-pip-version-check \
        --only-binary=:all: --no-deps --python-version "$pyver" --implementation cp \
        --platform "manylinux2014_$arch" --platform "manylinux_2_28_$arch" \
        -d "$wheels" -r "$APP_DIR/requirements.txt"
    as_root mkdir -p "$rootfs/tmp/wheels"
    as_root cp "$wheels"/*.whl "$APP_DIR/requirements.txt" "$rootfs/tmp/wheels/"
    in_rootfs "$rootfs" python3 -m venv /opt/venv
    in_rootfs "$rootfs" /opt/venv/bin/pip install -q --disable-pip-version-check \
        --no-index --find-links /tmp/wheels -r /tmp/wheels/requirements.txt
}

# Services base: Debian's redis-server and postgresql; the cluster that the
# package creates is dropped, the postgres image initialises its volume.
services_hook() {
    local rootfs=$1
    as_root rm -rf "$rootfs"/var/lib/postgresql/*/main "$rootfs"/etc/postgresql/*/main
}

smoke_test_python_base() {
    log "smoke-testing $1 (gunicorn, celery worker and beat)"
    docker run --rm --network none -v "$ROOT/scripts/testbed/smoke.py:/smoke.py:ro" "$1" \
        python /smoke.py >"$STATE/smoke.log" 2>&1 \
        || { tail -n 30 "$STATE/smoke.log" >&2; docker rmi "$1" >/dev/null; die "smoke test of $1 failed"; }
}

# Bump when the way base images are made changes (hooks, packages, import).
BASE_REVISION=1

build_base_images() {
    local key
    key=$(content_hash "$ROOT" "$(host_mirror) $BASE_REVISION" \
        examples/django-app/requirements.txt scripts/testbed/smoke.py)
    PYTHON_BASE=deployd-testbed/python:$key
    if ! image_exists "$PYTHON_BASE"; then
        # Tagged for real only once the smoke test passed: an interrupted
        # run must not leave an untested base that later runs would trust.
        local untested=$PYTHON_BASE-untested
        docker rmi "$untested" >/dev/null 2>&1 || true
        build_rootfs_image "$untested" python3,python3-venv python_hook \
            --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'ENV PYTHONUNBUFFERED=1'
        smoke_test_python_base "$untested"
        docker tag "$untested" "$PYTHON_BASE"
        docker rmi "$untested" >/dev/null
    fi
    key=$(content_hash "$ROOT" "$(host_mirror) $BASE_REVISION")
    SERVICES_BASE=deployd-testbed/services:$key
    build_rootfs_image "$SERVICES_BASE" redis-server,postgresql services_hook --change 'ENV LANG=C.UTF-8'
}

docker_build() {
    local tag=$1 context=$2; shift 2
    docker build -q "$@" -t "$tag" "$context" >"$STATE/build.log" 2>&1 \
        || { tail -n 30 "$STATE/build.log" >&2; die "docker build of $tag failed"; }
}

build_service_images() {
    REDIS_IMAGE=deployd-testbed/redis:latest
    POSTGRES_IMAGE=deployd-testbed/postgres:latest
    docker_build "$REDIS_IMAGE" "$ROOT/examples/services/redis" --build-arg "BASE_IMAGE=$SERVICES_BASE"
    docker_build "$POSTGRES_IMAGE" "$ROOT/examples/services/postgres" --build-arg "BASE_IMAGE=$SERVICES_BASE"
}

# One build context per variant: the app, the release 2 overlay for releases
# >= 2, then the variant's own overlay, like checking out successive commits,
# and build.json naming the release and variant. Only the last layer (the
# code) differs between variants: each build adds that one layer.
build_app_images() {
    local line name release overlay without ctx
    for line in "${VARIANTS[@]}"; do
        read -r name release overlay without <<<"$line"
        ctx=$STATE/build/$name
        rm -rf "$ctx"; mkdir -p "$ctx"
        cp -a "$APP_DIR/Dockerfile" "$APP_DIR/.dockerignore" "$APP_DIR/requirements.txt" \
            "$APP_DIR/manage.py" "$APP_DIR/gunicorn.conf.py" "$APP_DIR/src" "$ctx/"
        if [ "$release" -ge 2 ]; then cp -a "$APP_DIR/releases/2/." "$ctx/"; fi
        if [ "$overlay" != - ]; then cp -a "$APP_DIR/$overlay/." "$ctx/"; fi
        if [ -n "$without" ]; then rm "$ctx/$without"; fi
        local variant=$name tag key
        case $name in release-*) variant=good ;; esac
        printf '{"release": "%s", "variant": "%s"}\n' "$release" "$variant" >"$ctx/build.json"
        tag=$REPOSITORY:$(variant_sha "$name")
        # Docker's layer cache misses on a fresh checkout (new file times);
        # the hash of the context's contents does not. It is kept beside the
        # image's id in a file, not as a label: a label is one more build
        # step, as slow as the code's layer.
        key=$(content_hash "$ctx" "$PYTHON_BASE $release $variant" .)
        local record=$STATE/build/$name.built old
        old=$(image_id "$tag")
        # Up to date: built from this context, and the tag still names it.
        [ -n "$old" ] && [ "$(cat "$record" 2>/dev/null)" = "$key $old" ] && continue
        docker_build "$tag" "$ctx" --build-arg "BASE_IMAGE=$PYTHON_BASE"
        local new
        new=$(image_id "$tag")
        printf '%s %s\n' "$key" "$new" >"$record"
        # The image this one replaced, now untagged.
        if [ -n "$old" ] && [ "$old" != "$new" ]; then
            docker rmi "$old" >/dev/null 2>&1 || true
        fi
    done
}

random_secret() { head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c1-"$1"; }

# Secrets are made once and kept (mode 0600) so tests and reruns agree.
ensure_secrets() (
    umask 077
    [ -s "$STATE/registry/password" ] || random_secret 32 >"$STATE/registry/password"
    [ -s "$STATE/registry/http-secret" ] || random_secret 32 >"$STATE/registry/http-secret"
    [ -s "$STATE/db-password" ] || random_secret 24 >"$STATE/db-password"
    [ -s "$STATE/django-secret-key" ] || random_secret 60 >"$STATE/django-secret-key"
    REGISTRY_PASSWORD=$(cat "$STATE/registry/password")
    # Made again whenever the password file is newer; the password goes in
    # on stdin, never on a command line where the process list shows it.
    if [ ! -s "$STATE/registry/htpasswd" ] || [ "$STATE/registry/password" -nt "$STATE/registry/htpasswd" ]; then
        htpasswd -Bci "$STATE/registry/htpasswd" "$REGISTRY_USER" <<<"$REGISTRY_PASSWORD" 2>/dev/null
    fi
    printf '{"username": "%s", "password": "%s"}\n' "$REGISTRY_USER" "$REGISTRY_PASSWORD" \
        >"$STATE/registry-auth.json"
    local db_password
    db_password=$(cat "$STATE/db-password")
    printf 'POSTGRES_USER=shop\nPOSTGRES_PASSWORD=%s\nPOSTGRES_DB=shop\n' "$db_password" >"$STATE/db.env"
    cat >"$STATE/shop.env" <<EOF
DJANGO_SECRET_KEY=$(cat "$STATE/django-secret-key")
DJANGO_ALLOWED_HOSTS=shop.example.com
DATABASE_URL=postgres://shop:$db_password@db:5432/shop
CELERY_BROKER_URL=redis://redis:6379/0
# slow-boot serves nothing for this long: past any health timeout of the
# tests, however slow the machine is.
SHOP_SLOW_BOOT_SECONDS=150
EOF
    cat >"$STATE/registry/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/registry/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
  secret: $(cat "$STATE/registry/http-secret")
auth:
  htpasswd:
    realm: deployd-testbed
    path: $STATE/registry/htpasswd
EOF
)

registry_status() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$REGISTRY/v2/" || true; }

ensure_registry() {
    case $(registry_status) in
        401) return ;;
        000) ;;
        *) die "something other than the test bed registry answers on $REGISTRY" ;;
    esac
    log "starting the registry on $REGISTRY (log: $STATE/registry/registry.log)"
    # 9>&-: the registry must not inherit (and hold forever) the `up` lock.
    setsid nohup docker-registry serve "$STATE/registry/config.yml" \
        >"$STATE/registry/registry.log" 2>&1 </dev/null 9>&- &
    echo $! >"$STATE/registry/pid"
    local i
    for i in $(seq 1 50); do
        [ "$(registry_status)" = 401 ] && return
        sleep 0.2
    done
    tail -n 20 "$STATE/registry/registry.log" >&2
    die "the registry did not start"
}

push_app_images() {
    local config=$STATE/docker-config line name
    mkdir -p "$config"
    docker --config "$config" login -u "$REGISTRY_USER" --password-stdin "$REGISTRY" \
        <"$STATE/registry/password" >/dev/null 2>&1 || die "docker login to $REGISTRY failed"
    for line in "${VARIANTS[@]}"; do
        read -r name _ <<<"$line"
        docker --config "$config" push -q "$REPOSITORY:$(variant_sha "$name")" >/dev/null \
            || die "pushing $name failed"
    done
}

write_env() {
    local line name key
    {
        echo "# Written by scripts/testbed.sh up; read by the integration tests."
        echo "DEPLOYD_TESTBED_REGISTRY=$REGISTRY"
        echo "DEPLOYD_TESTBED_REPOSITORY=$REPOSITORY"
        echo "DEPLOYD_TESTBED_REGISTRY_AUTH=$STATE/registry-auth.json"
        echo "DEPLOYD_TESTBED_APP_ENV=$STATE/shop.env"
        echo "DEPLOYD_TESTBED_DB_ENV=$STATE/db.env"
        echo "DEPLOYD_TESTBED_REDIS_IMAGE=$REDIS_IMAGE"
        echo "DEPLOYD_TESTBED_POSTGRES_IMAGE=$POSTGRES_IMAGE"
        echo "DEPLOYD_TESTBED_PYTHON_BASE=$PYTHON_BASE"
        echo "DEPLOYD_TESTBED_APP_HOST=shop.example.com"
        for line in "${VARIANTS[@]}"; do
            read -r name _ <<<"$line"
            key=$(echo "$name" | tr 'a-z-' 'A-Z_')
            echo "DEPLOYD_TESTBED_SHA_$key=$(variant_sha "$name")"
        done
    } >"$STATE/testbed.env"
}

cmd_up() {
    local started=$SECONDS
    mkdir -p "$STATE/registry/data"
    # One `up` at a time: runs would share build contexts and logs.
    exec 9>"$STATE/lock"
    flock 9
    # openssh-client: the operator-key tests use a real ssh-keygen and
    # ssh-agent.
    ensure_packages debootstrap docker-registry apache2-utils curl ca-certificates openssh-client
    python3 -m pip --version >/dev/null 2>&1 || ensure_packages python3 python3-pip
    # Debian starts the packaged registry on :5000 without authentication;
    # the test bed runs its own.
    if [ -d /run/systemd/system ] && systemctl -q is-active docker-registry 2>/dev/null; then
        log "stopping and disabling the packaged docker-registry service"
        as_root systemctl disable -q --now docker-registry
    fi
    ensure_docker
    ensure_secrets
    build_base_images
    build_service_images
    build_app_images
    ensure_registry
    push_app_images
    write_env
    log "ready in $((SECONDS - started)) s: ${#VARIANTS[@]} releases in $REPOSITORY; env in $STATE/testbed.env"
}

# Tests label what they create; containers the engine starts for a test
# sit on the test's network, and static volumes are named after it.
remove_test_objects() {
    docker info >/dev/null 2>&1 || return 0
    local ids net
    for net in $(docker network ls -q --filter "label=$TEST_LABEL"); do
        ids=$(docker ps -aq --filter "network=$net")
        [ -z "$ids" ] || docker rm -f $ids >/dev/null
    done
    ids=$(docker ps -aq --filter "label=$TEST_LABEL")
    [ -z "$ids" ] || docker rm -f $ids >/dev/null
    ids=$(docker network ls -q --filter "label=$TEST_LABEL")
    [ -z "$ids" ] || docker network rm $ids >/dev/null
    ids=$( (docker volume ls -q --filter "label=$TEST_LABEL"; docker volume ls -q --filter "name=deployd-test-") | sort -u)
    [ -z "$ids" ] || docker volume rm $ids >/dev/null
    # Engine tests deploy from a repository of their own, <registry>/t<12 hex>.
    ids=$(docker images --format '{{.Repository}}:{{.Tag}}' | grep -E "^$REGISTRY/t[0-9a-f]{12}:" || true)
    [ -z "$ids" ] || docker rmi $ids >/dev/null
}

cmd_down() {
    local pid
    pid=$(cat "$STATE/registry/pid" 2>/dev/null || true)
    # Only if that pid still is our registry: pids are reused.
    if [ -n "$pid" ] && grep -qa "$STATE/registry/config.yml" "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid" && log "registry stopped"
    fi
    rm -f "$STATE/registry/pid"
    remove_test_objects
}

cmd_purge() {
    cmd_down
    if docker info >/dev/null 2>&1; then
        local images
        images=$(testbed_images | cut -f1 | sort -u)
        [ -z "$images" ] || docker rmi -f $images >/dev/null
    fi
    as_root rm -rf "$STATE"
    log "removed images and $STATE"
}

# id, name and size of every image the test bed made, tagged or not.
testbed_images() {
    docker images --format '{{.ID}}\t{{.Repository}}:{{.Tag}}\t{{.Size}}' \
        | awk -F'\t' -v repo="$REPOSITORY:" 'index($2, "deployd-testbed/") == 1 || index($2, repo) == 1'
}

cmd_status() {
    echo "state:    $STATE"
    echo "registry: $REGISTRY ($( [ "$(registry_status)" = 401 ] && echo up || echo down))"
    testbed_images | cut -f2,3
}

no_hook() { :; }
# packaged_image NAME PACKAGES: a Debian minbase image with PACKAGES
# installed, tagged deployd-testbed/NAME:<hash>, for the scripts that need
# one more real part; prints its tag.
packaged_image() {
    local name=$1 packages=$2 image
    mkdir -p "$STATE"
    exec 9>"$STATE/lock"
    flock 9
    ensure_packages debootstrap
    ensure_docker
    image=deployd-testbed/$name:$(content_hash "$ROOT" "$(host_mirror) $BASE_REVISION $packages")
    build_rootfs_image "$image" "$packages" no_hook --change 'ENV LANG=C.UTF-8' >&2
    echo "$image"
}

swarm_state() { docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || true; }

# A second node: a Docker engine in a container (scripts/testbed/swarm-node.sh),
# and, on the host's network, a forwarder from the bridge gateway to the
# registry on loopback, which the node's own forwarder reaches.
SWARM_NODE=deployd-testbed-node2
REGISTRY_FORWARDER=deployd-testbed-registry-forwarder
NODE_LABEL=deployd.testbed=swarm-node

# The engine as a Swarm manager: the swarm backend's tests deploy to it. One
# node: advertised on loopback. Two: advertised on the default bridge's
# gateway, which the second node joins from its container. A marker records
# that we made it.
cmd_swarm_up() {
    local nodes=$1
    mkdir -p "$STATE"
    ensure_docker
    case $(swarm_state) in
        active)
            [ -e "$STATE/swarm-ours" ] || log "the engine is a Swarm already; it is left as it is"
            if [ "$nodes" = 2 ] && ! second_node_ready; then
                die "a second node joins only a Swarm that swarm up --nodes 2 makes: scripts/testbed.sh swarm down first"
            fi
            return ;;
        inactive) ;;
        *) die "the engine's Swarm is $(swarm_state): settle it first (docker swarm leave --force)" ;;
    esac
    if [ "$nodes" = 1 ]; then
        docker swarm init --advertise-addr 127.0.0.1 >/dev/null
        touch "$STATE/swarm-ours"
        log "the engine is a single-node Swarm now (scripts/testbed.sh swarm down leaves it)"
        return
    fi
    local gateway image token
    ensure_packages iproute2
    image=$(packaged_image docker-node docker.io,socat)
    gateway=$(bridge_gateway)
    docker swarm init --advertise-addr "$gateway" >/dev/null
    touch "$STATE/swarm-ours"
    docker run -d --name "$REGISTRY_FORWARDER" --label "$NODE_LABEL" --network host "$image" \
        socat "TCP-LISTEN:$REGISTRY_PORT,bind=$gateway,fork,reuseaddr" "TCP:127.0.0.1:$REGISTRY_PORT" >/dev/null
    # Not --privileged: see swarm-node.sh.
    docker run -d --name "$SWARM_NODE" --hostname "${SWARM_NODE#deployd-testbed-}" --label "$NODE_LABEL" \
        --cap-add ALL --cap-drop SYS_RESOURCE --cgroupns private --device-cgroup-rule 'a *:* rwm' \
        --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
        --security-opt systempaths=unconfined --tmpfs /run -v /var/lib/docker \
        -v "$ROOT/scripts/testbed/swarm-node.sh:/swarm-node.sh:ro" \
        "$image" sh /swarm-node.sh "$gateway" "$REGISTRY_PORT" >/dev/null
    local i
    for i in $(seq 1 120); do
        docker exec "$SWARM_NODE" docker info >/dev/null 2>&1 && break
        [ "$i" = 120 ] && { docker logs --tail 20 "$SWARM_NODE" >&2; die "the second node's engine did not answer within a minute"; }
        sleep 0.5
    done
    token=$(docker swarm join-token -q worker)
    docker exec "$SWARM_NODE" docker swarm join --token "$token" "$gateway:2377" >/dev/null
    for i in $(seq 1 120); do
        second_node_ready && break
        [ "$i" = 120 ] && die "the second node did not become ready within a minute"
        sleep 0.5
    done
    log "the engine is the manager of a two-node Swarm now, advertised on $gateway; the second node is the container $SWARM_NODE (scripts/testbed.sh swarm down removes it)"
}

# The Swarm has its one worker, the second node, and it is ready.
second_node_ready() { [ "$(docker node ls --filter role=worker --format '{{.Status}}')" = Ready ]; }

# The default bridge's gateway: the host's address that containers reach.
bridge_gateway() {
    local bridge
    bridge=$(docker network inspect bridge -f '{{index .Options "com.docker.network.bridge.name"}}')
    ip -4 -o addr show "${bridge:-docker0}" | awk '{ split($4, a, "/"); print a[1]; exit }'
}

# Leaves the Swarm only if `swarm up` made it; a second node goes first.
cmd_swarm_down() {
    if [ ! -e "$STATE/swarm-ours" ]; then
        log "the Swarm was not made by the test bed; left as it is"
        return
    fi
    local services
    services=$(docker service ls -q --filter label=deployd.app 2>/dev/null || true)
    [ -z "$services" ] || docker service rm $services >/dev/null
    if docker container inspect "$SWARM_NODE" >/dev/null 2>&1; then
        docker exec "$SWARM_NODE" docker swarm leave --force >/dev/null 2>&1 || true
        # Stopped before it is removed: its engine stops its containers and
        # removes their cgroups, which live under the node's own.
        docker stop -t 60 "$SWARM_NODE" >/dev/null || log "the second node did not stop; removed regardless"
    fi
    docker ps -aq --filter "label=$NODE_LABEL" | xargs -r docker rm -f -v >/dev/null
    docker swarm leave --force >/dev/null
    rm -f "$STATE/swarm-ours"
    log "the engine has left the Swarm the test bed made"
}

case ${1:-} in
    up) cmd_up ;;
    swarm)
        case ${2:-} in
            up)
                case ${3:-} in
                    "") cmd_swarm_up 1 ;;
                    --nodes) [[ ${4:-} =~ ^[12]$ ]] || { echo "usage: $0 swarm up [--nodes 1|2]" >&2; exit 2; }
                        cmd_swarm_up "$4" ;;
                    *) echo "usage: $0 swarm up [--nodes 1|2]" >&2; exit 2 ;;
                esac ;;
            down) cmd_swarm_down ;;
            *) echo "usage: $0 swarm up [--nodes 1|2]|down" >&2; exit 2 ;;
        esac ;;
    down) cmd_down ;;
    purge) cmd_purge ;;
    status) cmd_status ;;
    # A clean Debian host with systemd installed (not running): what a
    # package is installed into. procps: /bin/kill, in every standard
    # Debian install (not in minbase).
    debian-image) packaged_image debian-systemd systemd,systemd-sysv,procps ;;
    # HAProxy, for a load balancer on a Swarm's overlay network.
    haproxy-image) packaged_image haproxy haproxy ;;
    *) echo "usage: $0 up|down|status|purge|swarm up|swarm down|debian-image|haproxy-image" >&2; exit 2 ;;
esac
