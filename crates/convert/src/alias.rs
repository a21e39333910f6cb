//! The seed project's spelling (MindSpeed-MM's jsonargparse CLI), accepted verbatim:
//!
//! ```text
//! mm-convert InternVLConverter hf_to_mm --cfg.mm_dir DIR --cfg.hf_config.hf_dir DIR \
//!     --cfg.parallel_config.llm_pp_layers [[6,8,8,6]] --cfg.parallel_config.vit_pp_layers [[24,0,0,0]] \
//!     --cfg.parallel_config.tp_size 8 --cfg.trust_remote_code True
//! mm-convert InternVLConverter mm_to_hf --cfg.save_hf_dir DIR --cfg.mm_dir DIR --cfg.hf_config.hf_dir DIR \
//!     --cfg.parallel_config.llm_pp_layers [6,8,8,6] --cfg.parallel_config.vit_pp_layers [24,0,0,0] ...
//! ```
//!
//! [`translate`] rewrites such an argv into this tool's own before clap sees it; `hf_to_mm`
//! writes MindSpeed-MM's torch files (`--format mindspeed`), as the seed's converter does. Nested lists
//! are one inner list per virtual pipeline stage (MindSpeed's `[[0,0,0,1],[4,4,4,4],[4,4,4,3]]`),
//! so they flatten chunk-major, which is model order, and their count becomes `--vpp`.

use std::ffi::OsString;

/// The converter name the seed passes first.
pub const CONVERTER: &str = "InternVLConverter";

const HF_TO_MM_KEYS: &[&str] = &[
    "mm_dir",
    "hf_config.hf_dir",
    "parallel_config.llm_pp_layers",
    "parallel_config.vit_pp_layers",
    "parallel_config.tp_size",
    "parallel_config.ep_size",
    "trust_remote_code",
];
const MM_TO_HF_KEYS: &[&str] = &[
    "save_hf_dir",
    "mm_dir",
    "hf_config.hf_dir",
    "parallel_config.llm_pp_layers",
    "parallel_config.vit_pp_layers",
    "parallel_config.tp_size",
    "parallel_config.ep_size",
    "trust_remote_code",
];

/// Whether `args` (program name first) use the seed spelling.
pub fn is_seed_spelling(args: &[OsString]) -> bool {
    args.get(1).and_then(|a| a.to_str()).is_some_and(|a| a.ends_with("Converter"))
}

/// A `[[6,8,8,6]]`, `[6,8,8,6]` or `6,8,8,6` list: the flat list in model order, and the number
/// of inner lists when nested.
pub fn parse_layer_list(text: &str) -> Result<(Vec<usize>, Option<usize>), String> {
    let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bad = || format!("{text:?} is not a layer list: expected e.g. [[6,8,8,6]], [6,8,8,6] or 6,8,8,6");
    let numbers = |s: &str| -> Result<Vec<usize>, String> {
        if s.is_empty() {
            return Err(bad());
        }
        s.split(',').map(|n| n.parse::<usize>().map_err(|_| bad())).collect()
    };
    if let Some(inner) = t.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
        let mut flat = Vec::new();
        let mut stages = 0;
        for chunk in inner.split("],[") {
            flat.extend(numbers(chunk)?);
            stages += 1;
        }
        return Ok((flat, Some(stages)));
    }
    let flat = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(&t);
    if flat.contains('[') || flat.contains(']') {
        return Err(bad());
    }
    Ok((numbers(flat)?, None))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "True" | "true" | "1" => Ok(true),
        "False" | "false" | "0" => Ok(false),
        _ => Err(format!("--cfg.{key} is {v:?}: expected True or False")),
    }
}

