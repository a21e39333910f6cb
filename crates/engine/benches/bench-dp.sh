#!/usr/bin/env bash
# Data-parallel step time of mm-engine on this machine's CPUs: 1 rank vs 2 ranks (Gloo over
# 127.0.0.1) on `mm-engine synth`'s tiny model, for two shapes of work:
#   tiny       1 tile per image, micro batch 1, global batch 8   (overhead bound)
#   big        up to 6 tiles + thumbnail, micro batch 4, global batch 32   (more compute per step)
# Same global batch at every rank count, so the step does the same work; the ratio
# step(2 ranks) / step(1 rank) is what data parallelism buys here (1.0 = nothing, 0.5 = ideal).
# A third row runs 1 rank with every core for intra-op threads (MM_CPU_THREADS), the fair
# single-process baseline on a machine this small.
#
# Not a test: prints a table. Usage (from the repository root or anywhere):
#   crates/engine/benches/bench-dp.sh            # builds mm-engine --release first
#   MM_ENGINE_BIN=path/to/mm-engine ITERS=20 crates/engine/benches/bench-dp.sh
# ITERS (default 14) iterations per run; the first 4 are warm-up and not counted.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
ITERS="${ITERS:-14}"
WARMUP=4
if [[ -z "${MM_ENGINE_BIN:-}" ]]; then
    export VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
    (cd "$ROOT" && cargo build --release -p mm-engine >&2)
    MM_ENGINE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/mm-engine"
fi
BIN="$MM_ENGINE_BIN"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# No video record: decoding it through ffmpeg costs more than a tiny step and would measure
# the data thread, not data parallelism.
"$BIN" synth --out "$WORK/synth" --samples 32 --no-video >/dev/null
D="$WORK/synth"
CORES="$(nproc)"

# run NAME RANKS THREADS FLAGS… → the run's rank-0 stdout in $WORK/NAME.out
run() {
    local name=$1 ranks=$2 threads=$3
    shift 3
    local port=$((20000 + RANDOM % 20000)) pids=() r
    for ((r = 0; r < ranks; r++)); do
        env RANK=$r WORLD_SIZE=$ranks LOCAL_RANK=$r LOCAL_WORLD_SIZE=$ranks MASTER_ADDR=127.0.0.1 \
            MASTER_PORT=$port MM_DIST_TIMEOUT_S=120 ${threads:+MM_CPU_THREADS=$threads} \
            "$BIN" train --model tiny --device cpu --data-path "$D/data/train.jsonl" --data-folder "$D/data" \
            --tokenizer "$D/model" --load "$D/model" --lr 0.001 --seed 3 --log-interval 1 --log-tps \
            --loss-reduction per_token --train-iters "$ITERS" "$@" >"$WORK/$name.r$r.out" 2>"$WORK/$name.r$r.err" &
        pids+=($!)
    done
    for r in "${pids[@]}"; do
        wait "$r" || { cat "$WORK/$name".r*.err >&2; exit 1; }
    done
}

# stats NAME → "median_step_ms samples_per_s tokens_per_s" over the iterations after warm-up
stats() {
    python3 - "$WORK/$1.r0.out" "$WARMUP" <<'EOF'
import json, statistics, sys
steps = []
for line in open(sys.argv[1]):
    if line.startswith("@@mm-progress "):
        e = json.loads(line.split(" ", 1)[1])
        if e["event"] == "step":
            steps.append(e)
steps = steps[int(sys.argv[2]):]
ms = statistics.median(s["step_ms"] for s in steps)
sps = statistics.median(s["samples_per_sec"] for s in steps)
tps = statistics.median(s["tokens_per_sec"] for s in steps)
print(f"{ms:.1f} {sps:.2f} {tps:.0f}")
EOF
}

declare -A FLAGS=(
    [tiny]="--micro-batch-size 1 --global-batch-size 8 --seq-length 512 --max-dynamic-patch 1"
    [big]="--micro-batch-size 4 --global-batch-size 32 --seq-length 2048 --max-dynamic-patch 6 --use-thumbnail"
)
printf '%-6s %-22s %8s %13s %10s %10s %9s\n' config run threads "step ms (med)" samples/s tokens/s "vs 1 rank"
for cfg in tiny big; do
    # shellcheck disable=SC2086
    run "$cfg-1" 1 "" ${FLAGS[$cfg]}
    # shellcheck disable=SC2086
    run "$cfg-1all" 1 "$CORES" ${FLAGS[$cfg]}
    # shellcheck disable=SC2086
    run "$cfg-2" 2 "" ${FLAGS[$cfg]}
    # shellcheck disable=SC2086
    run "$cfg-2z" 2 "" ${FLAGS[$cfg]} --use-distributed-optimizer
    read -r base _ _ <<<"$(stats "$cfg-1")"
    for v in "1:1 rank" "1all:1 rank, all cores" "2:2 ranks" "2z:2 ranks, ZeRO-1"; do
        key=${v%%:*} label=${v#*:}
        read -r ms sps tps <<<"$(stats "$cfg-$key")"
        case $key in
            1) threads=$((CORES > 1 ? CORES - 1 : 1)) ;;
            1all) threads=$CORES ;;
            *) threads="$((CORES / 2 > 1 ? CORES / 2 - 1 : 1))×2" ;;
        esac
        ratio=$(python3 -c "print(f'{$ms / $base:.2f}')")
        printf '%-6s %-22s %8s %13s %10s %10s %9s\n' "$cfg" "$label" "$threads" "$ms" "$sps" "$tps" "$ratio"
    done
done
echo "machine: $CORES cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); $ITERS iterations, first $WARMUP not counted"
