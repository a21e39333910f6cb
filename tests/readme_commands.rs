//! The README's commands, run as typed: every fenced block marked `bash ci` runs verbatim with
//! `bash -e`, each in a fresh folder that holds this repository's `clusters/`, with the
//! workspace's test build standing in for `target/release/` and first on PATH (for the bare
//! `launch`, `mm-engine`, `mm-convert`). A README edit that breaks a command, or a tool change
//! that breaks the README, fails here.

mod fresh;

use std::path::{Path, PathBuf};
use std::process::Command;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const LAUNCH: &str = env!("CARGO_BIN_EXE_launch");

/// The `bash ci` blocks of `text`: (line of the fence, the block's text).
fn ci_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match (&mut open, line.trim_start()) {
            (None, l) if l.starts_with("```bash") && l.split_whitespace().any(|w| w == "ci") => {
                open = Some((i + 1, String::new()));
            }
            (Some(_), l) if l.starts_with("```") => blocks.extend(open.take()),
            (Some((_, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(open.is_none(), "README.md: a `bash ci` block is not closed");
    blocks
}

/// The folder of the workspace's binaries, with those the blocks use checked to be current.
fn bin_dir(blocks: &[(usize, String)]) -> PathBuf {
    let dir = Path::new(LAUNCH).parent().unwrap().to_path_buf();
    let uses = |bin: &str| blocks.iter().any(|(_, b)| b.contains(bin));
    if uses("mm-engine") {
        let engine = ["crates/engine/src", "crates/engine/csrc", "crates/engine/build.rs", "crates/spec/src"];
        fresh::binary(&dir, "mm-engine", "mm-engine", &engine);
    }
    if uses("mm-convert") {
        fresh::binary(&dir, "mm-convert", "mm-convert", &["crates/convert/src", "crates/spec/src"]);
    }
    dir
}

#[test]
fn the_marked_blocks_are_found() {
    let blocks = ci_blocks("a\n```bash ci\nx 1\ny \\\n  2\n```\n```bash\nno\n```\n```bash ci\nz\n```\n");
    assert_eq!(blocks, [(2, "x 1\ny \\\n  2\n".to_string()), (10, "z\n".to_string())]);
}

#[test]
fn every_ci_block_of_the_readme_runs_as_typed() {
    let readme = std::fs::read_to_string(format!("{REPO}/README.md")).unwrap();
    let blocks = ci_blocks(&readme);
    assert!(blocks.len() >= 4, "README.md has {} `bash ci` blocks", blocks.len());
    let bins = bin_dir(&blocks);
    let path = format!("{}:{}", bins.display(), std::env::var("PATH").unwrap_or_default());
    for (line, body) in blocks {
        let dir = tempfile::Builder::new().prefix("mm-readme-").tempdir().unwrap();
        std::os::unix::fs::symlink(format!("{REPO}/clusters"), dir.path().join("clusters")).unwrap();
        std::fs::create_dir(dir.path().join("target")).unwrap();
        std::os::unix::fs::symlink(&bins, dir.path().join("target/release")).unwrap();
        // A hung block (a rendezvous that never completes) fails instead of hanging the suite.
        let o = Command::new("timeout")
            .args(["300", "bash", "-e", "-c", &body])
            .current_dir(dir.path())
            .env("PATH", &path)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "README.md line {line}: the block failed ({}):\n{body}\nstdout:\n{}\nstderr:\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
