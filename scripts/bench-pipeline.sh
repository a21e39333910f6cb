#!/usr/bin/env bash
# Pipeline-parallel step time of mm-engine on this machine's CPUs (not a test: speed is printed,
# never asserted). One release build, one synthetic model with 8 LLM layers, then the same
# global batch under each layout, side by side:
#
#   1 process | PP2 | PP4 | PP2×VPP2 | DP2 | DP2×PP2 | TP2 | TP2+SP | TP2×PP2
#   (+ 1 process on 1 thread, for reference)
#
# All ranks on 127.0.0.1 (Gloo over loopback), each layout with the engine's default layer split.
# The same global batch everywhere, so a step does the same work and should give the same loss
# (the "loss" column: a layout that computes something else shows here first).
#
# Columns: median step time over the steps after the first (rank 0's @@mm-progress step_ms;
# every rank leaves a step at the same sync point), median global tokens/s, the step time
# relative to one process (1.00 = the same; below 1 = faster), and the theoretical pipeline
# bubble (pp−1) / (vpp·m + pp−1) with m = micro batches per data-parallel rank (mm-spec's
# `theoretical_bubble`; the engine prints the same number, which is cross-checked here). Engines
# that also print each stage's measured bubble ("pipeline stage S of P: X% of the forward/backward
# time in transfers and waits …") get it in the table too, averaged over the stages' ranks
# ("n/a" where the engine does not print it).
#
# Threads: each rank gets MM_CPU_THREADS = max(1, cores / ranks) intra-op threads, so 1 and 2
# ranks fill the cores exactly; with more ranks than cores (PP4, DP2×PP2 on 2 cores) the ranks
# share cores (1 thread each, marked "shared" in the table). Pipeline ranks idle in their bubbles,
# so sharing hurts them less than it would data-parallel ranks. The machine may be busy with
# other work: each layout runs REPEATS times, interleaved with the others, and the median is over
# all those runs' steps.
#
# Usage (from anywhere):
#   scripts/bench-pipeline.sh                         # builds mm-engine --release first
#   MM_ENGINE_BIN=path/to/mm-engine ITERS=12 REPEATS=2 MICRO=1 GLOBAL=8 scripts/bench-pipeline.sh
# About a minute on 2 cores with the defaults (plus the build when it is not up to date).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ITERS="${ITERS:-12}"
REPEATS="${REPEATS:-2}"
MICRO="${MICRO:-1}"
GLOBAL="${GLOBAL:-8}"
if [[ -z "${MM_ENGINE_BIN:-}" ]]; then
    export VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
    (cd "$ROOT" && cargo build --release -p mm-engine >&2)
    MM_ENGINE_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/mm-engine"
fi
BIN="$MM_ENGINE_BIN"
WORK="$(mktemp -d /tmp/mm-bench-pp.XXXXXX)"
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
# No video record: decoding it through ffmpeg on one rank's data thread would measure ffmpeg
# competing for the 2 cores, not the pipeline.
"$BIN" synth --llm-layers 8 --samples 32 --no-video --out "$WORK/synth" >/dev/null
D="$WORK/synth"
CORES="$(nproc)"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# run NAME RANKS THREADS REP FLAGS… → every rank's stdout in $WORK/NAME.REP.rN.out
run() {
    local name=$1 ranks=$2 threads=$3 rep=$4
    shift 4
    local port r i
    port="$(free_port)"
    PIDS=()
    for ((r = 0; r < ranks; r++)); do
        env RANK=$r WORLD_SIZE="$ranks" LOCAL_RANK=$r LOCAL_WORLD_SIZE="$ranks" MASTER_ADDR=127.0.0.1 \
            MASTER_PORT="$port" MM_DIST_TIMEOUT_S=120 MM_CPU_THREADS="$threads" \
            "$BIN" train --model tiny --device cpu --data-path "$D/data/train.jsonl" --data-folder "$D/data" \
            --tokenizer "$D/model" --load "$D/model" --lr 0.001 --seed 3 --log-interval 1 --log-tps \
            --micro-batch-size "$MICRO" --global-batch-size "$GLOBAL" --train-iters "$ITERS" --seq-length 512 \
            --max-dynamic-patch 1 --use-thumbnail "$@" \
            >"$WORK/$name.$rep.r$r.out" 2>"$WORK/$name.$rep.r$r.err" &
        PIDS+=($!)
    done
    # A rank that fails stops the run (its peers would otherwise wait out MM_DIST_TIMEOUT_S).
    for i in "${!PIDS[@]}"; do
        if ! wait "${PIDS[$i]}"; then
            echo "bench-pipeline: $name: rank $i failed; its stderr:" >&2
            cat "$WORK/$name.$rep.r$i.err" >&2
            exit 1
        fi
    done
    PIDS=()
}