/// Rewrites the seed spelling into this tool's argv (program name kept).
pub fn translate(args: &[OsString]) -> Result<Vec<OsString>, String> {
    let strs: Vec<String> = args
        .iter()
        .map(|a| a.to_str().map(str::to_string).ok_or_else(|| format!("argument {a:?} is not UTF-8")))
        .collect::<Result<_, _>>()?;
    let program = strs.first().cloned().unwrap_or_else(|| "mm-convert".into());
    let converter = strs.get(1).map(String::as_str).unwrap_or_default();
    if converter != CONVERTER {
        return Err(format!(
            "{converter} is not supported: this mm-convert converts InternVL3 checkpoints only \
             ({CONVERTER} hf_to_mm | mm_to_hf)"
        ));
    }
    let (command, known) = match strs.get(2).map(String::as_str) {
        Some("hf_to_mm") => ("hf-to-mm", HF_TO_MM_KEYS),
        Some("mm_to_hf") => ("mm-to-hf", MM_TO_HF_KEYS),
        other => {
            return Err(format!(
                "{CONVERTER} needs a subcommand hf_to_mm or mm_to_hf, got {}",
                other.map_or("nothing".to_string(), |o| format!("{o:?}"))
            ))
        }
    };

    // --cfg.key value | --cfg.key=value
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut i = 3;
    while i < strs.len() {
        let arg = &strs[i];
        let Some(rest) = arg.strip_prefix("--cfg.") else {
            return Err(format!("unexpected argument {arg:?}: the seed spelling takes --cfg.<key> <value> pairs"));
        };
        let (key, value) = match rest.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                i += 1;
                let v = strs.get(i).ok_or_else(|| format!("--cfg.{rest} needs a value"))?;
                (rest.to_string(), v.clone())
            }
        };
        if !known.contains(&key.as_str()) {
            return Err(format!(
                "--cfg.{key} is not a {CONVERTER} {} option: expected one of {}",
                strs[2],
                known.iter().map(|k| format!("--cfg.{k}")).collect::<Vec<_>>().join(", ")
            ));
        }
        pairs.push((key, value));
        i += 1;
    }

    let mut out: Vec<String> = vec![program, command.to_string()];
    let mut vpp: Option<usize> = None;
    let list_flag = |command: &str, name: &str| {
        if command == "hf-to-mm" {
            format!("--{name}")
        } else {
            format!("--expect-{name}")
        }
    };
    for (key, value) in &pairs {
        match key.as_str() {
            "mm_dir" => out.extend(["--mm-dir".into(), value.clone()]),
            "save_hf_dir" => out.extend(["--hf-dir".into(), value.clone()]),
            "hf_config.hf_dir" if command == "hf-to-mm" => out.extend(["--hf-dir".into(), value.clone()]),
            // mm_to_hf reads config and tokenizer from the original HF folder.
            "hf_config.hf_dir" => out.extend(["--assets-from".into(), value.clone()]),
            "parallel_config.llm_pp_layers" | "parallel_config.vit_pp_layers" => {
                let (flat, stages) = parse_layer_list(value).map_err(|e| format!("--cfg.{key}: {e}"))?;
                if let Some(s) = stages.filter(|&s| s > 1) {
                    if vpp.is_some_and(|v| v != s) {
                        return Err(format!(
                            "--cfg.{key} has {s} inner lists but the other layer list has {}: both need one inner \
                             list per virtual pipeline stage",
                            vpp.unwrap_or_default()
                        ));
                    }
                    vpp = Some(s);
                }
                let name = if key.ends_with("llm_pp_layers") { "llm-pp-layers" } else { "vit-pp-layers" };
                let joined = flat.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
                out.extend([list_flag(command, name), joined]);
            }
            "parallel_config.tp_size" => {
                value.parse::<usize>().map_err(|_| format!("--cfg.{key} is {value:?}: expected a number"))?;
                let flag = if command == "hf-to-mm" { "--tp" } else { "--expect-tp" };
                out.extend([flag.into(), value.clone()]);
            }
            "parallel_config.ep_size" if value != "1" => {
                return Err(format!("--cfg.{key} is {value}: InternVL3 has no experts, use 1 or omit it"));
            }
            "trust_remote_code" => {
                // Nothing runs remote code here; the flag is accepted for compatibility.
                parse_bool(key, value)?;
            }
            _ => {}
        }
    }
    if let Some(v) = vpp {
        if command == "hf-to-mm" {
            out.extend(["--vpp".into(), v.to_string()]);
        }
    }
    if command == "hf-to-mm" {
        // What the seed's users expect from its converter: MindSpeed-MM's own torch files,
        // which its pretrain_vlm.py --load reads (mm-to-hf reads them back).
        out.extend(["--format".into(), "mindspeed".into()]);
    }
    Ok(out.into_iter().map(OsString::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn seed_hf_to_mm_translates() {
        let a = args(&[
            "mm-convert",
            "InternVLConverter",
            "hf_to_mm",
            "--cfg.mm_dir",
            "pretrained/InternVL3-8B",
            "--cfg.hf_config.hf_dir",
            "raw_ckpt/InternVL3-8B",
            "--cfg.parallel_config.llm_pp_layers",
            "[[6,8,8,6]]",
            "--cfg.parallel_config.vit_pp_layers",
            "[[24,0,0,0]]",
            "--cfg.parallel_config.tp_size",
            "8",
            "--cfg.trust_remote_code",
            "True",
        ]);
        assert!(is_seed_spelling(&a));
        assert_eq!(
            strings(translate(&a).unwrap()),
            vec![
                "mm-convert",
                "hf-to-mm",
                "--mm-dir",
                "pretrained/InternVL3-8B",
                "--hf-dir",
                "raw_ckpt/InternVL3-8B",
                "--llm-pp-layers",
                "6,8,8,6",
                "--vit-pp-layers",
                "24,0,0,0",
                "--tp",
                "8",
                "--format",
                "mindspeed"
            ]
        );
    }

    #[test]
    fn nested_lists_flatten_chunk_major() {
        assert_eq!(
            parse_layer_list("[[0,0,0,1],[4,4,4,4],[4,4,4,3]]").unwrap(),
            (vec![0, 0, 0, 1, 4, 4, 4, 4, 4, 4, 4, 3], Some(3))
        );
        assert_eq!(parse_layer_list("[6, 8, 8, 6]").unwrap(), (vec![6, 8, 8, 6], None));
        assert_eq!(parse_layer_list("28").unwrap(), (vec![28], None));
        for bad in ["[[6,8]", "[a]", "", "[[]]", "[6,[8]]"] {
            assert!(parse_layer_list(bad).is_err(), "{bad}");
        }
        let a = args(&[
            "mm-convert",
            "InternVLConverter",
            "hf_to_mm",
            "--cfg.parallel_config.llm_pp_layers=[[0,0,0,1],[4,4,4,4],[4,4,4,3]]",
            "--cfg.parallel_config.vit_pp_layers",
            "[[6,7,7,4],[0,0,0,0],[0,0,0,0]]",
        ]);
        let out = strings(translate(&a).unwrap());
        assert_eq!(out[2..4], ["--llm-pp-layers".to_string(), "0,0,0,1,4,4,4,4,4,4,4,3".to_string()]);
        assert_eq!(out[out.len() - 4..out.len() - 2], ["--vpp".to_string(), "3".to_string()]);
        assert_eq!(out[out.len() - 2..], ["--format".to_string(), "mindspeed".to_string()]);
    }

    #[test]
    fn seed_mm_to_hf_translates() {
        let a = args(&[
            "mm-convert",
            "InternVLConverter",
            "mm_to_hf",
            "--cfg.save_hf_dir",
            "out",
            "--cfg.mm_dir",
            "save",
            "--cfg.hf_config.hf_dir",
            "raw",
            "--cfg.parallel_config.llm_pp_layers",
            "[6,8,8,6]",
            "--cfg.parallel_config.tp_size",
            "1",
        ]);
        assert_eq!(
            strings(translate(&a).unwrap()),
            vec![
                "mm-convert",
                "mm-to-hf",
                "--hf-dir",
                "out",
                "--mm-dir",
                "save",
                "--assets-from",
                "raw",
                "--expect-llm-pp-layers",
                "6,8,8,6",
                "--expect-tp",
                "1"
            ]
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let err = translate(&args(&["m", "Qwen2VLConverter", "hf_to_mm"])).unwrap_err();
        assert!(err.contains("InternVL3 checkpoints only"), "{err}");
        let err = translate(&args(&["m", "InternVLConverter", "convert"])).unwrap_err();
        assert!(err.contains("hf_to_mm or mm_to_hf"), "{err}");
        let err = translate(&args(&["m", "InternVLConverter", "hf_to_mm", "--cfg.mm_dirr", "x"])).unwrap_err();
        assert!(err.contains("--cfg.mm_dirr is not") && err.contains("--cfg.mm_dir"), "{err}");
        let err = translate(&args(&["m", "InternVLConverter", "hf_to_mm", "--cfg.mm_dir"])).unwrap_err();
        assert!(err.contains("needs a value"), "{err}");
        let err =
            translate(&args(&["m", "InternVLConverter", "hf_to_mm", "--cfg.trust_remote_code", "yes"])).unwrap_err();
        assert!(err.contains("True or False"), "{err}");
        let err = translate(&args(&["m", "InternVLConverter", "hf_to_mm", "--cfg.parallel_config.tp_size", "x"]))
            .unwrap_err();
        assert!(err.contains("expected a number"), "{err}");
        assert!(!is_seed_spelling(&args(&["m", "hf-to-mm"])));
    }
}
