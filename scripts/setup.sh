#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine (root), idempotently:
#   - Debian packages: libgloo-dev (c10d Gloo headers), openssh-server + iproute2 (multi-host rig),
#     slurmctld + slurmd + munge + slurm-client (a real Slurm on the rig: scripts/slurm-rig.sh),
#     pdsh (benchmark baseline), ffmpeg (video decoding), pkg-config/libssl-dev (ssh2 build)
#   - a project-local venv in .venv with torch==2.11.0 (the libtorch tch 0.24 links against)
# Each part is skipped when already present, so a warm run takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip keeps no copy of the wheels (torch's CUDA wheels are about 3 GB) beside the venv.
export PIP_NO_CACHE_DIR=1
avail_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${avail_kb:-0}" -lt $((9 * 1024 * 1024)) ] && [ ! -d target/debug ]; then
  echo "setup: warning: $((avail_kb / 1024 / 1024)) GB free on $(df -P . | awk 'NR==2 {print $6}');" \
       "a first \`make test\` needs about 8 GB (venv 4.9 GB, target/ 2.0 GB in CI)" >&2
fi

APT_PKGS=(libgloo-dev openssh-server openssh-client iproute2 pdsh ffmpeg pkg-config libssl-dev cmake slurmctld slurmd munge slurm-client)
TORCH_VERSION=2.11.0

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install Debian packages: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into .venv (about 4.6 GB)"
  .venv/bin/pip install -q "torch==$TORCH_VERSION"
fi
# The CUDA headers that ProcessGroupNCCL.hpp includes (crt/, nv/target) are not in the
# runtime wheel torch pulls in; these two header-only wheels complete them, so the engine
# compiles its NCCL path here and runs it on the GPU machine. Pinned to torch's CUDA 13.0.
if [ ! -e .venv/lib/python*/site-packages/nvidia/cu13/include/nv/target ] \
   || [ ! -e .venv/lib/python*/site-packages/nvidia/cu13/include/crt/host_config.h ]; then
  echo "setup: installing CUDA 13.0 header wheels (cccl, crt) into .venv"
  .venv/bin/pip install -q "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*"
fi
# Python packages the tests use as references (transformers, Pillow, ...), pinned in
# scripts/requirements.txt; reinstalled only when that file changes.
if [ -f scripts/requirements.txt ]; then
  want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
  have=$(cat .venv/.requirements.sha256 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    echo "setup: installing scripts/requirements.txt into .venv"
    .venv/bin/pip install -q -r scripts/requirements.txt
    echo "$want" > .venv/.requirements.sha256
  fi
fi
echo "setup: ok"
