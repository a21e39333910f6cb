//! Key spellings: ONE table between the MM logical keys (`crate::checkpoint::KEY_TABLE`) and
//! every HF spelling of the same tensor, read both ways. The converter writes HF keys from MM
//! keys ([`hf_keys`]); the engine names its parameters with the original spelling and reads any
//! spelling ([`parse_key`], [`original_key`], [`mm_key_of_original`]).
//!
//! ```text
//!   MM logical key                         original                                 -hf (legacy spelling)
//!   vision.<body>                          vision_model.<body>                      vision_tower.<renamed body>
//!   vision.encoder.layers.N.attn.qkv.*     vision_model.encoder.layers.N.attn.qkv.* vision_tower.encoder.layer.N.attention.{q,k,v}_proj.*
//!   projector.{norm,linear_1,linear_2}.*   mlp1.{0,1,3}.*                           multi_modal_projector.{layer_norm,linear_1,linear_2}.*
//!   llm.<body>                             language_model.model.<body>              language_model.model.<body>
//!   llm.lm_head.weight                     language_model.lm_head.weight            language_model.lm_head.weight
//! ```
//! The prefixed -hf spelling (transformers ≥ 4.52's module tree) puts `model.` before
//! `vision_tower`, `multi_modal_projector` and `language_model` (with no inner `.model`), and
//! calls the head `lm_head.weight`.

use std::collections::BTreeSet;

use crate::checkpoint::{fill_template, match_template, HfLayout};

/// The ViT renames of the -hf layout (MM/original body → -hf bodies, stacked along dim 0).
pub const VISION_HF: &[(&str, &[&str])] = &[
    ("embeddings.class_embedding", &["embeddings.cls_token"]),
    ("embeddings.position_embedding", &["embeddings.position_embeddings"]),
    ("embeddings.patch_embedding.weight", &["embeddings.patch_embeddings.projection.weight"]),
    ("embeddings.patch_embedding.bias", &["embeddings.patch_embeddings.projection.bias"]),
    ("encoder.layers.{N}.norm1.weight", &["encoder.layer.{N}.layernorm_before.weight"]),
    ("encoder.layers.{N}.norm1.bias", &["encoder.layer.{N}.layernorm_before.bias"]),
    (
        "encoder.layers.{N}.attn.qkv.weight",
        &[
            "encoder.layer.{N}.attention.q_proj.weight",
            "encoder.layer.{N}.attention.k_proj.weight",
            "encoder.layer.{N}.attention.v_proj.weight",
        ],
    ),
    (
        "encoder.layers.{N}.attn.qkv.bias",
        &[
            "encoder.layer.{N}.attention.q_proj.bias",
            "encoder.layer.{N}.attention.k_proj.bias",
            "encoder.layer.{N}.attention.v_proj.bias",
        ],
    ),
    ("encoder.layers.{N}.attn.q_norm.weight", &["encoder.layer.{N}.attention.q_norm.weight"]),
    ("encoder.layers.{N}.attn.k_norm.weight", &["encoder.layer.{N}.attention.k_norm.weight"]),
    ("encoder.layers.{N}.attn.proj.weight", &["encoder.layer.{N}.attention.projection_layer.weight"]),
    ("encoder.layers.{N}.attn.proj.bias", &["encoder.layer.{N}.attention.projection_layer.bias"]),
    ("encoder.layers.{N}.ls1", &["encoder.layer.{N}.lambda_1"]),
    ("encoder.layers.{N}.ls2", &["encoder.layer.{N}.lambda_2"]),
    ("encoder.layers.{N}.norm2.weight", &["encoder.layer.{N}.layernorm_after.weight"]),
    ("encoder.layers.{N}.norm2.bias", &["encoder.layer.{N}.layernorm_after.bias"]),
    ("encoder.layers.{N}.mlp.fc1.weight", &["encoder.layer.{N}.mlp.fc1.weight"]),
    ("encoder.layers.{N}.mlp.fc1.bias", &["encoder.layer.{N}.mlp.fc1.bias"]),
    ("encoder.layers.{N}.mlp.fc2.weight", &["encoder.layer.{N}.mlp.fc2.weight"]),
    ("encoder.layers.{N}.mlp.fc2.bias", &["encoder.layer.{N}.mlp.fc2.bias"]),
];

