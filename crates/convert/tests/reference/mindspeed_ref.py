"""An independent reference for MindSpeed-MM's InternVL3 checkpoint layout (torch only).

Reads an original-layout HF folder (config.json + safetensors), builds every
`model_optim_rng.pt` state dict MindSpeed-MM's converter would write for a tp/pp/vpp split
(the rules of the issue "Checkpoints MindSpeed-MM can load", written here from the rules, not
from the Rust code), then loads the files mm-convert wrote with torch.load (weights_only=True,
mmap=True) and compares them tensor for tensor (names, shapes, dtypes, bytes).

    mindspeed_ref.py HF_DIR OUT_DIR --tp 2 --llm 1,1 --vit 2,0 [--vpp 2]
Exits 0 and prints "ok <n> files <m> tensors", or prints every difference and exits 1.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--llm", required=True)
    p.add_argument("--vit", required=True)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--write", action="store_true", help="write the reference files with torch.save instead")
    p.add_argument("--iteration", type=int, default=None,
                   help="with --write: a training save iter_NNNNNNN with args, iteration, optimizer and RNG state")
    return p.parse_args()


def weights(hf_dir):
    out = {}
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    for f in files:
        out.update(load_file(os.path.join(hf_dir, f)))
    return out


def even(n, tp):
    assert n % tp == 0, f"{n} does not divide by tp {tp}"
    k = n // tp
    return [(r * k, (r + 1) * k) for r in range(tp)]


def uneven(n, tp):
    base, extra = divmod(n, tp)
    out, start = [], 0
    for r in range(tp):
        size = base + (1 if r < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def chunk_owner(counts, layer):
    """(chunk, local index) of a global layer for per-chunk layer counts."""
    start = 0
    for c, n in enumerate(counts):
        if layer < start + n:
            return c, layer - start
        start += n
    raise ValueError(layer)


def build(cfg, w, tp, llm_counts, vit_counts, pp, vpp):
    v, l = cfg["vision_config"], cfg["llm_config"]
    chunks = pp * (vpp or 1)
    vit_heads, C = v["num_attention_heads"], v["hidden_size"]
    vhd = C // vit_heads
    H, heads, kv = l["hidden_size"], l["num_attention_heads"], l["num_key_value_heads"]
    hd, qpk = H // heads, heads // kv
    # per (tp rank, chunk) state dicts
    sd = {(r, c): {} for r in range(tp) for c in range(chunks)}

    def put(chunk, name, per_rank):
        for r in range(tp):
            sd[(r, chunk)][name] = per_rank(r).contiguous().clone()

    def rep(t):
        return lambda r: t

    def rows(t, parts):
        return lambda r: t[parts[r][0]:parts[r][1]]

    def cols(t, parts):
        return lambda r: t[:, parts[r][0]:parts[r][1]]

    first_vit = next(c for c, n in enumerate(vit_counts) if n > 0)
    last_vit = max(c for c, n in enumerate(vit_counts) if n > 0)
    first_llm = next(c for c, n in enumerate(llm_counts) if n > 0)
    last = max(c for c, n in enumerate(llm_counts) if n > 0)

    for k in ["class_embedding", "position_embedding", "patch_embedding.weight", "patch_embedding.bias"]:
        put(first_vit, f"image_encoder.encoder.embeddings.{k}", rep(w[f"vision_model.embeddings.{k}"]))
    head_parts = uneven(vit_heads, tp)
    for n in range(v["num_hidden_layers"]):
        c, i = chunk_owner(vit_counts, n)
        src = f"vision_model.encoder.layers.{n}."
        dst = f"image_encoder.encoder.encoder.layers.{i}."

        def vit_qkv(t):
            def f(r):
                a, b = head_parts[r]
                return torch.cat([t[q * C + a * vhd:q * C + b * vhd] for q in range(3)], 0)
            return f

        put(c, dst + "self_attention.linear_qkv.weight", vit_qkv(w[src + "attn.qkv.weight"]))
        if src + "attn.qkv.bias" in w:
            put(c, dst + "self_attention.linear_qkv.bias", vit_qkv(w[src + "attn.qkv.bias"]))
        for a, b in [("attn.q_norm.weight", "self_attention.q_layernorm.weight"),
                     ("attn.k_norm.weight", "self_attention.k_layernorm.weight"),
                     ("attn.proj.bias", "self_attention.linear_proj.bias"), ("ls1", "ls1"), ("ls2", "ls2"),
                     ("norm1.weight", "input_layernorm.weight"), ("norm1.bias", "input_layernorm.bias"),
                     ("norm2.weight", "pre_mlp_layernorm.weight"), ("norm2.bias", "pre_mlp_layernorm.bias"),
                     ("mlp.fc2.bias", "mlp.linear_fc2.bias")]:
            if src + a in w:
                put(c, dst + b, rep(w[src + a]))
        put(c, dst + "self_attention.linear_proj.weight",
            cols(w[src + "attn.proj.weight"], [(a * vhd, b * vhd) for a, b in head_parts]))
        fc = even(v["intermediate_size"], tp)
        put(c, dst + "mlp.linear_fc1.weight", rows(w[src + "mlp.fc1.weight"], fc))
        put(c, dst + "mlp.linear_fc1.bias", rows(w[src + "mlp.fc1.bias"], fc))
        put(c, dst + "mlp.linear_fc2.weight", cols(w[src + "mlp.fc2.weight"], fc))
    for a, b in [("0", "norm"), ("1", "linear_fc1"), ("3", "linear_fc2")]:
        for p in ["weight", "bias"]:
            put(last_vit, f"image_encoder.projector.{b}.{p}", rep(w[f"mlp1.{a}.{p}"]))

    V = l["vocab_size"]
    put(first_llm, "text_decoder.embedding.word_embeddings.weight",
        rows(w["language_model.model.embed_tokens.weight"], uneven(V, tp)))
    groups = even(kv, tp)
    mlp = even(l["intermediate_size"], tp)
    for n in range(l["num_hidden_layers"]):
        c, i = chunk_owner(llm_counts, n)
        src = f"language_model.model.layers.{n}."
        dst = f"text_decoder.decoder.layers.{i}."
        for p in ["weight", "bias"]:
            q, k, vv = (w[src + f"self_attn.{x}_proj.{p}"] for x in "qkv")

            def qkv(r, q=q, k=k, vv=vv):
                blocks = []
                for g in range(*groups[r]):
                    blocks += [q[g * qpk * hd:(g + 1) * qpk * hd], k[g * hd:(g + 1) * hd], vv[g * hd:(g + 1) * hd]]
                return torch.cat(blocks, 0)

            put(c, dst + f"self_attention.linear_qkv.{p}", qkv)
        put(c, dst + "self_attention.linear_proj.weight",
            cols(w[src + "self_attn.o_proj.weight"], [(a * qpk * hd, b * qpk * hd) for a, b in groups]))
        put(c, dst + "input_layernorm.weight", rep(w[src + "input_layernorm.weight"]))
        put(c, dst + "pre_mlp_layernorm.weight", rep(w[src + "post_attention_layernorm.weight"]))
        gate, up = w[src + "mlp.gate_proj.weight"], w[src + "mlp.up_proj.weight"]
        put(c, dst + "mlp.linear_fc1.weight",
            lambda r, gate=gate, up=up: torch.cat([gate[mlp[r][0]:mlp[r][1]], up[mlp[r][0]:mlp[r][1]]], 0))
        put(c, dst + "mlp.linear_fc2.weight", cols(w[src + "mlp.down_proj.weight"], mlp))
    put(last, "text_decoder.decoder.final_layernorm.weight", rep(w["language_model.model.norm.weight"]))
    if "language_model.lm_head.weight" in w:
        put(last, "text_decoder.output_layer.weight", rows(w["language_model.lm_head.weight"], uneven(V, tp)))

    files = {}
    for r in range(tp):
        for p in range(pp):
            name = f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{p:03d}"
            obj = {}
            if vpp:
                for vs in range(vpp):
                    obj[f"model{vs}"] = sd[(r, vs * pp + p)]
            else:
                obj["model"] = sd[(r, p)]
            obj["checkpoint_version"] = 3.0
            files[name] = obj
    return files


def main():
    a = parse()
    cfg = json.load(open(os.path.join(a.hf_dir, "config.json")))
    w = weights(a.hf_dir)
    llm = [int(x) for x in a.llm.split(",")]
    vit = [int(x) for x in a.vit.split(",")]
    pp = len(llm) // (a.vpp or 1)
    want = build(cfg, w, a.tp, llm, vit, pp, a.vpp)
    release = os.path.join(a.out_dir, "release")
    if a.write:
        folder = "release" if a.iteration is None else f"iter_{a.iteration:07d}"
        target = os.path.join(a.out_dir, folder)
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(a.out_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("release" if a.iteration is None else str(a.iteration))
        for name, obj in want.items():
            if a.iteration is not None:
                # What Megatron's save_checkpoint adds beside the model.
                import argparse as ap
                import random
                import numpy as np
                tensors = [t for k, v in obj.items() if k.startswith("model") for t in v.values()]
                some = tensors[0].float() if tensors else torch.zeros(4)
                obj["args"] = ap.Namespace(tensor_model_parallel_size=a.tp, params_dtype=torch.bfloat16, lr=2e-5,
                                           model_type="internvl", variable_seq_lengths=True)
                obj["iteration"] = a.iteration
                obj["optimizer"] = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": some.clone(),
                                                                "exp_avg_sq": some * some}},
                                                  "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999), "params": [0]}]},
                                    "fp32_from_fp16_params": [[some.clone()]]}
                obj["opt_param_scheduler"] = {"max_lr": 2e-5, "num_steps": a.iteration, "decay_style": "cosine"}
                obj["rng_state"] = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                     "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
                                     "rng_tracker_states": {}}]
                obj["num_floating_point_operations_so_far"] = 12345
            if a.iteration is not None:
                # A training save's model entries are module.state_dict()s: OrderedDicts with
                # `_metadata`, pickled with a BUILD, and Transformer Engine's `_extra_state`s.
                import collections
                for k in [k for k in obj if k.startswith("model")]:
                    sd = collections.OrderedDict(obj[k])
                    sd._metadata = collections.OrderedDict({"": {"version": 1}})
                    first = next(iter(sd), None)
                    if first is not None:
                        sd[first.rsplit(".", 1)[0] + "._extra_state"] = None
                    obj[k] = sd
            os.makedirs(os.path.join(target, name), exist_ok=True)
            torch.save(obj, os.path.join(target, name, "model_optim_rng.pt"))
        print(f"wrote {len(want)} files")
        return 0
    errors, n = [], 0
    tracker = open(os.path.join(a.out_dir, "latest_checkpointed_iteration.txt")).read().strip()
    if tracker != "release":
        errors.append(f"tracker says {tracker!r}, expected 'release'")
    found = sorted(os.listdir(release))
    if found != sorted(want):
        errors.append(f"rank folders {found}, expected {sorted(want)}")
    for name, obj in want.items():
        path = os.path.join(release, name, "model_optim_rng.pt")
        got = torch.load(path, weights_only=True, mmap=True)
        if set(got) != set(obj):
            errors.append(f"{name}: top-level keys {sorted(got)}, expected {sorted(obj)}")
            continue
        if got["checkpoint_version"] != 3.0:
            errors.append(f"{name}: checkpoint_version {got['checkpoint_version']}")
        for mk in [k for k in obj if k.startswith("model")]:
            g, e = got[mk], obj[mk]
            if list(g) != list(e) and set(g) != set(e):
                errors.append(f"{name}/{mk}: missing {sorted(set(e) - set(g))}, unexpected {sorted(set(g) - set(e))}")
            for k, t in e.items():
                if k not in g:
                    continue
                n += 1
                x = g[k]
                if x.dtype != t.dtype or list(x.shape) != list(t.shape):
                    errors.append(f"{name}/{mk}/{k}: {x.dtype} {list(x.shape)}, expected {t.dtype} {list(t.shape)}")
                elif not torch.equal(x, t):
                    errors.append(f"{name}/{mk}/{k}: values differ")
    if errors:
        print("\n".join(errors[:50]))
        return 1
    print(f"ok {len(want)} files {n} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
