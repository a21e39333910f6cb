#!/usr/bin/env bash
# mm-engine on one NVIDIA GPU: a prepared check for the GPU test machine (PyTorch 2.11 cu130 in
# a venv, no Rust toolchain, no network). It builds nothing: scripts/gpu-bundle.sh stages the
# release binary, a small synthetic data set and this script into one folder (default
# target/gpu-bundle), which travels to that machine. There, from the repository root:
#
#   bash target/gpu-bundle/gpu-check.sh            # OUT=folder for the results (default ./gpu-out)
#   bash target/gpu-bundle/gpu-check.sh --cpu      # the same steps on the CPU, a tiny model (dry run)
#
# Steps, each recorded; any failure is printed as it happens and makes the script exit 1 at the
# end (the later steps still run, so one expensive run on the machine reports everything):
#   1. libraries: mm-engine links libtorch by soname; LD_LIBRARY_PATH is set to the torch/lib of
#      this machine's python (`ldd` must find every library there)
#   2. nvidia-smi, and torch.cuda as PyTorch sees it (device, capability, memory, NCCL version)
#   3. `mm-engine doctor --json`: CUDA visible to the engine (tch), NCCL compiled into this build
#   4. `mm-engine collective-check --device cuda` at world size 1: NCCL's process group through
#      the engine's c10d shim (all-reduce, broadcast, all-gather, reduce-scatter, barrier)
#   5. bf16 training of a randomly initialised InternVL3-1B (`--model 1b`, no --load) on the
#      bundle's synthetic records with their 512-token tokenizer (a vocabulary within the
#      model's 151674, so every id has an embedding row): two shapes, micro batch 1 (the seed
#      recipe's) and micro batch 8 at seq 2048, then a pair at seq 4096 on records cut at that
#      length, without and with full activation recomputation (uniform, 1 layer); ITERS
#      iterations each; median step time, tokens/s, model TFLOP/s and MFU over the steps after
#      the first. nvidia-smi samples memory and load (the pair's peak memory is the
#      recomputation's saving).
#
# Model FLOPs (training = forward + backward = 3 × forward; every part trains here):
#   ViT, per 448² tile of T_v = 1025 tokens (1024 patches + class token):
#       F_vit  = 3 · (2 · N_vit · T_v + 4 · L_v · d_v · T_v²)
#   projector (pixel shuffle → mlp1), per tile of 256 tokens:
#       F_proj = 3 · 2 · N_proj · 256
#   LLM, per sample of s tokens (image tokens included):
#       F_llm  = 3 · (2 · N_llm · s + 2 · L · d · s²)
#   N_* counts the weights of matrix products only: the ViT's blocks and patch embedding, the
#   projector's two Linear layers, the LLM's blocks and lm_head (not the embedding table, a
#   lookup). 2·L·d·s² is QKᵀ and AV over the causal half of the s×s matrix, as mm_spec::flops
#   counts it (the ViT's attention is bidirectional: the full 4·L_v·d_v·T_v²). So the familiar
#   6·N·tokens, applied per part to the tokens each part sees, plus attention. The engine
#   reports its own count (the progress lines' `tflops`); the check requires the two to agree.
#   Model FLOP/s = tokens/s · 6·N_llm + samples/s · (6·L·d·s̄² + tiles per sample · (F_vit + F_proj)),
#   with s̄ the mean tokens per sample (Σs² ≈ n·s̄², which undercounts the LLM attention term
#   by about 10 % on this data; that term is ~4 % of the LLM's FLOPs) and tiles per sample the
#   data set's mean (each image is one tile: --max-dynamic-patch 1; no video).
#   MFU = model FLOP/s / 989e12 (dense bf16 peak of the H100/H200 SXM; PEAK_TFLOPS overrides).
#   "LLM-only MFU" counts F_llm alone, as VLM fine-tuning reports often do.
#   The architecture numbers are InternVL3-1B's (mm-spec's "1b" preset); the parameter count
#   they give must equal the one the engine prints, or the script fails.
#
# Environment: OUT (results, default ./gpu-out), ITERS (default 20; 3 with --cpu),
# MM_ENGINE_BIN (default: mm-engine beside this script), SYNTH (default: synth/ beside it),
# PYTHON (default python3: the one with torch), PEAK_TFLOPS (default 989).
# Results: $OUT/gpu-check.json (everything measured), $OUT/gpu-check.log (this output),
# $OUT/train-<run>.log (each training run's output). Expected to take 2-3 minutes on an
# H100/H200 (not yet run on one: built and dry-run on a CPU machine only); every step has a
# timeout, so the whole script ends within about 8 minutes.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
MODE=gpu
[[ ${1:-} == --cpu ]] && MODE=cpu
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BIN="${MM_ENGINE_BIN:-$HERE/mm-engine}"
SYNTH="${SYNTH:-$HERE/synth}"
PYTHON="${PYTHON:-python3}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
if [[ $MODE == gpu ]]; then ITERS="${ITERS:-20}"; else ITERS="${ITERS:-3}"; fi

