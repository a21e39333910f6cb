"""Writes the config.json fixtures of the config contract tests (run once with the project venv:
`.venv/bin/python crates/spec/tests/configs/make.py`; the outputs are committed).

- internvl3-{8b,78b}-hf.json: written by transformers' own InternVLConfig (4.53), with the
  numbers of OpenGVLab/InternVL3-{8B,78B}-hf (the seed's two models);
- internvl3-{8b,78b}.json: OpenGVLab's original InternVLChatConfig layout of the same models,
  spelled as the hub's config.json files spell it (remote code, so written as a dict here);
- incomplete-hf.json: the 8B -hf config with text_config.num_hidden_layers removed.
"""
import json, os
from transformers import InternVLConfig

HERE = os.path.dirname(os.path.abspath(__file__))
VIT = {
    "300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
    "6b": dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800,
               norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
}
LLM = {
    "8b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, rms_norm_eps=1e-6),
    "78b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=29568, rms_norm_eps=1e-6, rope_scaling={"type": "dynamic", "factor": 2.0}),
}
COMMON_LLM = dict(vocab_size=151674, rope_theta=1000000.0, max_position_embeddings=32768,
                  tie_word_embeddings=False, hidden_act="silu")


def native(vit, llm):
    v = VIT[vit]
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                           num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                           norm_type=v["norm_type"], attention_bias=v["qkv_bias"], use_qk_norm=v["qk_normalization"],
                           image_size=[448, 448], patch_size=[14, 14], layer_scale_init_value=0.1,
                           use_mean_pooling=True),
        text_config=dict(model_type="qwen2", **LLM[llm], **COMMON_LLM),
        image_token_id=151667, downsample_ratio=0.5,
    )
    return json.loads(cfg.to_json_string(use_diff=False))


def original(vit, llm):
    v = VIT[vit]
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "ps_version": "v2", "select_layer": -1, "template": "internvl2_5", "use_thumbnail": True,
        "torch_dtype": "bfloat16",
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **LLM[llm], **COMMON_LLM,
                       "torch_dtype": "bfloat16"},
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", **v,
                          "image_size": 448, "patch_size": 14, "layer_norm_eps": 1e-6, "num_channels": 3,
                          "drop_path_rate": 0.0, "initializer_factor": 0.1, "hidden_act": "gelu",
                          "torch_dtype": "bfloat16"},
    }


def dump(name, obj):
    with open(os.path.join(HERE, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


dump("internvl3-8b-hf.json", native("300m", "8b"))
dump("internvl3-78b-hf.json", native("6b", "78b"))
dump("internvl3-8b.json", original("300m", "8b"))
dump("internvl3-78b.json", original("6b", "78b"))
inc = native("300m", "8b")
del inc["text_config"]["num_hidden_layers"]
dump("incomplete-hf.json", inc)
