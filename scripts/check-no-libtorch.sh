#!/usr/bin/env bash
# The launcher and the converter must build on a login node without PyTorch: neither may
# depend on tch/torch-sys, directly or through another crate.
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in launch mm-convert mm-spec; do
  if cargo tree -p "$pkg" -e normal,build --prefix none 2>/dev/null | grep -Eq '^(tch|torch-sys) v'; then
    echo "error: $pkg depends on libtorch (tch/torch-sys): only mm-engine may" >&2
    cargo tree -p "$pkg" -e normal,build -i torch-sys >&2 || true
    exit 1
  fi
done
echo "no-libtorch: launch, mm-convert and mm-spec do not depend on tch/torch-sys"
