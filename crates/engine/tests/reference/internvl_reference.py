"""Independent reference data for mm-engine's numerics tests (run by tests/reference.rs).

Uses transformers==4.53.0 (its native InternVL: InternVLForConditionalGeneration), torch and
Pillow, never mm-engine code. Writes into --out:

  model/<flavour>/{hf, hf_prefixed, original}/   one small random InternVL in three spellings:
      hf           save_pretrained (vision_tower.*, split q/k/v, language_model.model.*)
      hf_prefixed  the in-memory names (model.vision_tower.*, model.language_model.*, lm_head)
      original     OpenGVLab keys (fused qkv, mlp1.{0,1,3}), sharded in two files with an index,
                   written with this script's own key map
  model/<flavour>/expected.safetensors           batch, logits, loss, parameters after one
                                                 torch.optim.AdamW step (original-layout names)
  tiling/expected.safetensors, tiling/cases.json InternVL's dynamic_preprocess + build_transform
                                                 on PNG and JPEG files written here
  template/expected.json                         preprocess_internvl2_5 on a few conversations,
                                                 tokenized with the given tokenizer.json

Flavours: "300m" (LayerNorm, qkv bias) and "6b" (RMSNorm, qk normalization, no qkv bias).
"""

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

IMAGE_TOKEN = 100
VOCAB = 128
IMAGE_SIZE = 56
PATCH = 14
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH) ** 2 // 4
ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def build_model(flavour):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    six_b = flavour == "6b"
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=[IMAGE_SIZE, IMAGE_SIZE],
            patch_size=[PATCH, PATCH],
            norm_type="rms_norm" if six_b else "layer_norm",
            attention_bias=not six_b,
            use_qk_norm=six_b,
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            vocab_size=VOCAB,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            max_position_embeddings=512,
        ),
        image_token_id=IMAGE_TOKEN,
        downsample_ratio=0.5,
    )
    torch.manual_seed(0 if six_b else 1)
    model = InternVLForConditionalGeneration(cfg).float()
    # Random init gives near-zero logits; spread every parameter so the comparison means something.
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.08)
    model.eval()
    return model, cfg


def to_original(name):
    """transformers in-memory name -> OpenGVLab key (q/k/v handled by the caller)."""
    top = {
        "model.vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
        "model.vision_tower.embeddings.position_embeddings": "vision_model.embeddings.position_embedding",
        "model.vision_tower.embeddings.patch_embeddings.projection.weight": "vision_model.embeddings.patch_embedding.weight",
        "model.vision_tower.embeddings.patch_embeddings.projection.bias": "vision_model.embeddings.patch_embedding.bias",
        "model.multi_modal_projector.layer_norm.weight": "mlp1.0.weight",
        "model.multi_modal_projector.layer_norm.bias": "mlp1.0.bias",
        "model.multi_modal_projector.linear_1.weight": "mlp1.1.weight",
        "model.multi_modal_projector.linear_1.bias": "mlp1.1.bias",
        "model.multi_modal_projector.linear_2.weight": "mlp1.3.weight",
        "model.multi_modal_projector.linear_2.bias": "mlp1.3.bias",
        "lm_head.weight": "language_model.lm_head.weight",
    }
    if name in top:
        return top[name]
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    prefix = "model.vision_tower.encoder.layer."
    assert name.startswith(prefix), name
    layer, rest = name[len(prefix):].split(".", 1)
    layer_map = {
        "attention.projection_layer.weight": "attn.proj.weight",
        "attention.projection_layer.bias": "attn.proj.bias",
        "attention.q_norm.weight": "attn.q_norm.weight",
        "attention.k_norm.weight": "attn.k_norm.weight",
        "lambda_1": "ls1",
        "lambda_2": "ls2",
        "layernorm_before.weight": "norm1.weight",
        "layernorm_before.bias": "norm1.bias",
        "layernorm_after.weight": "norm2.weight",
        "layernorm_after.bias": "norm2.bias",
    }
    for proj in ("q_proj", "k_proj", "v_proj"):
        for kind in ("weight", "bias"):
            if rest == f"attention.{proj}.{kind}":
                return f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"
    return f"vision_model.encoder.layers.{layer}." + layer_map.get(rest, rest)


def original_state(model):
    """OpenGVLab-layout tensors: q/k/v rows fused [q; k; v]."""
    out, parts = {}, {}
    for name, p in model.named_parameters():
        key = to_original(name)
        if ".attn.qkv." in key:
            which = next(i for i, n in enumerate(("q_proj", "k_proj", "v_proj")) if n in name)
            parts.setdefault(key, [None, None, None])[which] = p.detach().clone()
        else:
            out[key] = p.detach().clone().contiguous()
    for key, ps in parts.items():
        out[key] = torch.cat(ps, 0).contiguous()
    return out


