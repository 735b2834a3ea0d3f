# Shell helpers for scripts that run a fleet of three deployd agents on
# this machine (a, b, c): each with its own state, API port, app, network
# and switch, sharing one PostgreSQL and one Redis as one production would,
# the releases in a registry repository of the fleet's own. Only host a
# runs celery beat; host b's env lacks SHOP_FEATURE_KEY (the test bed's
# `needs-feature-key` build is unhealthy there only). Source it after
# scripts/lib/agent.sh, from the repository's root.
#
#   fleet_up                the fleet up: $dir (its files), $name (its app
#                           prefix), $hosts, $servers (HAProxy lines for
#                           the three switches); stopped on exit
#   fleet_file NAME MAX_PARALLEL FIRST_WAVE HOST...
#                           a fleet file with those hosts, in that order
#   token                   a fresh token for every host into $DEPLOYCTL_TOKEN_FILE
#   deployctl ARGS...       the debug deployctl
#   live_of HOST            the sha the host's status says is live
#   all_on SHA WHAT         fails unless every host runs SHA
#   restart HOST            stops the host's deployd (SIGTERM) and starts it
#                           again, with its config read anew
#   fail WHY / log WHAT     end with the agents' last lines / say

hosts=(a b c)
pids=()
lb_pid=
load_pid=
events_pid=
dir=
name=fleet$$

fleet_cleanup() {
    [ -n "$dir" ] || return 0
    touch "$dir/stop-load"
    [ -z "$load_pid" ] || wait "$load_pid" 2>/dev/null || true
    [ -z "$lb_pid" ] || kill "$lb_pid" 2>/dev/null || true
    [ -z "$events_pid" ] || kill "$events_pid" 2>/dev/null || true
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for h in "${hosts[@]}"; do
        AGENT_PID='' agent_cleanup "$dir/$h" "$name$h" >/dev/null 2>&1 || true
    done
    # By tag: the images are the test bed's, under another name.
    docker images --format '{{.Repository}}:{{.Tag}}' "$repo" | xargs -r docker rmi >/dev/null 2>&1 || true
    AGENT_PID='' agent_cleanup "$dir" "$name"
}

fail() {
    echo "FAIL: $*" >&2
    for h in "${hosts[@]}"; do
        echo "--- deployd $h" >&2
        tail -n 15 "$dir/$h/deployd.log" >&2 || true
    done
    exit 1
}
log() { printf '[fleet %s] %s\n' "$(date +%T)" "$*" >&2; }

