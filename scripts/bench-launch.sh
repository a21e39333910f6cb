#!/usr/bin/env bash
# Launcher benchmark (not part of the test suite): on HOSTS rig hosts × RANKS ranks, compare
# `launch` with pdsh (`pdsh -R ssh`) running the same program on the same hosts, in one run.
#
#   1. fan-out: wall time from starting the tool to every rank running (each rank records the
#      time it started; the latest one counts). launch runs with --no-checks (pdsh checks
#      nothing either) and with the checks, for reference. Median of REPEAT runs each,
#      alternating, after one warm-up of each (the warm-up also uploads launch's agent).
#      Twice: with the login shell sourcing ~/.bashrc as usual, then without (the rig's hosts
#      share one home, so a ~/.bashrc that takes a lock serializes logins across hosts; see
#      RIG_NO_BASHRC in scripts/rig.sh). Both tools run under the same setting each time.
#   2. log collection: every rank prints LINES lines as fast as it can (seq); throughput is
#      all lines / wall time of the tool, and every line is counted afterwards (none lost):
#      launch's per-rank logs and launch.log, pdsh's captured output.
#
#   sudo scripts/bench-launch.sh [HOSTS=8] [RANKS=8] [LINES=400000] [REPEAT=5]
#   LAUNCH_BIN=path/to/launch   a prebuilt release binary (default: build target/release/launch)
#
# Needs root (scripts/rig.sh), pdsh and openssh-client. Prints a table and the two ratios.
set -euo pipefail
HOSTS=${1:-8}
RANKS=${2:-8}
LINES=${3:-400000}
REPEAT=${4:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RIG="$ROOT/scripts/rig.sh"

command -v pdsh >/dev/null || { echo "bench: pdsh is missing (scripts/setup.sh installs it)" >&2; exit 1; }
if [ -z "${LAUNCH_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -p launch >&2)
  LAUNCH_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/launch"
fi
[ -x "$LAUNCH_BIN" ] || { echo "bench: no launch binary at $LAUNCH_BIN" >&2; exit 1; }
VERSION=$("$LAUNCH_BIN" --version | awk '{print $2}')

DIR=$(mktemp -d /tmp/mm-bench.XXXXXX)
cleanup() {
  bash "$RIG" down >/dev/null 2>&1 || true
  rm -rf "$DIR"
  if [ -n "${CACHE_KEY:-}" ]; then rm -rf "$HOME/.cache/mm-launch/$CACHE_KEY"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
bash "$RIG" up "$HOSTS" "$DIR/rig" >&2
CACHE_KEY=$("$LAUNCH_BIN" agent --cache-key)
OUT="$DIR/out"
mkdir -p "$OUT"

# The program: records when it started (mode start) or prints LINES lines (mode spew).
cat > "$DIR/prog.sh" <<EOF
#!/bin/bash
if [ "\${1:-}" = "--version" ]; then echo "mm-engine $VERSION"; exit 0; fi
case "\$BENCH_MODE" in
  start) date +%s.%N > "$OUT/start-\$RANK" ;;
  spew) exec seq -f "rank \$RANK line %.0f" 1 "\$BENCH_LINES" ;;
esac
EOF
chmod +x "$DIR/prog.sh"

# The same program under pdsh: each host starts its RANKS ranks with RANK set, like launch.
cat > "$DIR/pdsh-node.sh" <<EOF
#!/bin/bash
ns=\$(ip netns identify \$\$); node=\$(( \${ns##*-h} - 1 ))
for l in \$(seq 0 $((RANKS - 1))); do
  RANK=\$((node * $RANKS + l)) BENCH_MODE=\$1 BENCH_LINES=$LINES "$DIR/prog.sh" &
done
wait
EOF
chmod +x "$DIR/pdsh-node.sh"

cluster() { # $1: mode
  {
    echo "name: bench"
    echo "hosts:"
    while read -r name addr _ns; do echo "  - {address: $addr, name: $name}"; done < "$DIR/rig/hosts"
    echo "accelerator: cpu"
    echo "devices_per_node: $RANKS"
    echo "master: {port: 0}"
    echo "local: false"
    echo "ssh: {user: root, identity_files: [$DIR/rig/id_test], known_hosts: $DIR/rig/known_hosts, agent: false}"
    echo "engine: $DIR/prog.sh"
    echo "workdir: $DIR/work"
    echo "log_dir: $DIR/logs"
    echo "env: {BENCH_MODE: $1, BENCH_LINES: '$LINES'}"
  } > "$DIR/cluster-$1.yaml"
}
# What the environment checks look for (the tiny recipe's paths, relative to the workdir).
mkdir -p "$DIR/work/runs/tiny/model" "$DIR/work/runs/tiny/data"
echo '{}' > "$DIR/work/runs/tiny/data/train.jsonl"
cluster start
cluster spew
WORLD=$((HOSTS * RANKS))
GB=$WORLD
ADDRS=$(awk '{print $2}' "$DIR/rig/hosts" | paste -sd, -)
export PDSH_RCMD_TYPE=ssh
export PDSH_SSH_ARGS_APPEND="-l root -i $DIR/rig/id_test -o UserKnownHostsFile=$DIR/rig/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes"

now() { date +%s.%N; }
latest_start() { cat "$OUT"/start-* | sort -n | tail -1; }
count_starts() { ls "$OUT" | grep -c '^start-' || true; }

fanout_launch() { # $@: extra launch flags; prints seconds to all ranks running
  rm -f "$OUT"/start-*
  local t0; t0=$(now)
  "$LAUNCH_BIN" --cluster "$DIR/cluster-start.yaml" finetune tiny --set "train.global_batch_size=$GB" "$@" \
    >/dev/null 2>"$DIR/launch.err" || { cat "$DIR/launch.err" >&2; exit 1; }
  [ "$(count_starts)" = "$WORLD" ] || { echo "bench: launch started $(count_starts)/$WORLD ranks" >&2; exit 1; }
  echo "$(latest_start) - $t0" | bc
}

fanout_pdsh() {
  rm -f "$OUT"/start-*
  local t0; t0=$(now)
  pdsh -R ssh -w "$ADDRS" "$DIR/pdsh-node.sh start" >/dev/null 2>"$DIR/pdsh.err" || { cat "$DIR/pdsh.err" >&2; exit 1; }
  [ "$(count_starts)" = "$WORLD" ] || { echo "bench: pdsh started $(count_starts)/$WORLD ranks" >&2; exit 1; }
  echo "$(latest_start) - $t0" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

fanout_round() { # $1: label; sets FL FP FC (medians)
  echo "bench: fan-out, $1" >&2
  fanout_launch --no-checks >/dev/null # warm-up (the first one uploads the agent)
  fanout_pdsh >/dev/null
  : > "$DIR/fl"; : > "$DIR/fp"; : > "$DIR/fc"
  for i in $(seq 1 "$REPEAT"); do
    fanout_launch --no-checks >> "$DIR/fl"
    fanout_pdsh >> "$DIR/fp"
    fanout_launch >> "$DIR/fc"
  done
  FL=$(median < "$DIR/fl"); FP=$(median < "$DIR/fp"); FC=$(median < "$DIR/fc")
  echo "bench:   launch runs $(tr '\n' ' ' < "$DIR/fl")| pdsh runs $(tr '\n' ' ' < "$DIR/fp")" >&2
}

echo "bench: $HOSTS hosts × $RANKS ranks, launch $VERSION ($LAUNCH_BIN), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
fanout_round "logins source ~/.bashrc (shared by every rig host)"
FL1=$FL; FP1=$FP; FC1=$FC
# Same hosts without ~/.bashrc at login (see RIG_NO_BASHRC in scripts/rig.sh).
for i in $(seq 1 "$HOSTS"); do
  echo "SetEnv SHLVL=1" >> "$DIR/rig/sshd_h$i.conf"
  kill "$(cat "$DIR/rig/sshd_h$i.pid")"
done
sleep 0.3
for i in $(seq 1 "$HOSTS"); do
  ip netns exec "$(awk -v n="h$i" '$1 == n {print $3}' "$DIR/rig/hosts")" /usr/sbin/sshd -f "$DIR/rig/sshd_h$i.conf" -E "$DIR/rig/sshd_h$i.log"
done
sleep 0.3
fanout_round "logins without ~/.bashrc"
FL2=$FL; FP2=$FP; FC2=$FC

# Log collection.
TOTAL=$((WORLD * LINES))
rm -rf "$DIR/logs"
t0=$(now)
"$LAUNCH_BIN" --cluster "$DIR/cluster-spew.yaml" finetune tiny --set "train.global_batch_size=$GB" --no-checks \
  >/dev/null 2>"$DIR/launch.err" || { cat "$DIR/launch.err" >&2; exit 1; }
t1=$(now)
TL=$(echo "$t1 - $t0" | bc)
RUN="$DIR/logs/$(readlink "$DIR/logs/latest")"
lost=0
for h in $(awk '{print $1}' "$DIR/rig/hosts"); do
  for f in "$RUN/$h"/rank-*.log; do
    r=${f##*rank-}; r=${r%.log}
    n=$(wc -l < "$f")
    last=$(tail -1 "$f")
    if [ "$n" != "$LINES" ] || [ "$last" != "rank $r line $LINES" ]; then
      echo "bench: launch lost lines: $f has $n lines, last '$last'" >&2; lost=1
    fi
  done
done
AGG=$(grep -c '^\[h[0-9]* r[0-9]*\] rank ' "$RUN/launch.log" || true)
[ "$AGG" = "$TOTAL" ] || { echo "bench: launch.log has $AGG of $TOTAL rank lines" >&2; lost=1; }

t0=$(now)
pdsh -R ssh -w "$ADDRS" "$DIR/pdsh-node.sh spew" > "$DIR/pdsh.out" 2>"$DIR/pdsh.err"
t1=$(now)
TP=$(echo "$t1 - $t0" | bc)
PN=$(grep -c ' line ' "$DIR/pdsh.out" || true)
[ "$PN" = "$TOTAL" ] || echo "bench: pdsh output has $PN of $TOTAL lines" >&2

rate() { echo "$1 / $2" | bc -l | awk '{printf "%.0f", $1}'; }
RL=$(rate "$TOTAL" "$TL"); RP=$(rate "$PN" "$TP")
printf '\n%-52s %12s %12s\n' "" "launch" "pdsh -R ssh"
printf '%-52s %11.3fs %11.3fs\n' "fan-out to all $WORLD ranks running, with ~/.bashrc" "$FL1" "$FP1"
printf '%-52s %11.3fs %12s\n' "  same, launch with its environment checks" "$FC1" "-"
printf '%-52s %11.3fs %11.3fs\n' "fan-out to all $WORLD ranks running, no ~/.bashrc" "$FL2" "$FP2"
printf '%-52s %11.3fs %12s\n' "  same, launch with its environment checks" "$FC2" "-"
printf '%-52s %11.2fs %11.2fs\n' "log collection: $TOTAL lines, wall" "$TL" "$TP"
printf '%-52s %12s %12s\n' "log collection: lines/s" "$RL" "$RP"
printf '%-52s %12s %12s\n' "lines lost" "$([ $lost = 0 ] && echo 0 || echo SOME)" "$((TOTAL - PN))"
echo
ratio() { echo "$1 / $2" | bc -l | awk '{printf "%.2f", $1}'; }
echo "fan-out ratio launch/pdsh: $(ratio "$FL1" "$FP1") with ~/.bashrc, $(ratio "$FL2" "$FP2") without (target ≤ 0.5)"
echo "log throughput: $RL lines/s (target ≥ 1000000), $(echo "$RL / $RP" | bc -l | awk '{printf "%.2f", $1}')× pdsh"
[ $lost = 0 ]