/// The projector (MM body, original body, -hf body).
pub const PROJECTOR: &[(&str, &str, &str)] = &[
    ("norm.weight", "0.weight", "layer_norm.weight"),
    ("norm.bias", "0.bias", "layer_norm.bias"),
    ("linear_1.weight", "1.weight", "linear_1.weight"),
    ("linear_1.bias", "1.bias", "linear_1.bias"),
    ("linear_2.weight", "3.weight", "linear_2.weight"),
    ("linear_2.bias", "3.bias", "linear_2.bias"),
];

/// The prefixes of one HF spelling.
struct Prefixes {
    vision: &'static str,
    projector: &'static str,
    llm: &'static str,
    lm_head: &'static str,
}

const LAYOUTS: [HfLayout; 3] = [HfLayout::Original, HfLayout::Hf, HfLayout::HfPrefixed];

fn prefixes(layout: HfLayout) -> Prefixes {
    match layout {
        HfLayout::Original => Prefixes {
            vision: "vision_model.",
            projector: "mlp1.",
            llm: "language_model.model.",
            lm_head: "language_model.lm_head.weight",
        },
        HfLayout::Hf => Prefixes {
            vision: "vision_tower.",
            projector: "multi_modal_projector.",
            llm: "language_model.model.",
            lm_head: "language_model.lm_head.weight",
        },
        HfLayout::HfPrefixed => Prefixes {
            vision: "model.vision_tower.",
            projector: "model.multi_modal_projector.",
            llm: "model.language_model.",
            lm_head: "lm_head.weight",
        },
    }
}

/// The HF key(s) of an MM logical key; several keys are stacked along dim 0 (the -hf q/k/v of
/// the fused ViT qkv). `None` for a key outside the MM key table's name space.
pub fn hf_keys(mm_key: &str, layout: HfLayout) -> Option<Vec<String>> {
    let p = prefixes(layout);
    if mm_key == "llm.lm_head.weight" {
        return Some(vec![p.lm_head.to_string()]);
    }
    if let Some(body) = mm_key.strip_prefix("llm.") {
        return Some(vec![format!("{}{body}", p.llm)]);
    }
    if let Some(body) = mm_key.strip_prefix("projector.") {
        let (_, orig, hf) = PROJECTOR.iter().find(|(mm, _, _)| *mm == body)?;
        let body = if layout == HfLayout::Original { orig } else { hf };
        return Some(vec![format!("{}{body}", p.projector)]);
    }
    let body = mm_key.strip_prefix("vision.")?;
    if layout == HfLayout::Original {
        return Some(vec![format!("{}{body}", p.vision)]);
    }
    VISION_HF.iter().find_map(|(mm, hf)| {
        let layer = match_template(mm, body)?;
        Some(hf.iter().map(|t| format!("{}{}", p.vision, fill_template(t, layer.unwrap_or(0)))).collect())
    })
}

/// What a stored HF key holds: the MM logical key, and for one of the -hf ViT's split q/k/v
/// projections, which part of the fused tensor it is (0 = q, 1 = k, 2 = v).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub mm_key: String,
    pub part: Option<usize>,
}