fleet_up() {
    agent_bed
    dir=$(mktemp -d)
    trap fleet_cleanup EXIT
    export DEPLOYCTL_TOKEN_FILE=$dir/token

    # The releases in a repository of the fleet's own: the agents prune
    # what they pulled, and must not prune the test bed's own tags. The
    # push logs in through a temporary Docker config of its own; login's
    # warning that it stores the password there goes to a log file.
    repo=$DEPLOYD_TESTBED_REGISTRY/$name
    mkdir -p "$dir/docker-config"
    local user
    user=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["username"])' "$DEPLOYD_TESTBED_REGISTRY_AUTH")
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["password"])' "$DEPLOYD_TESTBED_REGISTRY_AUTH" \
        | docker --config "$dir/docker-config" login --password-stdin -u "$user" "$DEPLOYD_TESTBED_REGISTRY" \
            >/dev/null 2>"$dir/docker-login.log" \
        || { cat "$dir/docker-login.log" >&2; fail "cannot log in to the test bed's registry"; }
    local sha
    for sha in "$DEPLOYD_TESTBED_SHA_RELEASE_1" "$DEPLOYD_TESTBED_SHA_RELEASE_2" "$DEPLOYD_TESTBED_SHA_NEEDS_FEATURE_KEY"; do
        docker tag "$DEPLOYD_TESTBED_REPOSITORY:$sha" "$repo:$sha"
        docker --config "$dir/docker-config" push -q "$repo:$sha" >/dev/null
    done

    # One PostgreSQL and one Redis for the fleet, reachable from each app's
    # own network by the names the app uses (db, redis).
    agent_services "$name"
    local db redis
    db=$(docker ps -q --filter "label=deployd.script=$name" --filter "ancestor=$DEPLOYD_TESTBED_POSTGRES_IMAGE")
    redis=$(docker ps -q --filter "label=deployd.script=$name" --filter "ancestor=$DEPLOYD_TESTBED_REDIS_IMAGE")

    servers=""
    local h d api_port public_port
    for h in "${hosts[@]}"; do
        d=$dir/$h
        mkdir -p "$d"
        api_port=$(agent_free_port)
        public_port=$(agent_free_port)
        agent_init "$d" "$api_port"
        echo "$api_port" >"$d/api_port"
        # The app redirects plain HTTP; HAProxy and the switch speak plain
        # HTTP on loopback here, so `check --deploy` (which refuses that)
        # stays off.
        AGENT_CHECK=0 agent_add_app "$d" "$name$h" "$name$h"
        cp "$DEPLOYD_TESTBED_APP_ENV" "$d/app.env"
        echo "DJANGO_SECURE_SSL_REDIRECT=false" >>"$d/app.env"
        # The host-specific fault: the second host lacks this key.
        [ "$h" = b ] || echo "SHOP_FEATURE_KEY=on" >>"$d/app.env"
        sed -i "s|^env_file = .*|env_file = \"$d/app.env\"|; s|^image = .*|image = \"$repo\"|" "$d/etc/deployd.toml"
        # Migrate runs once per fleet deployment; beat only on the first
        # host (its section is the config's last).
        sed -i "/^name = \"migrate\"/a once = true" "$d/etc/deployd.toml"
        [ "$h" = a ] || sed -i "/^\[apps\.$name$h\.services\.beat\]/,\$d" "$d/etc/deployd.toml"
        printf '[apps.%s.switch]\nlisten = "127.0.0.1:%s"\n' "$name$h" "$public_port" >>"$d/etc/deployd.toml"
        # One signing key for the fleet, as ops would hand every host the
        # same public key: a token of the first host's key is good on all.
        [ "$h" = a ] || cp "$dir/a/etc/keys/ops.key" "$dir/a/etc/keys/ops.pub" "$d/etc/keys/"
        docker network create --label "deployd.script=$name$h" "$name$h" >/dev/null
        docker network connect --alias db "$name$h" "$db"
        docker network connect --alias redis "$name$h" "$redis"
        agent_start "$d"
        pids+=("$AGENT_PID")
        echo "$AGENT_PID" >"$d/pid"
        servers+="    server $h 127.0.0.1:$public_port check inter 1s fall 3 rise 2"$'\n'
        cat >"$d/host.toml" <<TOML

[[hosts]]
name = "$h"
url = "https://localhost:$api_port"
ca_cert = "$d/etc/tls/cert.pem"
app = "$name$h"
TOML
    done
    AGENT_PID=
    log "three agents up"
}

fleet_file() { # NAME MAX_PARALLEL FIRST_WAVE HOST...
    local file=$dir/$1.toml h
    printf 'max_parallel = %s\nfirst_wave = %s\nfailure_budget = 0\n' "$2" "$3" >"$file"
    shift 3
    for h in "$@"; do cat "$dir/$h/host.toml" >>"$file"; done
    echo "$file"
}
token() { agent_token "$dir/a" read,deploy,rollback >"$dir/token"; }
deployctl() { ./target/debug/deployctl "$@"; }
live_of() { # HOST -> the sha its status says is live
    local h=$1
    DEPLOYCTL_URL=https://localhost:$(cat "$dir/$h/api_port") DEPLOYCTL_CA_CERT=$dir/$h/etc/tls/cert.pem DEPLOYCTL_APP=$name$h \
        deployctl status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["live_sha"])'
}
restart() { # HOST
    local d=$dir/$1 pid
    pid=$(cat "$d/pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    agent_start "$d"
    local i
    for i in "${!pids[@]}"; do
        [ "${pids[$i]}" != "$pid" ] || pids[i]=$AGENT_PID
    done
    echo "$AGENT_PID" >"$d/pid"
    AGENT_PID=
}
all_on() { # SHA WHAT
    local h live
    for h in "${hosts[@]}"; do
        live=$(live_of "$h")
        [ "$live" = "$1" ] || fail "$2: host $h runs $live, not $1"
    done
}
