#!/usr/bin/env bash
# A real Slurm on the multi-host rig (scripts/rig.sh): Debian's slurmctld, slurmd and munge,
# one slurmd per rig host (each network namespace is a node h1..hN at its rig address), the
# controller and munged in h1's namespace. Everything runs inside the rig's namespaces, so
# `rig.sh down` (and the Rust rig's Drop) tears it down on every path.
#
#   scripts/slurm-rig.sh up DIR      DIR: a rig directory (rig.sh up N DIR wrote DIR/hosts)
#   scripts/slurm-rig.sh status DIR  sinfo
#
# Writes DIR/slurm/slurm.conf (point SLURM_CONF at it for srun, salloc, sbatch, scancel),
# cgroup.conf, the munge key and socket, and the daemons' logs (DIR/slurm/*.log). The nodes
# have CPUs=<nproc> each and one partition `rig`; process tracking is proctrack/linuxproc (no
# cgroup confinement: the rig's hosts share one machine).
set -euo pipefail

die() { echo "slurm-rig: $*" >&2; exit 1; }

up() {
  local dir=$1 s ctl_ns ctl_addr cpus host addr ns i
  [ -f "$dir/hosts" ] || die "$dir/hosts is missing: run scripts/rig.sh up N $dir first"
  for b in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/srun; do
    [ -x "$b" ] || die "$b is missing: run scripts/setup.sh (slurmctld, slurmd, munge, slurm-client)"
  done
  s="$dir/slurm"
  mkdir -p "$s/ctld"
  read -r _ ctl_addr ctl_ns < <(head -1 "$dir/hosts")
  cpus=$(nproc)
  # A key of its own: the machine's /etc/munge key belongs to the munge user.
  head -c 1024 /dev/urandom > "$s/munge.key"
  chmod 400 "$s/munge.key"
  ip netns exec "$ctl_ns" /usr/sbin/munged --force --socket="$s/munge.sock" --key-file="$s/munge.key" \
    --pid-file="$s/munged.pid" --log-file="$s/munged.log" --seed-file="$s/munged.seed"
  {
    echo "ClusterName=mmrig"
    # slurmctld checks that its host name is the controller's; the rig's namespaces share it.
    echo "SlurmctldHost=$(hostname -s)($ctl_addr)"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "AuthInfo=socket=$s/munge.sock"
    echo "CredType=cred/munge"
    echo "StateSaveLocation=$s/ctld"
    echo "SlurmdSpoolDir=$s/slurmd-%n"
    echo "SlurmctldPidFile=$s/slurmctld.pid"
    echo "SlurmdPidFile=$s/slurmd-%n.pid"
    echo "SlurmctldLogFile=$s/slurmctld.log"
    echo "SlurmdLogFile=$s/slurmd-%n.log"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/builtin"
    echo "ReturnToService=2"
    echo "MpiDefault=none"
    # A node whose slurmd stops answering is declared down after this long.
    echo "SlurmdTimeout=10"
    echo "InactiveLimit=0"
    echo "KillWait=5"
    echo "MessageTimeout=5"
    while read -r host addr ns; do
      echo "NodeName=$host NodeAddr=$addr CPUs=$cpus State=UNKNOWN"
    done < "$dir/hosts"
    echo "PartitionName=rig Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } > "$s/slurm.conf"
  # The rig has cgroup v1 hierarchies; slurmd 22.05 loads the cgroup plugin whatever tracks.
  printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n' > "$s/cgroup.conf"
  export SLURM_CONF="$s/slurm.conf"
  ip netns exec "$ctl_ns" /usr/sbin/slurmctld -f "$s/slurm.conf" -i
  while read -r host addr ns; do
    ip netns exec "$ns" /usr/sbin/slurmd -f "$s/slurm.conf" -N "$host"
  done < "$dir/hosts"
  local n
  n=$(wc -l < "$dir/hosts")
  for i in $(seq 1 100); do
    if [ "$(sinfo -h -t idle -o '%D' 2>/dev/null | awk '{s+=$1} END {print s+0}')" = "$n" ]; then
      echo "slurm-rig: $n nodes idle (SLURM_CONF=$s/slurm.conf)"
      return 0
    fi
    sleep 0.2
  done
  sinfo >&2 || true
  tail -5 "$s/slurmctld.log" >&2 || true
  die "the nodes did not come up within 20 s (logs in $s)"
}

case "${1:-}" in
  up) [ $# -eq 2 ] || die "usage: slurm-rig.sh up DIR"; up "$2" ;;
  status) SLURM_CONF="$2/slurm/slurm.conf" sinfo ;;
  *) die "usage: slurm-rig.sh up DIR | status DIR" ;;
esac
