#!/usr/bin/env bash
# Stages what the GPU test machine needs for scripts/gpu-check.sh into one folder (default
# target/gpu-bundle, under the ignored target/): that machine has PyTorch but no Rust toolchain,
# so everything is built here.
#
#   scripts/gpu-bundle.sh [DIR]
#
#   DIR/mm-engine      the release binary, stripped (about 9 MB instead of over 100 MB; the
#                      device tool carries at most 64 MiB). Its RUNPATH, which names this
#                      machine's venv, is overwritten with a path that exists nowhere, so the
#                      binary finds libtorch only through LD_LIBRARY_PATH, as it must there: a
#                      dry run here (`DIR/gpu-check.sh --cpu`) then tests the same lookup.
#   DIR/synth/         `mm-engine synth --no-video`: a tiny checkpoint (for --cpu), its
#                      512-token tokenizer and 64 image/text records (no video: the GPU machine
#                      has no ffmpeg for us to count on)
#   DIR/gpu-check.sh   the check itself
#   DIR/BUILD          commit, build flags and `mm-engine doctor` of the binary
#
# Needs NCCL compiled in (the build venv's CUDA/NCCL header wheels, scripts/setup.sh): the
# bundle is refused otherwise, since the check's NCCL step could only fail.
# On the device machine, from the repository root (the bundle carried as target/gpu-bundle):
#   bash target/gpu-bundle/gpu-check.sh          # results in $OUT (default ./gpu-out)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
DIR="${1:-$TARGET/gpu-bundle}"
export VIRTUAL_ENV="$ROOT/.venv" PATH="$ROOT/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
(cd "$ROOT" && cargo build --release -p mm-engine >&2)
BIN="$TARGET/release/mm-engine"

DOCTOR="$("$BIN" doctor --json)"
if ! grep -q '"nccl_compiled": true' <<<"$DOCTOR"; then
    echo "gpu-bundle: this mm-engine was built without NCCL ($BIN doctor says so); install the CUDA/NCCL" \
        "header wheels (scripts/setup.sh) and unset MM_ENGINE_NO_NCCL, then rebuild" >&2
    exit 1
fi

rm -rf "$DIR"
mkdir -p "$DIR"
strip -o "$DIR/mm-engine" "$BIN"
# Overwrite the RUNPATH string in place with a shorter one, NUL-padded (no patchelf needed).
python3 - "$DIR/mm-engine" <<'EOF'
import re, subprocess, sys
path = sys.argv[1]
dyn = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
hit = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", dyn)
if hit:
    old = hit.group(1).encode() + b"\0"
    new = b"/nonexistent/mm-engine-runpath"
    data = open(path, "rb").read()
    assert data.count(old) == 1 and len(new) < len(old), f"RUNPATH {old!r} not found once or too short"
    open(path, "wb").write(data.replace(old, new.ljust(len(old), b"\0")))
EOF
"$BIN" synth --out "$DIR/synth" --samples 64 --no-video >/dev/null
cp "$ROOT/scripts/gpu-check.sh" "$DIR/gpu-check.sh"
{
    echo "commit $(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" diff --quiet HEAD -- crates || echo ' (crates/ modified)')"
    echo "built $(date -u +%FT%TZ) on $(hostname), $(rustc --version)"
    echo "$DOCTOR"
} >"$DIR/BUILD"
readelf -d "$DIR/mm-engine" | grep -E 'RUNPATH|RPATH' || true
du -sh "$DIR"/* && du -sh "$DIR"