# name:ranks:tp:pp:vpp:sp:label — the layouts, in table order.
LAYOUTS=(
    "one:1:1:1:1:0:1 process"
    "one1t:1:1:1:1:0:1 process, 1 thread"
    "pp2:2:1:2:1:0:PP2"
    "pp4:4:1:4:1:0:PP4"
    "pp2v2:2:1:2:2:0:PP2×VPP2"
    "dp2:2:1:1:1:0:DP2"
    "dp2pp2:4:1:2:1:0:DP2×PP2"
    "tp2:2:2:1:1:0:TP2"
    "tp2sp:2:2:1:1:1:TP2+SP"
    "tp2pp2:4:2:2:1:0:TP2×PP2"
)
threads_for() {
    local name=$1 ranks=$2
    if [[ $name == one1t ]]; then echo 1; else echo $((CORES / ranks > 1 ? CORES / ranks : 1)); fi
}

start=$SECONDS
for ((rep = 0; rep < REPEATS; rep++)); do
    for l in "${LAYOUTS[@]}"; do
        IFS=: read -r name ranks tp pp vpp sp _ <<<"$l"
        flags=()
        ((tp > 1)) && flags+=(--tensor-model-parallel-size "$tp")
        ((sp > 0)) && flags+=(--sequence-parallel)
        ((pp > 1)) && flags+=(--pipeline-model-parallel-size "$pp")
        ((vpp > 1)) && flags+=(--virtual-pipeline-model-parallel-size "$vpp")
        run "$name" "$ranks" "$(threads_for "$name" "$ranks")" "$rep" "${flags[@]}"
    done
done
elapsed=$((SECONDS - start))

rows=()
for l in "${LAYOUTS[@]}"; do
    IFS=: read -r name ranks _ _ _ _ _ <<<"$l"
    rows+=("$l:$(threads_for "$name" "$ranks")")
done
python3 - "$WORK" "$MICRO" "$GLOBAL" "$CORES" "${rows[@]}" <<'EOF'
import glob, json, re, statistics, sys

work, micro, global_batch, cores = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = []
for spec in sys.argv[5:]:
    name, ranks, tp, pp, vpp, _sp, label, threads = spec.split(":")
    ranks, tp, pp, vpp, threads = int(ranks), int(tp), int(pp), int(vpp), int(threads)
    dp = ranks // (pp * tp)
    m = global_batch // (micro * dp)  # micro batches per data-parallel rank
    bubble = (pp - 1) / (vpp * m + pp - 1)
    steps, losses, engine_bubble, measured = [], [], None, []
    for path in sorted(glob.glob(f"{work}/{name}.*.r0.out")):
        run = []
        for line in open(path):
            if line.startswith("@@mm-progress "):
                e = json.loads(line.split(" ", 1)[1])
                if e["event"] == "step":
                    run.append(e)
            elif (hit := re.search(r"theoretical bubble ([0-9.]+)%", line)):
                engine_bubble = float(hit.group(1)) / 100
        steps += run[1:]  # the first step warms up allocators and the data thread
        losses.append(run[-1]["loss"])
    for path in glob.glob(f"{work}/{name}.*.r*.out"):
        for line in open(path):
            if (hit := re.search(r"pipeline stage \d+ of \d+: ([0-9.]+)% of the forward/backward time", line)):
                measured.append(float(hit.group(1)) / 100)
    if engine_bubble is not None and abs(engine_bubble - bubble) > 5e-4:
        print(f"warning: {label}: the engine says bubble {engine_bubble:.1%}, the formula {bubble:.1%}", file=sys.stderr)
    if pp > 1 and engine_bubble is None:
        print(f"warning: {label}: the engine printed no theoretical bubble", file=sys.stderr)
    rows.append(dict(
        label=label, ranks=ranks, dp=dp, tp=tp, pp=pp, vpp=vpp, m=m, threads=threads,
        ms=statistics.median(s["step_ms"] for s in steps),
        tps=statistics.median(s["tokens_per_sec"] for s in steps),
        n=len(steps), loss=losses[-1], bubble=bubble,
        measured=f"{statistics.mean(measured):.1%}" if measured else ("n/a" if pp > 1 else "-"),
    ))
base = rows[0]["ms"]
print("| layout | ranks | dp | tp | pp | vpp | m | threads/rank | step ms (median) | tokens/s | vs 1 process | bubble (theory) | bubble (measured) | loss (last) |")
print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    shared = " (shared)" if r["ranks"] * r["threads"] > cores else ""
    print(f"| {r['label']} | {r['ranks']} | {r['dp']} | {r['tp']} | {r['pp']} | {r['vpp']} | {r['m']} | {r['threads']}{shared} "
          f"| {r['ms']:.1f} | {r['tps']:.0f} | {r['ms'] / base:.2f} | {r['bubble']:.1%} | {r['measured']} "
          f"| {r['loss']:.6f} |")
print()
print(f"median over {rows[0]['n']} steps per layout (all steps but the first of each run); "
      f"micro batch {micro}, global batch {global_batch}, seq 512, 1 tile + thumbnail, 8 LLM layers")
EOF
echo "machine: $CORES cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), load average $(cut -d' ' -f1-3 /proc/loadavg); $ITERS iterations × $REPEATS runs per layout; runs took ${elapsed}s"