main() {
    local work failures=()
    work="$(mktemp -d /tmp/gpu-check.XXXXXX)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    fail() {
        echo "gpu-check: FAILED: $*" >&2
        failures+=("$*")
    }
    echo "== gpu-check ($MODE) $(date -u +%FT%TZ) on $(hostname)"
    [[ -x $BIN ]] || { echo "gpu-check: no mm-engine at $BIN (run scripts/gpu-bundle.sh on the build machine)" >&2; exit 1; }
    [[ -f $SYNTH/data/train.jsonl ]] || { echo "gpu-check: no synthetic data at $SYNTH (scripts/gpu-bundle.sh writes it)" >&2; exit 1; }

    # 1. libtorch from this machine's PyTorch (the binary's own RUNPATH names the build machine).
    local torch_lib
    torch_lib="$("$PYTHON" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "== libraries (LD_LIBRARY_PATH=$torch_lib)"
    if ldd "$BIN" | grep 'not found'; then
        echo "gpu-check: mm-engine needs libraries this machine's torch does not provide (above)" >&2
        exit 1
    fi
    ldd "$BIN" | grep -E 'libtorch|libc10|libnccl|libcudart' || true

    # 2. The GPU as the driver and PyTorch see it.
    echo "== nvidia-smi"
    if [[ $MODE == gpu ]]; then
        timeout 30 nvidia-smi || fail "nvidia-smi"
        timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
            >"$work/smi.csv" || fail "nvidia-smi --query-gpu"
    else
        echo "skipped (--cpu)"
    fi
    echo "== torch"
    timeout 60 "$PYTHON" - "$MODE" >"$work/torch.json" <<'EOF' || fail "torch.cuda info"
import json, sys, torch
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                nccl=".".join(map(str, torch.cuda.nccl.version())), device_count=torch.cuda.device_count())
print(json.dumps(info))
if sys.argv[1] == "gpu" and not info["cuda_available"]:
    sys.exit("torch sees no CUDA device")
EOF
    cat "$work/torch.json"

    # 3. What the engine was built with and what it sees.
    echo "== mm-engine doctor"
    timeout 60 "$BIN" doctor --json >"$work/doctor.json" || fail "mm-engine doctor"
    cat "$work/doctor.json"
    local nccl cuda
    nccl="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("nccl_compiled"))' "$work/doctor.json" || echo None)"
    cuda="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("cuda_available"))' "$work/doctor.json" || echo None)"
    if [[ $nccl != True ]]; then
        fail "this mm-engine was built WITHOUT NCCL (doctor: nccl_compiled=$nccl): build.rs compiles ProcessGroupNCCL only \
when libtorch_cuda.so and the NCCL/CUDA header wheels are in the build venv and MM_ENGINE_NO_NCCL is unset"
    fi
    if [[ $MODE == gpu && $cuda != True ]]; then
        fail "mm-engine (tch) sees no CUDA device (doctor: cuda_available=$cuda): libtorch_cuda not loaded?"
    fi

    # 4. One-rank NCCL (Gloo with --cpu) through the engine's c10d objects.
    local dev=cuda
    [[ $MODE == cpu ]] && dev=cpu
    echo "== mm-engine collective-check --device $dev (world size 1)"
    if env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="$(free_port)" \
        MM_DIST_TIMEOUT_S=60 timeout 90 "$BIN" collective-check --device "$dev" >"$work/collective.json"; then
        cat "$work/collective.json"
    else
        fail "mm-engine collective-check --device $dev"
        : >"$work/collective.json"
    fi

    # 5. Training runs: NAME MICRO GLOBAL SEQ RECOMPUTE. The s4096 pair trains on records whose
    # answers are cut at 4096 tokens (every sample is that long), without and with full
    # activation recomputation (uniform, 1 layer): memory and tokens/s side by side.
    local runs=("mb1 1 16 2048 off" "mb8 8 64 2048 off" "s4096 1 16 4096 off" "s4096-rc 1 16 4096 full") model_flags
    if [[ $MODE == cpu ]]; then
        runs=("mb1 1 8 2048 off" "mb4 4 8 2048 off" "s1024 1 4 1024 off" "s1024-rc 1 4 1024 full")
        # The bundle's tiny checkpoint, so the FLOP count reads a real config.json.
        model_flags=(--model tiny --load "$SYNTH/model")
    else
        model_flags=(--model 1b)
    fi
    # Long records: one image and an answer of a few thousand words, 16 times.
    "$PYTHON" - "$SYNTH/data/train.jsonl" "$work/long.jsonl" <<'PY'
