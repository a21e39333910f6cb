//! Checkpoint key maps, as declarative tables: every spelling a loader meets → the original
//! OpenGVLab key the model's parameter paths use.
//!
//! Spellings: the original layout (`vision_model.*`, `mlp1.{0,1,3}.*`, `language_model.*`);
//! the transformers-native "-hf" layout (`vision_tower.*` with split q/k/v,
//! `multi_modal_projector.*`); and the prefixed form transformers ≥ 4.52 keeps in memory
//! (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*` without
//! the inner `model.`, top-level `lm_head`).

/// Prefix rewrites applied first, longest match wins. (spelling prefix, canonical -hf prefix)
const PREFIXES: &[(&str, &str)] = &[
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
];

/// Whole-key renames of the -hf layout outside the ViT layers.
pub const HF_TOP: &[(&str, &str)] = &[
    ("vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding"),
    ("vision_tower.embeddings.patch_embeddings.projection.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("vision_tower.embeddings.patch_embeddings.projection.bias", "vision_model.embeddings.patch_embedding.bias"),
    ("multi_modal_projector.layer_norm.weight", "mlp1.0.weight"),
    ("multi_modal_projector.layer_norm.bias", "mlp1.0.bias"),
    ("multi_modal_projector.linear_1.weight", "mlp1.1.weight"),
    ("multi_modal_projector.linear_1.bias", "mlp1.1.bias"),
    ("multi_modal_projector.linear_2.weight", "mlp1.3.weight"),
    ("multi_modal_projector.linear_2.bias", "mlp1.3.bias"),
];

/// Renames inside one ViT layer: (-hf suffix after `vision_tower.encoder.layer.N.`, original
/// suffix after `vision_model.encoder.layers.N.`).
pub const HF_VIT_LAYER: &[(&str, &str)] = &[
    ("attention.projection_layer.weight", "attn.proj.weight"),
    ("attention.projection_layer.bias", "attn.proj.bias"),
    ("attention.q_norm.weight", "attn.q_norm.weight"),
    ("attention.k_norm.weight", "attn.k_norm.weight"),
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
    ("layernorm_before.weight", "norm1.weight"),
    ("layernorm_before.bias", "norm1.bias"),
    ("layernorm_after.weight", "norm2.weight"),
    ("layernorm_after.bias", "norm2.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
];

/// The split q/k/v projections of the -hf ViT, fused in this order into `attn.qkv`.
pub const HF_QKV: [&str; 3] = ["q_proj", "k_proj", "v_proj"];

const HF_VIT_LAYERS: &str = "vision_tower.encoder.layer.";
const VIT_LAYERS: &str = "vision_model.encoder.layers.";

/// Where a canonical (original-layout) tensor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// The stored key is the canonical key `0`.
    Plain(String),
    /// Part `part` (0 = q, 1 = k, 2 = v) of the fused `attn.qkv.{weight,bias}` named `0`.
    QkvPart(String, usize),
}

/// Maps one stored key to its canonical key; `None` when no table knows it.
pub fn canonical(stored: &str) -> Option<Mapped> {
    let mut key = stored.to_string();
    if let Some((from, to)) = PREFIXES.iter().find(|(from, _)| stored.starts_with(from)) {
        key = format!("{to}{}", &stored[from.len()..]);
    }
    if key.starts_with("language_model.") || key.starts_with("mlp1.") || key.starts_with("vision_model.") {
        return Some(Mapped::Plain(key));
    }
    if let Some((_, orig)) = HF_TOP.iter().find(|(hf, _)| *hf == key) {
        return Some(Mapped::Plain(orig.to_string()));
    }
    let rest = key.strip_prefix(HF_VIT_LAYERS)?;
    let (layer, suffix) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    if let Some((_, orig)) = HF_VIT_LAYER.iter().find(|(hf, _)| *hf == suffix) {
        return Some(Mapped::Plain(format!("{VIT_LAYERS}{layer}.{orig}")));
    }
    let (proj, param) = suffix.strip_prefix("attention.")?.split_once('.')?;
    let part = HF_QKV.iter().position(|p| *p == proj)?;
    (param == "weight" || param == "bias")
        .then(|| Mapped::QkvPart(format!("{VIT_LAYERS}{layer}.attn.qkv.{param}"), part))
}

/// The -hf key of a canonical key, for writers of the -hf layout; fused qkv keys give three.
pub fn to_hf(canonical_key: &str) -> Vec<String> {
    if let Some((hf, _)) = HF_TOP.iter().find(|(_, orig)| *orig == canonical_key) {
        return vec![hf.to_string()];
    }
    if let Some(rest) = canonical_key.strip_prefix(VIT_LAYERS) {
        if let Some((layer, suffix)) = rest.split_once('.') {
            if let Some((hf, _)) = HF_VIT_LAYER.iter().find(|(_, orig)| *orig == suffix) {
                return vec![format!("{HF_VIT_LAYERS}{layer}.{hf}")];
            }
            if let Some(param) = suffix.strip_prefix("attn.qkv.") {
                return HF_QKV.iter().map(|p| format!("{HF_VIT_LAYERS}{layer}.attention.{p}.{param}")).collect();
            }
        }
    }
    vec![canonical_key.to_string()]
}

/// MM checkpoint logical keys (mm_spec::checkpoint::KEY_TABLE) ↔ the engine's parameter
/// names, as prefix pairs (MM prefix, engine prefix); the first match wins.
pub const MM_PREFIXES: &[(&str, &str)] = &[
    ("vision.", "vision_model."),
    ("projector.norm.", "mlp1.0."),
    ("projector.linear_1.", "mlp1.1."),
    ("projector.linear_2.", "mlp1.3."),
    ("llm.lm_head.", "language_model.lm_head."),
    ("llm.", "language_model.model."),
];

/// Engine parameter name → MM logical key.
pub fn to_mm(name: &str) -> Option<String> {
    MM_PREFIXES.iter().find_map(|(mm, eng)| name.strip_prefix(eng).map(|rest| format!("{mm}{rest}")))
}

/// MM logical key → engine parameter name.
pub fn from_mm(key: &str) -> Option<String> {
    MM_PREFIXES.iter().find_map(|(mm, eng)| key.strip_prefix(mm).map(|rest| format!("{eng}{rest}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(s: &str) -> Option<Mapped> {
        Some(Mapped::Plain(s.to_string()))
    }

    #[test]
    fn every_spelling_maps_to_the_original_key() {
        let cases = [
            ("vision_model.encoder.layers.3.attn.qkv.weight", plain("vision_model.encoder.layers.3.attn.qkv.weight")),
            ("mlp1.3.bias", plain("mlp1.3.bias")),
            ("language_model.lm_head.weight", plain("language_model.lm_head.weight")),
            ("lm_head.weight", plain("language_model.lm_head.weight")),
            (
                "model.language_model.layers.0.mlp.up_proj.weight",
                plain("language_model.model.layers.0.mlp.up_proj.weight"),
            ),
            ("model.language_model.embed_tokens.weight", plain("language_model.model.embed_tokens.weight")),
            ("vision_tower.embeddings.cls_token", plain("vision_model.embeddings.class_embedding")),
            ("model.vision_tower.embeddings.position_embeddings", plain("vision_model.embeddings.position_embedding")),
            (
                "vision_tower.embeddings.patch_embeddings.projection.bias",
                plain("vision_model.embeddings.patch_embedding.bias"),
            ),
            ("vision_tower.encoder.layer.11.lambda_2", plain("vision_model.encoder.layers.11.ls2")),
            ("vision_tower.encoder.layer.0.layernorm_before.bias", plain("vision_model.encoder.layers.0.norm1.bias")),
            (
                "vision_tower.encoder.layer.0.attention.projection_layer.weight",
                plain("vision_model.encoder.layers.0.attn.proj.weight"),
            ),
            (
                "vision_tower.encoder.layer.2.attention.q_norm.weight",
                plain("vision_model.encoder.layers.2.attn.q_norm.weight"),
            ),
            (
                "vision_tower.encoder.layer.2.attention.k_proj.bias",
                Some(Mapped::QkvPart("vision_model.encoder.layers.2.attn.qkv.bias".into(), 1)),
            ),
            (
                "model.vision_tower.encoder.layer.5.attention.v_proj.weight",
                Some(Mapped::QkvPart("vision_model.encoder.layers.5.attn.qkv.weight".into(), 2)),
            ),
            ("model.multi_modal_projector.linear_1.weight", plain("mlp1.1.weight")),
            ("vision_tower.encoder.layer.x.lambda_1", None),
            ("vision_tower.encoder.layer.1.attention.o_proj.weight", None),
            ("something.else", None),
        ];
        for (stored, want) in cases {
            assert_eq!(canonical(stored), want, "{stored}");
        }
    }

    #[test]
    fn to_hf_inverts_canonical() {
        for (hf, orig) in HF_TOP {
            assert_eq!(to_hf(orig), vec![hf.to_string()]);
            assert_eq!(canonical(hf), plain(orig));
        }
        for (hf, orig) in HF_VIT_LAYER {
            let key = format!("{VIT_LAYERS}7.{orig}");
            let back = to_hf(&key);
            assert_eq!(back, vec![format!("{HF_VIT_LAYERS}7.{hf}")]);
            assert_eq!(canonical(&back[0]), Some(Mapped::Plain(key)));
        }
        let parts = to_hf("vision_model.encoder.layers.1.attn.qkv.weight");
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(canonical(p), Some(Mapped::QkvPart("vision_model.encoder.layers.1.attn.qkv.weight".into(), i)));
        }
    }

    #[test]
    fn mm_keys_round_trip_for_every_logical_tensor() {
        for name in ["tiny", "tiny6b"] {
            let arch = mm_spec::preset(name).unwrap();
            for t in mm_spec::checkpoint::logical_tensors(&arch) {
                let engine = from_mm(&t.key).unwrap_or_else(|| panic!("{} has no engine name", t.key));
                assert_eq!(to_mm(&engine).as_deref(), Some(t.key.as_str()));
            }
        }
        assert_eq!(to_mm("mlp1.3.bias").as_deref(), Some("projector.linear_2.bias"));
        assert_eq!(to_mm("language_model.lm_head.weight").as_deref(), Some("llm.lm_head.weight"));
        assert_eq!(
            from_mm("llm.layers.2.mlp.up_proj.weight").as_deref(),
            Some("language_model.model.layers.2.mlp.up_proj.weight")
        );
        assert_eq!(to_mm("other.x"), None);
    }
}
