#!/usr/bin/env bash
# The multi-host test rig: N "hosts" on this machine, each a network namespace on a private
# bridge, each running Debian's OpenSSH server with a generated host key and a generated
# login key. They share the file system and process table with this machine; only the
# network is separate, so `ip netns pids <ns>` lists what runs "on" a host.
#
#   scripts/rig.sh up N DIR      create hosts 1..N, keys and files in DIR (see below)
#   scripts/rig.sh down          stop everything in the namespaces, delete them and the bridge
#   scripts/rig.sh status        list the rig's namespaces and what runs in each
#
# DIR receives: id_test (login key), known_hosts (every host's key), hosts (one
# "name address namespace" line per host), sshd_hN.conf / host_key_hN / sshd_hN.log.
#
# RIG_NO_BASHRC=1: the hosts' sshd sets SHLVL=1 for sessions, so bash does not source
# ~/.bashrc for `ssh host cmd`. The rig's hosts share this machine's home directory; a
# ~/.bashrc that takes a lock (pyenv init does) then serializes every login across all
# "hosts", which separate machines never do. The benchmark reports both settings.
#
# Names (override with RIG_PREFIX, RIG_SUBNET): bridge ${RIG_PREFIX}br0 with
# ${RIG_SUBNET}.1/24, namespace ${RIG_PREFIX}-hN at ${RIG_SUBNET}.(N+1). There is no default
# route in the namespaces: traffic stays on the bridge. `up` first removes leftovers of a
# previous rig with the same prefix (a crashed test), so callers must serialize rigs that share
# a prefix (the Rust helper in tests/rig holds a file lock).
set -euo pipefail

PREFIX=${RIG_PREFIX:-mlr}
SUBNET=${RIG_SUBNET:-10.78.0}
BRIDGE="${PREFIX}br0"

die() { echo "rig: $*" >&2; exit 1; }

need() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces and sshd): run as root, as CI does"
  command -v ip >/dev/null || die "\`ip\` (iproute2) is missing: run scripts/setup.sh"
  ip netns list >/dev/null 2>&1 || die "\`ip netns\` does not work here (no network namespace support?)"
  [ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd is missing: run scripts/setup.sh (openssh-server)"
  command -v ssh-keygen >/dev/null || die "ssh-keygen is missing: run scripts/setup.sh (openssh-client)"
}

namespaces() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}-h[0-9]+$" || true
}

down() {
  local ns pids tries
  for ns in $(namespaces); do
    for tries in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -z "$pids" ] && break
      kill -9 $pids 2>/dev/null || true
      sleep 0.1
    done
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  # Host ends of veth pairs normally vanish with their namespace; remove strays anyway.
  for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${PREFIX}v[0-9]+$" || true); do
    ip link del "$l" 2>/dev/null || true
  done
}

up() {
  local n=$1 dir=$2 i ns addr
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "N must be 1..200, got '$n'"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  down
  mkdir -p /run/sshd
  chmod 0755 /run/sshd
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  rm -f "$dir/id_test" "$dir/id_test.pub"
  ssh-keygen -q -t ed25519 -N '' -C rig-login -f "$dir/id_test"
  cp "$dir/id_test.pub" "$dir/authorized_keys"
  : > "$dir/known_hosts"
  : > "$dir/hosts"
  for i in $(seq 1 "$n"); do
    ns="${PREFIX}-h$i"
    addr="$SUBNET.$((i + 1))"
    ip netns add "$ns"
    ip link add "${PREFIX}v$i" type veth peer name "${PREFIX}p$i"
    ip link set "${PREFIX}p$i" netns "$ns"
    ip -n "$ns" link set "${PREFIX}p$i" name eth0
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip link set "${PREFIX}v$i" master "$BRIDGE"
    ip link set "${PREFIX}v$i" up
    rm -f "$dir/host_key_h$i" "$dir/host_key_h$i.pub"
    ssh-keygen -q -t ed25519 -N '' -C "rig-h$i" -f "$dir/host_key_h$i"
    cat > "$dir/sshd_h$i.conf" <<EOF
ListenAddress $addr
Port 22
HostKey $dir/host_key_h$i
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd_h$i.pid
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UseDNS no
PrintMotd no
MaxSessions 100
MaxStartups 200
Subsystem sftp internal-sftp
LogLevel ERROR
EOF
    if [ "${RIG_NO_BASHRC:-0}" = 1 ]; then echo "SetEnv SHLVL=1" >> "$dir/sshd_h$i.conf"; fi
    ip netns exec "$ns" /usr/sbin/sshd -f "$dir/sshd_h$i.conf" -E "$dir/sshd_h$i.log"
    echo "$addr $(cut -d' ' -f1,2 "$dir/host_key_h$i.pub")" >> "$dir/known_hosts"
    echo "h$i $addr $ns" >> "$dir/hosts"
  done
  for i in $(seq 1 "$n"); do
    addr="$SUBNET.$((i + 1))"
    for tries in $(seq 1 50); do
      if timeout 1 bash -c "exec 3<>/dev/tcp/$addr/22" 2>/dev/null; then break; fi
      [ "$tries" = 50 ] && die "sshd on $addr did not come up (see $dir/sshd_h$i.log)"
      sleep 0.1
    done
  done
}

status() {
  local ns
  for ns in $(namespaces); do
    echo "$ns: $(ip -n "$ns" -o -4 addr show dev eth0 2>/dev/null | awk '{print $4}')"
    for p in $(ip netns pids "$ns" 2>/dev/null); do
      echo "  $p $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)"
    done
  done
}

case "${1:-}" in
  up) need; [ $# -eq 3 ] || die "usage: rig.sh up N DIR"; up "$2" "$3" ;;
  down) need; down ;;
  status) status ;;
  *) die "usage: rig.sh up N DIR | down | status" ;;
esac
