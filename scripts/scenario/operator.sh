#!/usr/bin/env bash
# An operator's day with the real binaries, no host-issued token anywhere:
# a key made by `deployctl keygen`, trusted by the host (SIGHUP), then
# deploy, a manage.py command, the app's logs, a rollback and the history;
# and the same identity from a key held by a real ssh-agent. Prints the
# session as a transcript (README's "Operators" section quotes one run).
#
#   scripts/scenario/operator.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib/agent.sh

agent_bed

dir=$(mktemp -d)
name=ops$$
ssh_agent=
cleanup() {
    [ -z "$ssh_agent" ] || kill "$ssh_agent" 2>/dev/null || true
    agent_cleanup "$dir" "$name"
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    tail -n 30 "$dir/deployd.log" >&2 || true
    exit 1
}
# Runs a command as the transcript shows it, output and all; fails the
# scenario unless it exits `$expect` (0 unless set).
step() {
    local expect=${expect:-0} code=0
    printf '\n$ %s\n' "$(python3 -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@")"
    "$@" 2>&1 | sed -e "s|$dir|~|g" -e "s|$name|shop|g" || code=${PIPESTATUS[0]}
    [ "$code" -eq "$expect" ] || fail "$* exited $code, not $expect"
}
reloads() { grep -c '\[auth\] reloaded' "$dir/deployd.log" || true; }
reload() {
    local before
    before=$(reloads)
    kill -HUP "$AGENT_PID"
    for _ in $(seq 1 300); do
        [ "$(reloads)" -gt "$before" ] && return 0
        sleep 0.1
    done
    fail "deployd did not reload"
}

api_port=$(agent_free_port)
agent_init "$dir" "$api_port"
agent_services "$name"
AGENT_CHECK=0 agent_add_app "$dir" "$name" "$name"
agent_start "$dir"

mkdir -p "$dir/home"
export HOME=$dir/home USER=alice
unset XDG_CONFIG_HOME DEPLOYCTL_TOKEN DEPLOYCTL_TOKEN_FILE SSH_AUTH_SOCK
export DEPLOYCTL_URL=https://localhost:$api_port DEPLOYCTL_CA_CERT=$dir/etc/tls/cert.pem DEPLOYCTL_APP=$name
PATH=$PWD/target/debug:$PATH

echo "# On the operator's machine: a key of their own."
step deployctl keygen --name alice
echo
echo "# On the host: trust it (the printed entry, with the scopes this operator needs), reload."
deployctl keygen --name alice --force --json >"$dir/key.json"
key=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["public_key"])' "$dir/key.json")
cat >>"$dir/etc/deployd.toml" <<TOML
[[auth.operators]]
name = "alice"
key = "$key"
scopes = ["read", "deploy", "rollback", "run", "logs"]
apps = ["$name"]
TOML
reload
echo "(appended [[auth.operators]] name = \"alice\", scopes read, deploy, rollback, run, logs; kill -HUP deployd)"

step deployctl whoami
step deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_1" --reason "first release"
step deployctl run -- python manage.py showmigrations shop
expect=3 step deployctl run -- sh -c 'echo checking; exit 3'
step deployctl logs --service web --tail 2
step deployctl deploy "$DEPLOYD_TESTBED_SHA_RELEASE_2"
step deployctl rollback --reason "release 2 misbehaves"
step deployctl history --limit 3

echo
echo "# The key already in the operator's ssh-agent, instead of a file."
eval "$(ssh-agent -s)" >/dev/null
ssh_agent=$SSH_AGENT_PID
ssh-keygen -q -t ed25519 -N '' -C alice@laptop -f "$dir/home/id_ed25519"
ssh-add -q "$dir/home/id_ed25519" 2>/dev/null
rm "$dir/home/id_ed25519" "$dir/home/.config/deployctl/id_ed25519"
sed -i "s|^key = \"$key\"|key = \"$(cat "$dir/home/id_ed25519.pub")\"|" "$dir/etc/deployd.toml"
reload
step ssh-add -l
step deployctl --ssh-agent whoami
echo
echo "# Revoked: the key taken out of deployd.toml, reload."
sed -i '/^\[\[auth.operators\]\]/,$d' "$dir/etc/deployd.toml"
reload
expect=6 step deployctl --ssh-agent status