/// The inverse of [`hf_keys`] over every spelling: `None` for a key no spelling knows.
pub fn parse_key(stored: &str) -> Option<StoredKey> {
    let whole = |mm_key: String| Some(StoredKey { mm_key, part: None });
    for layout in LAYOUTS {
        let p = prefixes(layout);
        if stored == p.lm_head {
            return whole("llm.lm_head.weight".into());
        }
        if let Some(body) = stored.strip_prefix(p.llm) {
            return whole(format!("llm.{body}"));
        }
        if let Some(body) = stored.strip_prefix(p.projector) {
            let col =
                |row: &(&str, &'static str, &'static str)| if layout == HfLayout::Original { row.1 } else { row.2 };
            return PROJECTOR.iter().find(|r| col(r) == body).and_then(|r| whole(format!("projector.{}", r.0)));
        }
        if let Some(body) = stored.strip_prefix(p.vision) {
            if layout == HfLayout::Original {
                return whole(format!("vision.{body}"));
            }
            return VISION_HF.iter().find_map(|(mm, hf)| {
                hf.iter().enumerate().find_map(|(i, t)| {
                    let layer = match_template(t, body)?;
                    Some(StoredKey {
                        mm_key: format!("vision.{}", fill_template(mm, layer.unwrap_or(0))),
                        part: (hf.len() > 1).then_some(i),
                    })
                })
            });
        }
    }
    None
}

/// The original-layout key of an MM logical key: the engine's parameter name.
pub fn original_key(mm_key: &str) -> Option<String> {
    hf_keys(mm_key, HfLayout::Original).and_then(|v| v.into_iter().next())
}

/// The MM logical key of an original-layout key (an engine parameter name).
pub fn mm_key_of_original(key: &str) -> Option<String> {
    parse_key(key).filter(|k| original_key(&k.mm_key).as_deref() == Some(key)).map(|k| k.mm_key)
}

