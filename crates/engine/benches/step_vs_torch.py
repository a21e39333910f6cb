"""The PyTorch-eager side of benches/step_vs_torch.rs (transformers 4.53 InternVL, torch 2.11).

  make OUT --llm-layers N --vit-layers M [--seq T] [--tiles K]
      a random InternVLForConditionalGeneration with InternVL3-1B's widths (InternViT-300M:
      1024 wide, 16 heads, 448 px tiles; Qwen2.5-0.5B: 896 wide, 14 heads / 2 kv heads, vocab
      151674) at the given depths, saved with save_pretrained in OUT/model, and one training
      sample in OUT/batch.safetensors: K image tiles (256 <IMG_CONTEXT> tokens each) inside
      T tokens, labels on the second half of the text.
  time OUT --steps S --warmup W --threads P
      W + S training steps on that sample (forward, loss, backward, clip to 1.0, AdamW,
      zero_grad), fp32 on the CPU with P intra-op threads; prints JSON with each timed step's ms.
"""

import argparse
import json
import resource
import time

import torch
from safetensors.torch import load_file, save_file

IMAGE_TOKEN = 151667
VOCAB = 151674


def make(a):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=1024,
            num_hidden_layers=a.vit_layers,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=[448, 448],
            patch_size=[14, 14],
            norm_type="layer_norm",
            attention_bias=True,
            use_qk_norm=False,
            layer_norm_eps=1e-6,
            use_mean_pooling=True,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=896,
            num_hidden_layers=a.llm_layers,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=VOCAB,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        image_token_id=IMAGE_TOKEN,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    InternVLForConditionalGeneration(cfg).save_pretrained(f"{a.out}/model", safe_serialization=True)

    g = torch.Generator().manual_seed(1)
    n_img = 256 * a.tiles
    n_text = a.seq - n_img
    assert n_text >= 8, "--seq must leave room for text after the image tokens"
    text = torch.randint(0, 151000, (n_text,), generator=g)
    ids = torch.cat([text[:4], torch.full((n_img,), IMAGE_TOKEN), text[4:]]).unsqueeze(0)
    labels = torch.full_like(ids, -100)
    half = 4 + n_img + (n_text - 4) // 2
    labels[0, half:] = ids[0, half:]
    save_file(
        {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
            "pixel_values": torch.randn(a.tiles, 3, 448, 448, generator=g),
        },
        f"{a.out}/batch.safetensors",
    )


def time_steps(a):
    from transformers import InternVLForConditionalGeneration

    torch.set_num_threads(a.threads)
    model = InternVLForConditionalGeneration.from_pretrained(f"{a.out}/model", torch_dtype=torch.float32)
    model.train()
    b = load_file(f"{a.out}/batch.safetensors")
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-5,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    steps = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        logits = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]
        ).logits
        # The engine's default reduction: mean over the supervised tokens (shifted by one).
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if i >= a.warmup:
            steps.append((time.perf_counter() - t0) * 1e3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"step_ms": steps, "loss": loss.item(), "peak_rss": rss, "params": params}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    m.add_argument("--llm-layers", type=int, required=True)
    m.add_argument("--vit-layers", type=int, required=True)
    m.add_argument("--seq", type=int, default=512)
    m.add_argument("--tiles", type=int, default=1)
    t = sub.add_parser("time")
    t.add_argument("out")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a)
    else:
        time_steps(a)


if __name__ == "__main__":
    main()
