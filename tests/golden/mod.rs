//! Golden error messages for the bad-input corpora (tests/corpus/*/): each case is a `.yaml`
//! file that must fail, and its `.expected` file holds the exact error text.
//! `BLESS_CORPUS=1` rewrites the `.expected` files instead of comparing; review the diff.

use std::path::{Path, PathBuf};

/// The `.yaml` files of `dir`, sorted; fails unless there are at least `min`.
pub fn cases(dir: &str, min: usize) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= min, "expected at least {min} cases in {dir}, found {}", files.len());
    files
}

/// Runs every case through `run` (Ok: the case was accepted, which is a failure; Err: the
/// error's text) and compares with the `.expected` files; panics listing every mismatch.
pub fn check(cases: &[PathBuf], run: impl Fn(&Path) -> Result<(), String>) {
    let bless = std::env::var_os("BLESS_CORPUS").is_some();
    let mut failures = Vec::new();
    for yaml in cases {
        let expected_path = yaml.with_extension("expected");
        let actual = match run(yaml) {
            Ok(()) => {
                failures.push(format!("{}: was accepted", yaml.display()));
                continue;
            }
            Err(e) => e,
        };
        assert!(!actual.contains("panicked"), "{}: {actual}", yaml.display());
        if bless {
            std::fs::write(&expected_path, format!("{actual}\n")).expect("write .expected");
            continue;
        }
        match std::fs::read_to_string(&expected_path) {
            Err(_) => {
                failures.push(format!("{}: no {} (the error was:\n{actual})", yaml.display(), expected_path.display()))
            }
            Ok(expected) if expected.trim_end_matches('\n') != actual => failures.push(format!(
                "{}:\n--- expected\n{}\n--- actual\n{actual}",
                yaml.display(),
                expected.trim_end_matches('\n')
            )),
            Ok(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