import json, sys
first = json.loads(open(sys.argv[1]).readline())
answer = " ".join(["A red circle beside a green square."] * 1200)
rec = {"conversations": [first["conversations"][0], {"from": "gpt", "value": answer}], "image": first["image"]}
with open(sys.argv[2], "w") as f:
    for _ in range(16):
        f.write(json.dumps(rec) + "\n")
PY
    local smi_pid="" r name micro global seq rc data rc_flags
    for r in "${runs[@]}"; do
        read -r name micro global seq rc <<<"$r"
        data="$SYNTH/data/train.jsonl"
        [[ $seq != 2048 ]] && data="$work/long.jsonl"
        rc_flags=()
        [[ $rc == full ]] && rc_flags=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
        echo "== train $name: micro batch $micro, global batch $global, seq $seq, recompute $rc, $ITERS iterations, bf16, --device $dev"
        if [[ $MODE == gpu ]]; then
            nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 \
                >"$work/smi-$name.csv" 2>/dev/null &
            smi_pid=$!
        fi
        if ! MM_CPU_THREADS="$(nproc)" timeout 180 "$BIN" train "${model_flags[@]}" --device "$dev" --precision bf16 \
            --tokenizer "$SYNTH/model" --data-path "$data" --data-folder "$SYNTH/data" "${rc_flags[@]}" \
            --micro-batch-size "$micro" --global-batch-size "$global" --seq-length "$seq" --max-dynamic-patch 1 \
            --train-iters "$ITERS" --lr 1e-5 --clip-grad 1.0 --seed 1 --log-interval 1 --log-tps \
            --num-workers "$(($(nproc) > 8 ? 8 : $(nproc)))" 2>&1 | tee "$OUT/train-$name.log" | grep -v '^@@mm-progress'; then
            fail "train $name (log: $OUT/train-$name.log)"
        fi
        if [[ -n $smi_pid ]]; then
            kill "$smi_pid" 2>/dev/null || true
            wait "$smi_pid" 2>/dev/null || true
            smi_pid=""
        fi
    done

    # Numbers, the JSON report and the table (last).
    local runs_arg
    runs_arg="$(printf '%s,' "${runs[@]}")"
    if ! "$PYTHON" - "$MODE" "$work" "$OUT" "$SYNTH" "$PEAK_TFLOPS" "${runs_arg%,}" "${failures[@]}" <<'EOF'; then
import glob, json, math, os, re, statistics, sys

mode, work, out, synth, peak = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
runs = [r.split() for r in sys.argv[6].split(",")]
failures = sys.argv[7:]
errors = []

# InternVL3-1B as mm-spec's "1b" preset builds it (crates/spec/src/presets.rs: InternViT-300M,
# Qwen2.5-0.5B-shaped LLM with an untied lm_head); with --cpu the tiny checkpoint's config.json.
ARCH_1B = {
    "downsample_ratio": 0.5,
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "patch_size": 14, "image_size": 448,
                      "num_hidden_layers": 24, "norm_type": "layer_norm", "qkv_bias": True, "qk_normalization": False},
    "llm_config": {"hidden_size": 896, "intermediate_size": 4864, "vocab_size": 151674, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": False},
}
cfg = ARCH_1B if mode == "gpu" else json.load(open(os.path.join(synth, "model", "config.json")))
v, l = cfg["vision_config"], cfg["llm_config"]

# Parameter counts (all weights) and matmul weights (N_* above), per part.
dv, iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
grid = v["image_size"] // p
vit_norm = 2 * dv if v.get("norm_type", "layer_norm") == "layer_norm" else dv
vit_block_mm = 4 * dv * dv + 2 * dv * iv
vit_block = vit_block_mm + (3 * dv if v.get("qkv_bias", True) else 0) + dv + iv + dv + 2 * vit_norm + 2 * dv \
    + (2 * dv if v.get("qk_normalization") else 0)