def original_config(cfg):
    v, t = cfg.vision_config, cfg.text_config
    return {
        "model_type": "internvl_chat",
        "template": "internvl2_5",
        "ps_version": "v2",
        "downsample_ratio": cfg.downsample_ratio,
        "vision_config": {
            "num_hidden_layers": v.num_hidden_layers,
            "hidden_size": v.hidden_size,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "norm_type": v.norm_type,
            "qkv_bias": v.attention_bias,
            "qk_normalization": v.use_qk_norm,
            "layer_norm_eps": v.layer_norm_eps,
            "image_size": v.image_size[0],
            "patch_size": v.patch_size[0],
            "drop_path_rate": 0.0,
        },
        "llm_config": {
            "num_hidden_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "intermediate_size": t.intermediate_size,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": False,
        },
    }


def fixed_batch():
    """Two samples: 1 tile and 2 tiles of image tokens; the second is right-padded."""
    g = torch.Generator().manual_seed(7)
    T = 24
    ids = torch.randint(0, 90, (2, T), generator=g)
    ids[0, 3:3 + TOKENS_PER_TILE] = IMAGE_TOKEN
    ids[1, 2:2 + 2 * TOKENS_PER_TILE] = IMAGE_TOKEN
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 19:] = False
    ids[1, 19:] = 101  # pad id
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    labels[:, :2] = -100
    labels[~mask] = -100
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return ids, mask, labels, pixels


def write_original(folder, state, cfg):
    os.makedirs(folder, exist_ok=True)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(original_config(cfg), f, indent=1)


def model_reference(out, flavour):
    model, cfg = build_model(flavour)
    base = os.path.join(out, "model", flavour)
    model.save_pretrained(os.path.join(base, "hf"), safe_serialization=True)
    prefixed = os.path.join(base, "hf_prefixed")
    os.makedirs(prefixed, exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, os.path.join(prefixed, "model.safetensors"))
    with open(os.path.join(base, "hf", "config.json")) as f:
        hf_cfg = f.read()
    with open(os.path.join(prefixed, "config.json"), "w") as f:
        f.write(hf_cfg)
    write_original(os.path.join(base, "original"), original_state(model), cfg)

    ids, mask, labels, pixels = fixed_batch()
    out_ = model(input_ids=ids, attention_mask=mask.long(), pixel_values=pixels, labels=labels)
    logits = out_.logits.detach()
    loss = out_.loss.detach()
    # The same loss by hand: shifted, mean over supervised tokens of the micro batch.
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, manual, atol=1e-6), (loss, manual)

    # One AdamW step; no weight decay on biases and 1-D parameters (Megatron's rule).
    model.train()
    named = list(model.named_parameters())
    decay = [p for n, p in named if not (n.endswith(".bias") or p.ndim == 1)]
    no_decay = [p for n, p in named if n.endswith(".bias") or p.ndim == 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": ADAM["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"], foreach=False,
    )
    opt.zero_grad()
    step_loss = model(input_ids=ids, attention_mask=mask.long(), pixel_values=pixels, labels=labels).loss
    step_loss.backward()
    opt.step()
    after = {f"after.{k}": v for k, v in original_state(model).items()}

    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixels.contiguous(),
        "logits": logits.contiguous(),
        "loss": loss.reshape(1),
        **after,
    }
    save_file(tensors, os.path.join(base, "expected.safetensors"))
    print(f"{flavour}: loss {loss.item():.6f}, logits |max| {logits.abs().max().item():.3f}")