/// Which layout a key set uses, from its vision-tower and projector keys.
pub fn detect_layout<'a>(keys: impl Iterator<Item = &'a str>) -> Result<HfLayout, String> {
    let mut found = BTreeSet::new();
    for k in keys {
        if k.starts_with("vision_model.") || k.starts_with("mlp1.") {
            found.insert(0);
        } else if k.starts_with("vision_tower.") || k.starts_with("multi_modal_projector.") {
            found.insert(1);
        } else if k.starts_with("model.vision_tower.")
            || k.starts_with("model.multi_modal_projector.")
            || k.starts_with("model.language_model.")
        {
            found.insert(2);
        }
    }
    let names = ["original (vision_model.*, mlp1.*)", "-hf (vision_tower.*)", "-hf prefixed (model.vision_tower.*)"];
    match found.iter().collect::<Vec<_>>()[..] {
        [&0] => Ok(HfLayout::Original),
        [&1] => Ok(HfLayout::Hf),
        [&2] => Ok(HfLayout::HfPrefixed),
        [] => Err("no InternVL3 vision tower or projector keys: expected vision_model.* and mlp1.* (original \
                   layout) or vision_tower.* and multi_modal_projector.* (-hf layout, optionally with a model. \
                   prefix); is this an InternVL3 checkpoint?"
            .to_string()),
        ref many => Err(format!(
            "the keys mix layouts: {}; a checkpoint must use one layout throughout",
            many.iter().map(|&&i| names[i]).collect::<Vec<_>>().join(" and ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::logical_tensors;
    use crate::preset;

    fn orig(stored: &str) -> Option<(String, Option<usize>)> {
        parse_key(stored).map(|k| (original_key(&k.mm_key).unwrap(), k.part))
    }

    #[test]
    fn every_spelling_maps_to_the_original_key() {
        let w = |s: &str| Some((s.to_string(), None));
        let cases = [
            ("vision_model.encoder.layers.3.attn.qkv.weight", w("vision_model.encoder.layers.3.attn.qkv.weight")),
            ("mlp1.3.bias", w("mlp1.3.bias")),
            ("language_model.lm_head.weight", w("language_model.lm_head.weight")),
            ("lm_head.weight", w("language_model.lm_head.weight")),
            ("model.language_model.layers.0.mlp.up_proj.weight", w("language_model.model.layers.0.mlp.up_proj.weight")),
            ("model.language_model.embed_tokens.weight", w("language_model.model.embed_tokens.weight")),
            ("vision_tower.embeddings.cls_token", w("vision_model.embeddings.class_embedding")),
            ("model.vision_tower.embeddings.position_embeddings", w("vision_model.embeddings.position_embedding")),
            (
                "vision_tower.embeddings.patch_embeddings.projection.bias",
                w("vision_model.embeddings.patch_embedding.bias"),
            ),
            ("vision_tower.encoder.layer.11.lambda_2", w("vision_model.encoder.layers.11.ls2")),
            ("vision_tower.encoder.layer.0.layernorm_before.bias", w("vision_model.encoder.layers.0.norm1.bias")),
            (
                "vision_tower.encoder.layer.0.attention.projection_layer.weight",
                w("vision_model.encoder.layers.0.attn.proj.weight"),
            ),
            (
                "vision_tower.encoder.layer.2.attention.q_norm.weight",
                w("vision_model.encoder.layers.2.attn.q_norm.weight"),
            ),
            (
                "vision_tower.encoder.layer.2.attention.k_proj.bias",
                Some(("vision_model.encoder.layers.2.attn.qkv.bias".into(), Some(1))),
            ),
            (
                "model.vision_tower.encoder.layer.5.attention.v_proj.weight",
                Some(("vision_model.encoder.layers.5.attn.qkv.weight".into(), Some(2))),
            ),
            ("model.multi_modal_projector.linear_1.weight", w("mlp1.1.weight")),
            ("vision_tower.encoder.layer.x.lambda_1", None),
            ("vision_tower.encoder.layer.1.attention.o_proj.weight", None),
            ("mlp1.7.weight", None),
            ("something.else", None),
        ];
        for (stored, want) in cases {
            assert_eq!(orig(stored), want, "{stored}");
        }
    }

    #[test]
    fn every_logical_tensor_round_trips_through_every_spelling() {
        for name in ["tiny", "tiny6b"] {
            let arch = preset(name).unwrap();
            for t in logical_tensors(&arch) {
                for layout in LAYOUTS {
                    let keys = hf_keys(&t.key, layout).unwrap_or_else(|| panic!("{} has no {layout} key", t.key));
                    for (i, k) in keys.iter().enumerate() {
                        let back = parse_key(k).unwrap_or_else(|| panic!("{k} does not parse"));
                        assert_eq!(back.mm_key, t.key, "{k}");
                        assert_eq!(back.part, (keys.len() > 1).then_some(i), "{k}");
                    }
                }
                let engine = original_key(&t.key).unwrap();
                assert_eq!(mm_key_of_original(&engine).as_deref(), Some(t.key.as_str()));
            }
        }
        assert_eq!(mm_key_of_original("mlp1.3.bias").as_deref(), Some("projector.linear_2.bias"));
        assert_eq!(mm_key_of_original("language_model.lm_head.weight").as_deref(), Some("llm.lm_head.weight"));
        // -hf spellings are not parameter names.
        assert_eq!(mm_key_of_original("lm_head.weight"), None);
        assert_eq!(mm_key_of_original("other.x"), None);
    }

    #[test]
    fn layouts_are_detected_and_never_mixed() {
        assert_eq!(detect_layout(["vision_model.x", "mlp1.0.weight"].into_iter()), Ok(HfLayout::Original));
        assert_eq!(detect_layout(["vision_tower.x"].into_iter()), Ok(HfLayout::Hf));
        assert_eq!(detect_layout(["model.language_model.x"].into_iter()), Ok(HfLayout::HfPrefixed));
        assert!(detect_layout(["vision_model.x", "vision_tower.y"].into_iter()).unwrap_err().contains("mix"));
        assert!(detect_layout(["x"].into_iter()).unwrap_err().contains("InternVL3"));
    }
}
