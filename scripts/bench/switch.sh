#!/usr/bin/env bash
# Proxy overhead, side by side in one run: a fast static backend (nginx
# serving a small file) loaded with wrk directly, through deployd's switch
# (agent/examples/switch_proxy.rs: the listener, proxy and pool `deployd run`
# serves) and through nginx as a reverse proxy with upstream keep-alive.
# Everything is on loopback. Each side runs ROUNDS times, interleaved:
#   throughput: wrk -t2 -c64 for 10 s (requests/s);
#   latency:    wrk -t1 -c1  for 10 s (p50/p99 of one request at a time).
# Prints medians, the switch/nginx throughput ratio and the p99 the
# switch adds over going direct. With a git revision as BASE, the switch as
# it was there runs too, as a fourth side ("base"): a change's cost,
# measured side by side.
#
#   scripts/bench/switch.sh [rounds, default 7] [BASE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
rounds=${1:-7}
base_rev=${2:-}

if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
    echo "installing nginx-light and wrk (Debian packages)" >&2
    sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q nginx-light wrk >/dev/null
fi
. scripts/lib/agent.sh
backend_port=$(agent_free_port)
nginx_port=$(agent_free_port)
switch_port=$(agent_free_port)
base_port=$(agent_free_port)
dir=$(mktemp -d)
cleanup() {
    [ -n "${switch_pid:-}" ] && kill "$switch_pid" 2>/dev/null
    [ -n "${base_pid:-}" ] && kill "$base_pid" 2>/dev/null
    for conf in backend proxy; do
        [ -f "$dir/$conf.pid" ] && kill "$(cat "$dir/$conf.pid")" 2>/dev/null
    done
    wait 2>/dev/null
    rm -rf "$dir"
    git worktree prune
}
trap cleanup EXIT
sides="direct switch nginx"
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --release --locked -q -p deployd --example switch_proxy
cp "$target/release/examples/switch_proxy" "$dir/switch_proxy"
if [ -n "$base_rev" ]; then
    # Built in a worktree of that revision, in a target directory of its
    # own: cargo names a workspace's artifacts by their path inside it, so
    # a shared one would mix the two revisions' crates.
    git worktree add -q --detach "$dir/base" "$base_rev"
    (cd "$dir/base" && cargo build --release --locked -q -p deployd --example switch_proxy --target-dir "$target/bench-base")
    cp "$target/bench-base/release/examples/switch_proxy" "$dir/switch_proxy_base"
    git worktree remove --force "$dir/base"
    sides="direct switch base nginx"
fi
mkdir -p "$dir/www"
head -c 612 /dev/zero | tr '\0' 'x' >"$dir/www/index.html"
# nginx's workers run as an unprivileged user: mktemp's 0700 would get 403s.
chmod 755 "$dir" "$dir/www"
chmod 644 "$dir/www/index.html"
common="daemon on; error_log $dir/error.log; events { worker_connections 4096; }"
temps="client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp; uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;"
mkdir -p "$dir/tmp"
cat >"$dir/backend.conf" <<NGINX
worker_processes 1; pid $dir/backend.pid; $common
http { access_log off; $temps
  server { listen 127.0.0.1:$backend_port; root $dir/www; keepalive_requests 100000; }
}
NGINX
# nginx as a production reverse proxy: HTTP/1.1 with a keep-alive pool to
# the backend, one worker per core.
cat >"$dir/proxy.conf" <<NGINX
worker_processes auto; pid $dir/proxy.pid; $common
http { access_log off; $temps
  upstream backend { server 127.0.0.1:$backend_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port; keepalive_requests 100000;
    location / {
      proxy_pass http://backend; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr; proxy_set_header X-Forwarded-Proto http;
    }
  }
}
NGINX
nginx -c "$dir/backend.conf" -p "$dir"
nginx -c "$dir/proxy.conf" -p "$dir"
"$dir/switch_proxy" "127.0.0.1:$switch_port" "127.0.0.1:$backend_port" >/dev/null &
switch_pid=$!
ports="$backend_port $nginx_port $switch_port"
if [ -n "$base_rev" ]; then
    "$dir/switch_proxy_base" "127.0.0.1:$base_port" "127.0.0.1:$backend_port" >/dev/null &
    base_pid=$!
    ports+=" $base_port"
fi
for port in $ports; do
    for _ in $(seq 1 100); do
        curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break
        sleep 0.1
    done
done

# wrk's "Requests/sec" and its latency percentiles, in ms. Any answer other
# than 200 (or a socket error) stops the benchmark: it would measure errors.
run_wrk() {
    local out
    out=$(wrk "$@" --latency)
    if grep -qE "Non-2xx|Socket errors" <<<"$out"; then
        echo "wrk $*: not every answer was a 200:" >&2
        echo "$out" >&2
        return 1
    fi
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    echo "$rps $(to_ms "$p50") $(to_ms "$p99")"
}
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000
        printf "%.3f", n }'
}

declare -A tput p50 p99
for side in $sides; do tput[$side]=""; p50[$side]=""; p99[$side]=""; done
ratios=""
for round in $(seq 1 "$rounds"); do
    for side in $sides; do
        case $side in
            direct) port=$backend_port ;;
            switch) port=$switch_port ;;
            base) port=$base_port ;;
            nginx) port=$nginx_port ;;
        esac
        result=$(run_wrk -t2 -c64 -d10s "http://127.0.0.1:$port/")
        read -r rps _ _ <<<"$result"
        result=$(run_wrk -t1 -c1 -d10s "http://127.0.0.1:$port/")
        read -r _ lat50 lat99 <<<"$result"
        tput[$side]+="$rps "; p50[$side]+="$lat50 "; p99[$side]+="$lat99 "
        echo "round $round $side: $rps req/s (64 connections); p50 $lat50 ms, p99 $lat99 ms (1 connection)" >&2
    done
    read -r -a s_ <<<"${tput[switch]}"
    read -r -a n_ <<<"${tput[nginx]}"
    ratios+="$(awk -v s="${s_[-1]}" -v n="${n_[-1]}" 'BEGIN {printf "%.2f", s / n}') "
done

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo
printf '%-8s %12s %10s %10s\n' side "req/s" "p50 ms" "p99 ms"
for side in $sides; do
    printf '%-8s %12s %10s %10s\n' "$side" "$(median "${tput[$side]}")" "$(median "${p50[$side]}")" "$(median "${p99[$side]}")"
done
ratio=$(awk -v s="$(median "${tput[switch]}")" -v n="$(median "${tput[nginx]}")" 'BEGIN {printf "%.2f", s / n}')
added=$(awk -v s="$(median "${p99[switch]}")" -v d="$(median "${p99[direct]}")" 'BEGIN {printf "%.3f", s - d}')
added_nginx=$(awk -v s="$(median "${p99[nginx]}")" -v d="$(median "${p99[direct]}")" 'BEGIN {printf "%.3f", s - d}')
echo
echo "switch throughput / nginx throughput: $ratio (floor 0.9); per round: ${ratios% }"
if [ -n "$base_rev" ]; then
    echo "switch throughput / base ($base_rev) throughput: $(awk -v s="$(median "${tput[switch]}")" -v b="$(median "${tput[base]}")" 'BEGIN {printf "%.2f", s / b}')"
fi
echo "p99 added over direct: switch $added ms, nginx $added_nginx ms (floor: switch at most 1 ms)"
awk -v r="$ratio" -v a="$added" 'BEGIN { exit !(r >= 0.9 && a <= 1.0) }' || {
    echo "below the floor" >&2
    exit 1
}