# --- InternVL's preprocessing (internvl/train/dataset.py), verbatim in behaviour ---------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def transform(img, input_size):
    # T.Lambda(convert RGB) -> T.Resize((s, s), BICUBIC) -> T.ToTensor() -> T.Normalize(MEAN, STD);
    # torchvision's Resize on a PIL image is PIL's resize with the same filter.
    img = img.convert("RGB") if img.mode != "RGB" else img
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    m = torch.tensor(MEAN).view(3, 1, 1)
    s = torch.tensor(STD).view(3, 1, 1)
    return (x - m) / s


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def target_ratios(min_num, max_num):
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if i * j <= max_num and i * j >= min_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def dynamic_preprocess(image, min_num=1, max_num=6, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    ratios = target_ratios(min_num, max_num)
    target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, ratios, orig_width, orig_height, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images, target_aspect_ratio


def test_image(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1)).astype(np.uint8)
    g = (y * 255 // max(h - 1, 1)).astype(np.uint8)
    b = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    img = np.stack([r, g, b], -1)
    img[(x // 7 + y // 5) % 3 == 0] //= 2  # some edges
    return Image.fromarray(img)


def tiling_reference(out):
    folder = os.path.join(out, "tiling")
    os.makedirs(folder, exist_ok=True)
    sizes = [(800, 600), (300, 1000), (448, 448), (1000, 200), (57, 33), (150, 151), (1344, 448)]
    # Small tiles keep the test fast; the real 448 px tile appears with few tiles.
    configs = [(1, 12, True, 112), (1, 6, True, 224), (1, 4, True, 112), (2, 8, False, 112), (3, 3, True, 112), (1, 2, True, 448)]
    tensors, cases = {}, []
    for k, (w, h) in enumerate(sizes):
        img = test_image(w, h, k)
        for ext in ("png", "jpg"):
            path = os.path.join(folder, f"img{k}.{ext}")
            if ext == "png":
                img.save(path)
            else:
                img.save(path, quality=90)
            loaded = Image.open(path).convert("RGB")
            tensors[f"img{k}.{ext}.decoded"] = torch.from_numpy(np.asarray(loaded, dtype=np.uint8).copy())
            for c, (lo, hi, thumb, size) in enumerate(configs):
                tiles, grid = dynamic_preprocess(loaded, lo, hi, size, thumb)
                name = f"img{k}.{ext}.cfg{c}"
                tensors[f"{name}.pixels"] = torch.stack([transform(t, size) for t in tiles]).contiguous()
                cases.append({"name": name, "file": f"img{k}.{ext}", "min": lo, "max": hi, "thumbnail": thumb,
                              "size": size, "grid": list(grid), "tiles": len(tiles)})
    orders = {f"{lo},{hi}": target_ratios(lo, hi) for lo in range(1, 5) for hi in range(lo, 41)}
    save_file(tensors, os.path.join(folder, "expected.safetensors"))
    with open(os.path.join(folder, "cases.json"), "w") as f:
        json.dump({"cases": cases, "orders": orders}, f)
    print(f"tiling: {len(cases)} cases, {len(orders)} candidate orders")


# --- preprocess_internvl2_5 (labels), with the tokenizer as transformers loads it --------------

SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def preprocess_internvl2_5(conversations, tokenizer, num_image_token_list, text_only, max_len):
    if conversations[0]["from"] == "system":
        system_prompt = conversations[0]["value"]
        conversations = conversations[1:]
    else:
        system_prompt = SYSTEM
    if not text_only:
        new, idx = [], 0
        for c in conversations:
            c = dict(c)
            if c["from"] == "human":
                for _ in range(c["value"].count("<image>")):
                    if idx == len(num_image_token_list):
                        break
                    tokens = "<img>" + "<IMG_CONTEXT>" * num_image_token_list[idx] + "</img>"
                    c["value"] = c["value"].replace("<image>", tokens, 1)
                    idx += 1
            new.append(c)
        conversations = new
        assert idx == len(num_image_token_list)
    batches, roles = [f"<|im_start|>system\n{system_prompt}<|im_end|>\n"], ["system"]
    for c in conversations:
        if c["from"] == "human":
            batches.append(f"<|im_start|>user\n{c['value']}<|im_end|>\n")
            roles.append("human")
        else:
            batches.append(f"<|im_start|>assistant\n{c['value']}<|im_end|>\n")
            roles.append("gpt")
    input_ids = tokenizer(batches, padding=False, truncation=False).input_ids
    ignore_len = len(tokenizer("<|im_start|>assistant\n").input_ids)
    ids, targets = [], []
    for role, x in zip(roles, input_ids):
        ids.extend(x)
        if role in ("system", "human"):
            targets.extend([-100] * len(x))
        else:
            t = list(x)
            t[:ignore_len] = [-100] * ignore_len
            t[-1] = -100
            targets.extend(t)
    return ids[:max_len], targets[:max_len]


def template_reference(out, tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"))
    cases = [
        {"conversations": [{"from": "human", "value": "<image>\nWhat shape is in the image?"},
                           {"from": "gpt", "value": "A red circle."}], "image_tokens": [48], "text_only": False},
        {"conversations": [{"from": "system", "value": "Answer briefly."},
                           {"from": "human", "value": "<image>\n<image>\nWhat are the two shapes?"},
                           {"from": "gpt", "value": "A blue square and a red circle."},
                           {"from": "human", "value": "And the colours?"},
                           {"from": "gpt", "value": "Blue, then red."}], "image_tokens": [16, 80], "text_only": False},
        {"conversations": [{"from": "human", "value": "What is 2 plus 3?"},
                           {"from": "gpt", "value": "It is 5."}], "image_tokens": [], "text_only": True},
        {"conversations": [{"from": "human", "value": "Frame-1: <image>\nFrame-2: <image>\nWhat moves?"},
                           {"from": "gpt", "value": "A green square moves to the right."}],
         "image_tokens": [16, 16], "text_only": False},
    ]
    for c in cases:
        c["input_ids"], c["labels"] = preprocess_internvl2_5(c["conversations"], tok, c["image_tokens"], c["text_only"], 4096)
    folder = os.path.join(out, "template")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(cases, f)
    print(f"template: {len(cases)} conversations")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (mm-engine synth's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for flavour in ("300m", "6b"):
        model_reference(args.out, flavour)
    tiling_reference(args.out)
    template_reference(args.out, args.tokenizer)


if __name__ == "__main__":
    main()
