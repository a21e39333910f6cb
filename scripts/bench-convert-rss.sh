#!/usr/bin/env bash
# Peak RSS of mm-convert hf-to-mm and mm-to-hf, side by side, on a synthetic InternVL3-8B-shaped
# checkpoint (8B layer shapes and the 151674 x 3584 vocabulary, few layers: embed_tokens and
# lm_head are the largest tensors, 1037 MiB each in bf16). Each direction runs under GNU time
# (`/usr/bin/time -v`, "Maximum resident set size"), ROUNDS times; the maximum is reported,
# against the target 2 x largest tensor + 256 MiB.
#
# mm-to-hf writes --max-shard-size MAX_SHARD files (default 500MB, so the few-layer checkpoint
# gives several output files written in parallel, as a full-depth 8B's 5 GB shards do);
# THREADS (default: the cores) is passed as --threads to both directions.
# BIN_BEFORE=path/to/old/mm-convert measures that binary too, for a before/after table.
#
#   scripts/bench-convert-rss.sh                   # WORK=/tmp/mm-convert-rss LLM_LAYERS=2 VIT_LAYERS=1 TP=2
#   TP=4 THREADS=1 BIN_BEFORE=/tmp/old/mm-convert scripts/bench-convert-rss.sh
#
# Needs 3 x the checkpoint size on disk (about 9 GiB with the defaults). Not run by the tests.
set -euo pipefail

WORK=${WORK:-/tmp/mm-convert-rss}
LLM_LAYERS=${LLM_LAYERS:-2}
VIT_LAYERS=${VIT_LAYERS:-1}
VOCAB=${VOCAB:-151674}
TP=${TP:-2}
THREADS=${THREADS:-$(nproc)}
MAX_SHARD=${MAX_SHARD:-500000000}
ROUNDS=${ROUNDS:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

if [ ! -x /usr/bin/time ]; then
    echo "needs GNU time: apt-get install -y time" >&2
    exit 1
fi

(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET cargo build --release -p mm-convert --quiet)
BIN=${BIN:-$TARGET/release/mm-convert}

rm -rf "$WORK"
mkdir -p "$WORK"
trap '[ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"' EXIT

"$BIN" synth-hf --out "$WORK/hf" --preset 8b --llm-layers "$LLM_LAYERS" --vit-layers "$VIT_LAYERS" \
    --vocab "$VOCAB" --seed 7 >&2
HIDDEN=3584
LARGEST=$((VOCAB * HIDDEN * 2))
LIMIT_KB=$(((2 * LARGEST + 256 * 1024 * 1024) / 1024))

# LLM layers on 2 stages, ViT on the first.
LLM_LIST="$((LLM_LAYERS / 2)),$((LLM_LAYERS - LLM_LAYERS / 2))"
VIT_LIST="$VIT_LAYERS,0"

# rss_kb CMD...: runs CMD under GNU time, prints its maximum resident set size in KiB.
rss_kb() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; fi
    /usr/bin/time -v -o "$WORK/time.txt" "$@" > /dev/null 2> "$WORK/err.txt" || {
        cat "$WORK/err.txt" >&2
        return 1
    }
    awk -F': ' '/Maximum resident set size/ { print $2 }' "$WORK/time.txt"
}

# measure LABEL BIN: the max over ROUNDS of each direction's peak RSS.
measure() {
    local label=$1 bin=$2 to_mm=0 to_hf=0 r k
    for r in $(seq "$ROUNDS"); do
        rm -rf "$WORK/mm" "$WORK/back"
        k=$(rss_kb "$bin" hf-to-mm --hf-dir "$WORK/hf" --mm-dir "$WORK/mm" --tp "$TP" \
            --llm-pp-layers "$LLM_LIST" --vit-pp-layers "$VIT_LIST" --threads "$THREADS")
        [ "$k" -gt "$to_mm" ] && to_mm=$k
        k=$(rss_kb "$bin" mm-to-hf --mm-dir "$WORK/mm" --hf-dir "$WORK/back" \
            --max-shard-size "$MAX_SHARD" --threads "$THREADS")
        [ "$k" -gt "$to_hf" ] && to_hf=$k
        rm -rf "$WORK/back"
    done
    printf '%-8s hf-to-mm %5d MiB   mm-to-hf %5d MiB\n' "$label" $((to_mm / 1024)) $((to_hf / 1024))
    echo "$to_hf" > "$WORK/$label.to_hf"
    echo "$to_mm" > "$WORK/$label.to_mm"
}

BYTES=$(du -sb "$WORK/hf" | cut -f1)
echo "checkpoint $((BYTES / 1024 / 1024)) MiB (8B shapes, $LLM_LAYERS LLM + $VIT_LAYERS ViT layers, vocab $VOCAB)," \
    "tp $TP x pp 2, --threads $THREADS, mm-to-hf --max-shard-size $MAX_SHARD; max of $ROUNDS round(s)"
echo "largest tensor $((LARGEST / 1024 / 1024)) MiB; target <= $((LIMIT_KB / 1024)) MiB peak RSS"
if [ -n "${BIN_BEFORE:-}" ]; then
    measure before "$BIN_BEFORE"
fi
measure after "$BIN"
for f in to_mm to_hf; do
    if [ "$(cat "$WORK/after.$f")" -gt "$LIMIT_KB" ]; then
        echo "FAIL: $f over the target" >&2
        exit 1
    fi
done
