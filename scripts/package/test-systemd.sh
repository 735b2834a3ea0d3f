#!/usr/bin/env bash
# The packaged deployd under a real systemd: a container of the test bed's
# clean Debian image boots systemd as its PID 1 (host network, the host's
# Docker socket), the .deb is installed, the host set up as README's
# operations section says, and deployd.socket + deployd.service started with
# the packaged unit's sandbox. Checks:
#
# - the service gets `active` only after READY=1, with no capabilities,
#   no_new_privs and its seccomp filter, yet reaches the Docker socket;
# - deployctl deploys release 1 through it, and the app answers on the
#   public address deployd.socket holds; then release 2, a lock refusing a
#   deploy, unlock, and a rollback to release 1;
# - a new TLS certificate, after a restart, is what deployctl's pin finds;
# - installing the package again over the running deployd (an upgrade:
#   postinst restarts it) fails no request made meanwhile;
# - DEPLOYD_LOG_FORMAT=json in a drop-in puts JSON lines in the journal;
# - `systemctl reload` (SIGHUP) and `systemctl restart` keep it serving;
# - `systemctl stop` stops it.
#
# One thing differs from a host: systemd in a container cannot set up
# LoadCredential= (its credentials directory stays empty, even for a bare
# unit), so a drop-in reads the config and TLS key from /etc/deployd
# instead, made readable by the deployd group. The credential paths are
# checked by scripts/package/check-installed.sh and systemd-analyze only.
#
#   scripts/package/test-systemd.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

bash scripts/testbed.sh up >&2
# shellcheck disable=SC1090
. "$DEPLOYD_TESTBED_ENV_FILE"
deb=$(bash scripts/package/deb.sh)
image=$(bash scripts/testbed.sh debian-image)

name=sysd$$
work=$(mktemp -d)
host=
loader=
cleanup() {
    [ -z "$loader" ] || kill "$loader" 2>/dev/null || true
    [ -z "$host" ] || docker rm -f "$host" >/dev/null 2>&1 || true
    agent_cleanup "$work" "$name"
}
trap cleanup EXIT
log() { printf '[systemd %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() {
    echo "FAIL: $*" >&2
    [ -z "$host" ] || docker exec "$host" journalctl -u deployd --no-pager | tail -n 30 >&2
    exit 1
}
on_host() { docker exec "$host" "$@"; }

api_port=$(agent_free_port)
public_port=$(agent_free_port)
agent_services "$name"

host=$(docker run -d --network host --cap-add SYS_ADMIN \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
    -v /var/run/docker.sock:/var/run/docker.sock \
    -v "$deb:/pkg/deployd.deb:ro" "$image" /lib/systemd/systemd)