n_vit_mm = v["num_hidden_layers"] * vit_block_mm + 3 * p * p * dv
n_vit = v["num_hidden_layers"] * vit_block + 3 * p * p * dv + dv + dv + (grid * grid + 1) * dv
d, il, vocab, layers = l["hidden_size"], l["intermediate_size"], l["vocab_size"], l["num_hidden_layers"]
kv = l["num_key_value_heads"] * (d // l["num_attention_heads"])
shuffled = round(dv / cfg.get("downsample_ratio", 0.5) ** 2)
n_proj_mm = shuffled * d + d * d
n_proj = n_proj_mm + 2 * shuffled + 2 * d
llm_block_mm = 2 * d * d + 2 * d * kv + 3 * d * il
n_llm_mm = layers * llm_block_mm + d * vocab
tied = l.get("tie_word_embeddings", False)
n_llm = vocab * d + layers * (llm_block_mm + d + 2 * kv + 2 * d) + d + (0 if tied else d * vocab)
n_total = n_vit + n_proj + n_llm
vit_tokens = grid * grid + 1
img_tokens = round((grid * cfg.get("downsample_ratio", 0.5)) ** 2)
f_tile = 3 * (2 * n_vit_mm * vit_tokens + 4 * v["num_hidden_layers"] * dv * vit_tokens**2) + 3 * 2 * n_proj_mm * img_tokens

# Tiles per sample: the data set's mean (one tile per image with --max-dynamic-patch 1).
recs = [json.loads(x) for x in open(os.path.join(synth, "data", "train.jsonl")) if x.strip()]
if any("video" in r for r in recs):
    errors.append("the data set has video records: the FLOP count assumes images only (synth --no-video)")
tiles_per_sample = sum(len(r["image"]) if isinstance(r.get("image"), list) else int("image" in r) for r in recs) / len(recs)

def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None

report = {
    "mode": mode,
    "peak_tflops": peak,
    "torch": load(f"{work}/torch.json"),
    "doctor": load(f"{work}/doctor.json"),
    "collective_check": load(f"{work}/collective.json"),
    "model": {"preset": "1b" if mode == "gpu" else "tiny (bundle checkpoint)", "parameters": n_total,
              "vit": n_vit, "projector": n_proj, "llm": n_llm, "matmul_weights": {"vit": n_vit_mm,
              "projector": n_proj_mm, "llm": n_llm_mm}, "tiles_per_sample": tiles_per_sample,
              "flops_per_tile": f_tile},
    "runs": [],
}
if os.path.exists(f"{work}/smi.csv"):
    report["nvidia_smi"] = open(f"{work}/smi.csv").read().strip()

rows = []
for name, micro, global_batch, seq, recompute in runs:
    log = f"{out}/train-{name}.log"
    text = open(log).read() if os.path.exists(log) else ""
    steps = []
    for line in text.splitlines():
        if line.startswith("@@mm-progress "):
            e = json.loads(line.split(" ", 1)[1])
            if e["event"] == "step":
                steps.append(e)
    waits = [float(x) for x in re.findall(r"data wait \(ms\): ([0-9.]+)", text)][1:]
    head = re.search(r"model \S+ \((\d+) parameters, (\d+) trainable\), \d+ records, device (\S+), ([^,]+),", text)
    run = {"name": name, "micro_batch": int(micro), "global_batch": int(global_batch), "seq_length": int(seq),
           "recompute": recompute, "steps": len(steps)}
    if not head or len(steps) < 2:
        errors.append(f"train {name}: no startup line or fewer than 2 steps in {log}")
        report["runs"].append(run)
        continue
    params, device, precision = int(head.group(1)), head.group(3), head.group(4)
    if params != n_total:
        errors.append(f"train {name}: the engine built {params} parameters, the FLOP count's architecture has {n_total}")
    if mode == "gpu" and not device.startswith("Cuda"):
        errors.append(f"train {name}: ran on {device}, not CUDA")
    if not precision.startswith("bf16"):
        errors.append(f"train {name}: precision {precision!r}, not bf16")
    measured = steps[1:]
    ms = statistics.median(s["step_ms"] for s in measured)
    tps = statistics.median(s["tokens_per_sec"] for s in measured)
    sps = statistics.median(s["samples_per_sec"] for s in measured)
    s_bar = tps / sps
    # Attention over the causal half, as mm_spec::flops counts it (3 × 2·h·L² per layer).
    llm_flops_s = tps * 6 * n_llm_mm + sps * 6 * layers * d * s_bar**2
    vis_flops_s = sps * tiles_per_sample * f_tile
    tflops = (llm_flops_s + vis_flops_s) / 1e12
    loss = steps[-1]["loss"]
    if not math.isfinite(loss):
        errors.append(f"train {name}: final loss {loss}")
    # The engine's own numbers (metrics.jsonl's fields): its FLOP count against this script's
    # independent one (mean tokens per sample squared stands in for the mean of squares, hence
    # the tolerance), the peak it found for this GPU, and the caching allocator's bytes.
    eng_tflops = statistics.median(s.get("tflops") or 0.0 for s in measured)
    eng_mfu = [s.get("mfu") for s in measured]
    alloc = [s.get("cuda_allocated_bytes") for s in measured]
    if not (0.8 < eng_tflops / max(tflops, 1e-12) < 1.25):
        errors.append(f"train {name}: the engine reports {eng_tflops:.3f} TFLOP/s, this script counts {tflops:.3f}")
    if mode == "gpu" and (None in eng_mfu or None in alloc):
        errors.append(f"train {name}: no MFU (peak of this GPU unknown) or no CUDA allocator bytes in the progress lines")
    run.update(params=params, device=device, precision=precision, step_ms=ms, tokens_per_sec=tps,
               samples_per_sec=sps, tokens_per_sample=s_bar, data_wait_ms=statistics.median(waits) if waits else None,
               model_tflops=tflops, mfu=tflops / peak, llm_only_tflops=llm_flops_s / 1e12,
               llm_only_mfu=llm_flops_s / 1e12 / peak, first_loss=steps[0]["loss"], final_loss=loss,
               rss_mib=(steps[-1].get("mem_bytes") or 0) / 2**20, engine_tflops=eng_tflops,
               engine_mfu=statistics.median(m for m in eng_mfu if m is not None) if any(m is not None for m in eng_mfu) else None,
               cuda_allocated_mib=(alloc[-1] or 0) / 2**20,
               cuda_reserved_mib=(steps[-1].get("cuda_reserved_bytes") or 0) / 2**20)
    smi = f"{work}/smi-{name}.csv"
    if os.path.exists(smi):
        samples = []
        for line in open(smi):
            try:
                mem, util = (float(x) for x in line.split(","))
            except ValueError:  # "[N/A]", a line cut off when the sampler was stopped
                continue
            samples.append((mem, util))
        if samples:
            run.update(gpu_mem_peak_mib=max(a for a, _ in samples), gpu_util_mean=statistics.mean(b for _, b in samples))
    report["runs"].append(run)

report["failures"] = failures + errors
report["ok"] = not report["failures"]
json.dump(report, open(f"{out}/gpu-check.json", "w"), indent=1)

print()
print(f"## gpu-check ({mode}): {n_total / 1e6:.1f} M parameters, {tiles_per_sample:.2f} tiles per sample, "
      f"MFU against {peak:g} TFLOP/s")
t = report["torch"] or {}
print(f"torch {t.get('torch')} cuda {t.get('cuda_build')} device {t.get('device', 'none')}; "
      f"nccl compiled: {(report['doctor'] or {}).get('nccl_compiled')}; collective-check: "
      f"{'ok' if report['collective_check'] else 'FAILED'}")
print("| run | micro × global | seq | recompute | step ms | tokens/s | samples/s | data wait ms | TFLOP/s | MFU | LLM-only MFU | GPU mem MiB | loss first → last |")
print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for r in report["runs"]:
    if "step_ms" not in r:
        print(f"| {r['name']} | {r['micro_batch']} × {r['global_batch']} | {r['seq_length']} | {r['recompute']} | FAILED |||||||||")
        continue
    dw = f"{r['data_wait_ms']:.1f}" if r["data_wait_ms"] is not None else "-"
    print(f"| {r['name']} | {r['micro_batch']} × {r['global_batch']} | {r['seq_length']} | {r['recompute']} "
          f"| {r['step_ms']:.1f} | {r['tokens_per_sec']:.0f} "
          f"| {r['samples_per_sec']:.1f} | {dw} | {r['model_tflops']:.2f} | {r['mfu']:.2%} | {r['llm_only_mfu']:.2%} "
          f"| {r.get('gpu_mem_peak_mib', '-')} | {r['first_loss']:.3f} → {r['final_loss']:.3f} |")
for f in report["failures"]:
    print(f"FAILED: {f}")
print(f"results: {out}/gpu-check.json")
sys.exit(0 if report["ok"] else 1)
EOF
        exit 1
    fi
}

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

main "$@" 2>&1 | tee "$OUT/gpu-check.log"
exit "${PIPESTATUS[0]}"
