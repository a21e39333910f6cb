"""Does transformers load what mm-convert exports, and compute the same thing?

Run by crates/convert/tests/transformers_load.rs (converter round trips) and by
crates/engine/tests/train.rs (a fine-tuned mm-engine checkpoint exported for transformers).
Uses transformers==4.53.0 (InternVLForConditionalGeneration), torch and safetensors only.

  make OUT --flavour 300m|6b   a small random InternVL saved with save_pretrained in OUT/src
                               (transformers' own layout), and OUT/expected.safetensors with
                               two samples (input_ids, pixel_values) and their logits
  check DIR EXPECTED           loads DIR with from_pretrained and replays every sample of
                               EXPECTED (`sample.{i}.input_ids`, optional
                               `sample.{i}.pixel_values`, `sample.{i}.logits`); prints one JSON
                               line: loading info, tensor count, and the largest logit
                               difference relative to the largest |logit| of each sample
"""

import argparse
import json
import sys

import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN = 100
IMAGE_SIZE = 56
PATCH = 14
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH) ** 2 // 4


def make(out, flavour):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    six_b = flavour == "6b"
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=40,
            num_hidden_layers=2,
            # 5 heads do not divide by tp 2: the export must undo the unaligned split.
            num_attention_heads=5 if six_b else 2,
            intermediate_size=72,
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
            vocab_size=130,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
        image_token_id=IMAGE_TOKEN,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        torch_dtype="float32",
    )
    torch.manual_seed(11 if six_b else 7)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Random init leaves some tensors at constants (norm weights, layer scale): perturb
        # everything so a swapped or mis-split tensor changes the logits.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(f"{out}/src", safe_serialization=True)

    g = torch.Generator().manual_seed(3)
    tensors = {}
    for i, tiles in enumerate([2, 0]):
        text = torch.randint(0, IMAGE_TOKEN, (7,), generator=g)
        ids = torch.cat([text[:3], torch.full((tiles * TOKENS_PER_TILE,), IMAGE_TOKEN), text[3:]])
        tensors[f"sample.{i}.input_ids"] = ids
        if tiles:
            tensors[f"sample.{i}.pixel_values"] = torch.randn(tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        tensors[f"sample.{i}.logits"] = forward(model, tensors, i)
    save_file(tensors, f"{out}/expected.safetensors")


def forward(model, tensors, i):
    ids = tensors[f"sample.{i}.input_ids"].long().unsqueeze(0)
    px = tensors.get(f"sample.{i}.pixel_values")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
    return out.logits[0].float().contiguous()


def check(hf_dir, expected):
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(
        hf_dir, torch_dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    want = load_file(expected)
    n = len({k.split(".")[1] for k in want if k.startswith("sample.")})
    worst = 0.0
    for i in range(n):
        got = forward(model, want, i)
        ref = want[f"sample.{i}.logits"].float()
        if got.shape != ref.shape:
            print(json.dumps({"error": f"sample {i}: logits {list(got.shape)} vs {list(ref.shape)}"}))
            return 1
        rel = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, rel)
    report = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
        "tensors": len(model.state_dict()),
        "samples": n,
        "max_rel_diff": worst,
        "image_token_id": model.config.image_token_id,
    }
    print(json.dumps(report))
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--flavour", choices=["300m", "6b"], required=True)
    c = sub.add_parser("check")
    c.add_argument("hf_dir")
    c.add_argument("expected")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.out, a.flavour)
        return 0
    return check(a.hf_dir, a.expected)


if __name__ == "__main__":
    sys.exit(main())