for _ in $(seq 1 100); do
    state=$(on_host systemctl is-system-running 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    sleep 0.2
done
log "systemd runs in $(cut -c1-12 <<<"$host") ($state)"

# The docker group of this host is the socket's group.
on_host groupadd --gid "$(stat -c %g /var/run/docker.sock)" docker
on_host dpkg -i /pkg/deployd.deb >/dev/null
on_host deployd init --san localhost --listen "127.0.0.1:$api_port" --credentials-dir >/dev/null
docker cp "$DEPLOYD_TESTBED_REGISTRY_AUTH" "$host:/etc/deployd/secrets/$name-registry.json"
docker cp "$DEPLOYD_TESTBED_APP_ENV" "$host:/etc/deployd/secrets/$name.env"
# The sample app's section, as the other scripts configure it, with its
# secrets where the operations section puts them, behind the switch.
mkdir -p "$work/etc"
: >"$work/etc/deployd.toml"
agent_add_app "$work" "$name" "$name"
sed -e "s|$DEPLOYD_TESTBED_REGISTRY_AUTH|/etc/deployd/secrets/$name-registry.json|" \
    -e "s|$DEPLOYD_TESTBED_APP_ENV|/etc/deployd/secrets/$name.env|" "$work/etc/deployd.toml" \
    >"$work/app.toml"
# trust_forwarded_headers: as behind a TLS terminator, which sets
# X-Forwarded-Proto (Django redirects plain http to https).
printf '[apps.%s.switch]\nlisten = "127.0.0.1:%s"\ntrust_forwarded_headers = true\n' \
    "$name" "$public_port" >>"$work/app.toml"
docker cp "$work/app.toml" "$host:/tmp/app.toml"
on_host sh -c 'cat /tmp/app.toml >>/etc/deployd/deployd.toml'
on_host deployd check-config --config /etc/deployd/deployd.toml
# See the header: no LoadCredential= in a container.
on_host sh -c "
    mkdir -p /etc/systemd/system/deployd.service.d /etc/systemd/system/deployd.socket.d
    printf '[Service]\nLoadCredential=\nExecStart=\nExecStart=/usr/bin/deployd run --config /etc/deployd/deployd.toml\n' \
        >/etc/systemd/system/deployd.service.d/no-credentials.conf
    printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:$public_port\n' \
        >/etc/systemd/system/deployd.socket.d/listen.conf
    sed -i 's|/run/credentials/deployd.service/tls-key.pem|/etc/deployd/tls/key.pem|' /etc/deployd/deployd.toml
    chgrp deployd /etc/deployd/deployd.toml /etc/deployd/tls/key.pem /etc/deployd/secrets /etc/deployd/secrets/*
    chmod 0640 /etc/deployd/deployd.toml /etc/deployd/tls/key.pem /etc/deployd/secrets/*
    chmod 0750 /etc/deployd/secrets
    systemctl daemon-reload"

on_host systemctl enable --now deployd.socket deployd.service 2>/dev/null \
    || fail "deployd.service did not start"
[ "$(on_host systemctl is-active deployd.service)" = active ] || fail "deployd is not active"
[ "$(on_host systemctl show -p StatusText --value deployd.service)" = serving ] \
    || fail "no STATUS=serving from deployd"
pid=$(on_host systemctl show -p MainPID --value deployd.service)
caps=$(on_host grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' "/proc/$pid/status" | tr -s '\t\n' ' ')
[[ $caps == *"CapEff: 0000000000000000 CapBnd: 0000000000000000 NoNewPrivs: 1 Seccomp: 2"* ]] \
    || fail "deployd's sandbox is not in force: $caps"
limit=$(on_host awk '/^Max open files/ { print $4 " " $5 }' "/proc/$pid/limits")
# LimitNOFILE=65536, or as much as this container may have (systemd caps
# it at its own hard limit).
ceiling=$(on_host awk '/^Max open files/ { print $5 }' /proc/1/limits)
wanted=$(( ceiling < 65536 ? ceiling : 65536 ))
[ "$limit" = "$wanted $wanted" ] || fail "deployd's open-file limit is $limit, not LimitNOFILE=65536 (capped at $ceiling)"
log "deployd.service active after READY=1; $caps; open files $limit"
on_host systemd-analyze security deployd.service | tail -n 1 >&2

deployctl() {
    on_host sh -c "deployctl --url https://localhost:$api_port --ca-cert /etc/deployd/tls/cert.pem --app $name \
        --token \$(deployd token issue --config /etc/deployd/deployd.toml --sub ops --scope read,deploy,rollback,admin --ttl 10m) $*"
}
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" >"$work/deploy.log" 2>&1 \
    || fail "deploy of release 1: $(cat "$work/deploy.log")"
release() {
    curl -fsS --max-time 10 -H "Host: $DEPLOYD_TESTBED_APP_HOST" -H 'X-Forwarded-Proto: https' \
        "http://127.0.0.1:$public_port/release/"
}
answer=$(release) || fail "the switch did not answer on the socket's address"
[[ $answer == *served_by* ]] || fail "not the app's answer: $answer"
log "release 1 deployed by the packaged deployd; the public address answers: $answer"

# Rollback and lock, as the operations section runs them.
served() { release | python3 -c 'import json, sys; print(json.load(sys.stdin)["served_by"].split("/")[0])'; }
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2" >"$work/deploy.log" 2>&1 \
    || fail "deploy of release 2: $(cat "$work/deploy.log")"
[ "$(served)" = 2 ] || fail "release 2 does not answer"
deployctl lock --reason "'incident 42'" >/dev/null
code=0
deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" >"$work/locked.log" 2>&1 || code=$?
[ "$code" -eq 7 ] || fail "a deploy to a locked app exited $code: $(cat "$work/locked.log")"
deployctl unlock >/dev/null
deployctl rollback --reason "'bad release'" >"$work/rollback.log" 2>&1 \
    || fail "rollback: $(cat "$work/rollback.log")"
[ "$(served)" = 1 ] || fail "release 1 does not answer after the rollback"
log "deploy 2, lock (deploy refused, exit 7), unlock, rollback: release 1 answers"

# TLS rotation: a new certificate and key in /etc/deployd/tls, a restart;
# deployctl pinning the new fingerprint gets in.
on_host sh -c 'deployd init --dir /tmp/rotated --san localhost >/tmp/rotated.txt
    cp /tmp/rotated/tls/cert.pem /tmp/rotated/tls/key.pem /etc/deployd/tls/
    chgrp deployd /etc/deployd/tls/key.pem && chmod 0640 /etc/deployd/tls/key.pem'
fingerprint=$(on_host sed -n 's/.*SHA-256 fingerprint \([0-9A-F:]*\).*/\1/p' /tmp/rotated.txt)
on_host systemctl restart deployd.service
on_host sh -c "deployctl --url https://localhost:$api_port --pin-sha256 $fingerprint \
    --token \$(deployd token issue --config /etc/deployd/deployd.toml --sub ops --scope read --ttl 5m) whoami" \
    >/dev/null || fail "the rotated certificate is not served"
log "TLS certificate rotated (restart): deployctl pinning ${fingerprint:0:11}... gets in"

# An upgrade: the package installed again over itself while clients keep
# requesting; postinst restarts deployd, deployd.socket holds the listener.
: >"$work/load.out"
(
    while [ ! -e "$work/stop-load" ]; do
        if release >/dev/null 2>&1; then echo ok; else echo failed; fi
    done >>"$work/load.out"
) &
loader=$!
sleep 1
before=$(on_host systemctl show -p MainPID --value deployd.service)
on_host dpkg -i /pkg/deployd.deb >/dev/null
after=$(on_host systemctl show -p MainPID --value deployd.service)
sleep 1
touch "$work/stop-load"
wait "$loader"
loader=
served=$(grep -c ok "$work/load.out" || true)
failed=$(grep -c failed "$work/load.out" || true)
[ "$before" != "$after" ] || fail "the upgrade did not restart deployd"
[ "$failed" -eq 0 ] || fail "$failed of $((served + failed)) requests failed during the upgrade"
log "upgrade (dpkg -i over the running deployd, pid $before -> $after): $served requests, 0 failed"

# JSON logs for the journal: a drop-in setting DEPLOYD_LOG_FORMAT.
on_host sh -c "printf '[Service]\nEnvironment=DEPLOYD_LOG_FORMAT=json\n' \
    >/etc/systemd/system/deployd.service.d/log-format.conf && systemctl daemon-reload"
on_host systemctl restart deployd.service
pid=$(on_host systemctl show -p MainPID --value deployd.service)
# journald takes the log stream in on its own time: wait for the line.
journal_has() {
    local i
    for i in $(seq 1 60); do
        on_host journalctl "$@" -o cat --no-pager >"$work/journal.txt" 2>/dev/null || true
        grep -q "$pattern" "$work/journal.txt" && return 0
        sleep 0.5
    done
    return 1
}
pattern='"message":"deployd ready"'
journal_has "_PID=$pid" \
    || fail "no JSON 'deployd ready' in the journal: $(head -3 "$work/journal.txt")"
grep -q 'cannot raise the open-file limit' "$work/journal.txt" \
    && fail "deployd tried to raise a limit its unit sets: $(grep open-file "$work/journal.txt")"
python3 -c 'import json, sys; [json.loads(line) for line in open(sys.argv[1])]' "$work/journal.txt" \
    || fail "journal lines are not JSON with DEPLOYD_LOG_FORMAT=json"
log "DEPLOYD_LOG_FORMAT=json: the journal holds JSON lines"

on_host systemctl reload deployd.service
pattern='TLS certificate and key reloaded'
journal_has -u deployd || fail "systemctl reload did not reload"
on_host systemctl restart deployd.service
[ "$(on_host systemctl is-active deployd.service)" = active ] || fail "not active after restart"
release >/dev/null || fail "no answer after restart"
log "systemctl reload and restart: active and answering"

on_host systemctl stop deployd.service deployd.socket
[ "$(on_host systemctl is-active deployd.service || true)" = inactive ] || fail "deployd did not stop"
log "passed"
