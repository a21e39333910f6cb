//! A workspace binary that tests run (built by cargo next to the test's own binaries), checked
//! to be current: `cargo test --workspace` (what `make test` runs) builds every binary first,
//! but `cargo test -p …` or plain `cargo test` (default-members leave the engine out) may not,
//! and a missing or stale binary must fail loudly instead of testing old code.
//! Used by tests/e2e_train.rs and, through `#[path]`, crates/engine/tests/train.rs.

use std::path::{Path, PathBuf};

/// `bin` in `profile_dir`, after checking it exists and is newer than every file under
/// `sources` (paths relative to the repository root); panics naming the file otherwise.
pub fn binary(profile_dir: &Path, bin: &str, package: &str, sources: &[&str]) -> PathBuf {
    let p = profile_dir.join(bin);
    if let Some(problem) = stale(&p, sources) {
        panic!(
            "{}: {problem}; build it (`cargo build -p {package}`, or run `make test`, which builds the whole \
             workspace)",
            p.display()
        );
    }
    p
}

/// Why `bin` cannot stand for `sources`: missing, or older than one of them.
fn stale(bin: &Path, sources: &[&str]) -> Option<String> {
    let built = match std::fs::metadata(bin).and_then(|m| m.modified()) {
        Ok(t) => t,
        Err(e) => return Some(format!("missing ({e})")),
    };
    let root = root();
    let mut stack: Vec<PathBuf> = sources.iter().map(|s| root.join(s)).collect();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else { continue };
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
        } else if meta.modified().is_ok_and(|m| m > built) {
            return Some(format!("older than {}", p.display()));
        }
    }
    None
}

/// The workspace root (the folder with Cargo.lock), whichever package's tests include this file.
pub fn root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().find(|a| a.join("Cargo.lock").is_file()).unwrap_or(here).to_path_buf()
}
