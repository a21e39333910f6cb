#!/usr/bin/env bash
# Benchmark of mm-convert hf-to-mm against `cp -r` + `sync` of the same bytes on the same disk
# (the converter fsyncs its output, so the baseline does too).
#
# Generates a synthetic InternVL3-8B-shaped checkpoint (8B layer shapes, fewer LLM layers; with
# the default 4 LLM layers it is 4.4 GiB of bf16), then ROUNDS times, alternating: `cp -r` of it,
# `hf-to-mm` to TP2 x PP4 in our layout and in MindSpeed-MM's (`--format mindspeed`, torch files),
# `mm-to-hf` back from each; each timed with GNU time after dropping the page
# cache (when root). Reports medians: wall time, throughput relative to cp, peak RSS against the
# largest tensor. Not run by the tests.
#
#   crates/convert/benches/bench-convert.sh            # WORK=/tmp/mm-convert-bench LLM_LAYERS=4 ROUNDS=3
#   KEEP=1 WORK=/data/bench ROUNDS=5 crates/convert/benches/bench-convert.sh
set -euo pipefail

WORK=${WORK:-/tmp/mm-convert-bench}
LLM_LAYERS=${LLM_LAYERS:-4}
ROUNDS=${ROUNDS:-3}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

if [ ! -x /usr/bin/time ]; then
    echo "installing GNU time (apt-get install -y time)" >&2
    apt-get install -y time >/dev/null
fi

(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release -p mm-convert --quiet)
BIN=$TARGET/release/mm-convert

rm -rf "$WORK"
mkdir -p "$WORK"
trap '[ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"' EXIT

"$BIN" synth-hf --out "$WORK/hf" --preset 8b --llm-layers "$LLM_LAYERS" --max-shard-size 5GB --seed 7 >&2
BYTES=$(du -sb "$WORK/hf" | cut -f1)
if [ "$BYTES" -lt 4000000000 ]; then
    echo "the synthetic checkpoint has only $BYTES bytes; raise LLM_LAYERS" >&2
    exit 1
fi
# Largest tensor: embed_tokens / lm_head, 151674 x 3584 bf16.
LARGEST=$((151674 * 3584 * 2))

# LLM layers over 4 stages, the remainder on the last ones.
LLM_LIST=""
for i in 0 1 2 3; do
    c=$((LLM_LAYERS / 4 + (i >= 4 - LLM_LAYERS % 4 ? 1 : 0)))
    LLM_LIST="$LLM_LIST${LLM_LIST:+,}$c"
done

drop_caches() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
}

# timed NAME CMD...: appends "seconds rss_kb" to $WORK/NAME.runs
timed() {
    local name=$1
    shift
    drop_caches
    /usr/bin/time -f "%e %M" -o "$WORK/$name.last" "$@" > /dev/null 2> "$WORK/$name.err"
    cat "$WORK/$name.last" >> "$WORK/$name.runs"
}

for r in $(seq "$ROUNDS"); do
    # The converter fsyncs what it writes (a crash never leaves a complete-looking folder that
    # is not on disk), so the baseline is cp -r followed by sync.
    timed cp bash -c 'cp -r "$1" "$2" && sync' _ "$WORK/hf" "$WORK/cp"
    rm -rf "$WORK/cp" "$WORK/mm" "$WORK/back"
    timed to_mm "$BIN" hf-to-mm --hf-dir "$WORK/hf" --mm-dir "$WORK/mm" --tp 2 \
        --llm-pp-layers "$LLM_LIST" --vit-pp-layers 24,0,0,0
    timed to_hf "$BIN" mm-to-hf --mm-dir "$WORK/mm" --hf-dir "$WORK/back"
    rm -rf "$WORK/ms" "$WORK/back_ms"
    timed to_ms "$BIN" hf-to-mm --format mindspeed --hf-dir "$WORK/hf" --mm-dir "$WORK/ms" --tp 2 \
        --llm-pp-layers "$LLM_LIST" --vit-pp-layers 24,0,0,0
    timed ms_hf "$BIN" mm-to-hf --mm-dir "$WORK/ms" --hf-dir "$WORK/back_ms" --assets-from "$WORK/hf"
    echo "round $r: cp $(cut -d' ' -f1 < "$WORK/cp.last") s, hf-to-mm $(cut -d' ' -f1 < "$WORK/to_mm.last") s, mm-to-hf $(cut -d' ' -f1 < "$WORK/to_hf.last") s, --format mindspeed $(cut -d' ' -f1 < "$WORK/to_ms.last") s, back $(cut -d' ' -f1 < "$WORK/ms_hf.last") s" >&2
done
OUT_BYTES=$(du -sb "$WORK/mm" | cut -f1)

median() { # median of column $2 of file $1
    cut -d' ' -f"$2" "$1" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

awk -v bytes="$BYTES" -v out="$OUT_BYTES" -v rounds="$ROUNDS" \
    -v cp="$(median "$WORK/cp.runs" 1)" -v conv="$(median "$WORK/to_mm.runs" 1)" -v back="$(median "$WORK/to_hf.runs" 1)" \
    -v rss="$(median "$WORK/to_mm.runs" 2)" -v brss="$(median "$WORK/to_hf.runs" 2)" -v largest="$LARGEST" \
    -v ms="$(median "$WORK/to_ms.runs" 1)" -v msrss="$(median "$WORK/to_ms.runs" 2)" \
    -v msback="$(median "$WORK/ms_hf.runs" 1)" -v msbrss="$(median "$WORK/ms_hf.runs" 2)" 'BEGIN {
    gib = 1024 * 1024 * 1024; mib = 1024 * 1024
    limit = 2 * largest + 256 * mib
    printf "input      %.2f GiB (synthetic 8B shapes), output %.2f GiB (TP2 x PP4); medians of %d rounds\n", bytes / gib, out / gib, rounds
    printf "cp -r+sync %6.2f s  %5.2f GiB/s\n", cp, bytes / gib / cp
    printf "hf-to-mm   %6.2f s  %5.2f GiB/s  throughput vs cp %.2f (target >= 0.70)\n", conv, bytes / gib / conv, cp / conv
    printf "mm-to-hf   %6.2f s  %5.2f GiB/s  throughput vs cp %.2f\n", back, bytes / gib / back, cp / back
    printf "peak RSS   hf-to-mm %.0f MiB, mm-to-hf %.0f MiB; largest tensor %.0f MiB; target <= %.0f MiB\n",
        rss * 1024 / mib, brss * 1024 / mib, largest / mib, limit / mib
    printf "mindspeed  hf-to-mm %6.2f s (vs cp %.2f, peak RSS %.0f MiB); mm-to-hf from it %6.2f s (vs cp %.2f, peak RSS %.0f MiB)\n",
        ms, cp / ms, msrss * 1024 / mib, msback, cp / msback, msbrss * 1024 / mib
}'
