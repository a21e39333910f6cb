//! The contract of "one owner for every fact": the same config.json files, fed through the
//! converter's entry point (`mm_convert::hf::read_config`) and the engine's
//! (`mm_engine::weights::load_config`), give the same architecture or the same error. The
//! files are the seed's 8B and 78B in both schemas (the -hf ones written by transformers'
//! own InternVLConfig, crates/spec/tests/configs/make.py) and an incomplete one.

use std::path::Path;

const CONFIGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/tests/configs");

fn folder_with(config: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(config, dir.path().join("config.json")).unwrap();
    dir
}

#[test]
fn converter_and_engine_read_the_same_model_or_the_same_error() {
    let cases = [
        ("internvl3-8b.json", Some("8b")),
        ("internvl3-8b-hf.json", Some("8b")),
        ("internvl3-78b.json", Some("78b")),
        ("internvl3-78b-hf.json", Some("78b")),
        ("incomplete-hf.json", None),
    ];
    for (file, preset) in cases {
        let dir = folder_with(&Path::new(CONFIGS).join(file));
        let name = dir.path().file_name().unwrap().to_string_lossy().into_owned();
        let convert = mm_convert::hf::read_config(dir.path()).map(|c| c.arch);
        let engine = mm_engine::weights::load_config(dir.path(), &name);
        match (convert, engine, preset) {
            (Ok(c), Ok(e), Some(p)) => {
                assert_eq!(c, e, "{file}: the converter and the engine read different models");
                let mut want = mm_spec::preset(p).unwrap();
                want.name = name.clone();
                assert_eq!(e, want, "{file}: not the seed's {p}");
            }
            (Err(c), Err(e), None) => {
                assert_eq!(c.to_string(), e.to_string(), "{file}: the two tools word the error differently");
                assert!(e.to_string().contains("text_config.num_hidden_layers: is missing"), "{e}");
                assert!(e.to_string().contains(&format!("{name}/config.json")), "{e}: names the file");
            }
            (c, e, _) => panic!("{file}: converter {c:?}, engine {e:?}"),
        }
    }
}
