//! The command line the three tools share ("Three tools, one voice"): every flag documented in
//! `--help`, the exit codes (0 ok, 1 runtime, 2 usage or configuration, 3 layout misfit), a missing data file
//! reported once under the flag that named it, advice in the launcher's spelling when the
//! launcher started the engine, and `synth --out` refusing an occupied folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn engine() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mm-engine"));
    c.env_remove("WORLD_SIZE").env_remove("LAUNCH_RUN_ID");
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tiny model and data set, written into an existing empty folder (which synth accepts).
fn synth() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mm-engine-cli");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let o = engine().args(["synth", "--samples", "4", "--no-video", "--out"]).arg(&dir).output().unwrap();
        assert!(o.status.success(), "synth into an empty folder: {}", text(&o));
        dir
    })
}

/// `(flag line, description)` of every option line of `help`: a line indented by at most 6
/// spaces that starts with `-` (deeper ones continue a description). clap's short layout puts
/// the description after the flag column (two spaces or more) on the same line; its long layout
/// on the next, more indented, lines. Empty when neither holds text ("[default: …]" is not one).
fn options(help: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = help.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_flag = |l: &str| l.starts_with(' ') && l.trim_start().starts_with('-') && indent(l) <= 6;
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !is_flag(line) {
            continue;
        }
        let t = line.trim_start();
        let (flag, same) = t.split_once("  ").map(|(f, d)| (f.trim(), d.trim())).unwrap_or((t, ""));
        let mut desc = vec![same.to_string()];
        for next in &lines[i + 1..] {
            if is_flag(next) || (!next.trim().is_empty() && indent(next) <= indent(line)) {
                break;
            }
            desc.push(next.trim().to_string());
        }
        let text = |d: &str| !d.is_empty() && !d.starts_with('[');
        let described =
            text(same) || (same.is_empty() && lines.get(i + 1).is_some_and(|n| !is_flag(n) && text(n.trim())));
        out.push((flag.to_string(), if described { desc.join(" ").trim().to_string() } else { String::new() }));
    }
    out
}

fn help(sub: &str) -> String {
    let o = engine().args([sub, "--help"]).output().unwrap();
    assert!(o.status.success(), "{sub} --help: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_flag_of_train_eval_and_synth_has_a_description() {
    for sub in ["train", "eval", "synth"] {
        let h = help(sub);
        let opts = options(&h);
        assert!(opts.len() > 5, "{sub}: no options parsed from:\n{h}");
        for (flag, desc) in &opts {
            assert!(!desc.is_empty(), "{sub}: {flag} has no description in:\n{h}");
        }
        if sub == "train" {
            for flag in ["--lr-decay-style", "--weight-decay", "--log-interval", "--save-interval"] {
                let (_, desc) = opts.iter().find(|(f, _)| f.starts_with(&format!("{flag} "))).unwrap();
                assert!(desc.contains("launch always passes the recipe's value"), "{flag}: {desc}");
            }
        }
    }
    let o = engine().arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&o.stdout);
    for code in ["0 ", "1 ", "2 ", "128+N"] {
        assert!(top.lines().any(|l| l.trim_start().starts_with(code)), "exit code {code} not listed:\n{top}");
    }
}

#[test]
fn usage_and_configuration_errors_exit_2() {
    // Flags that parse but do not go together: checked after parsing, still exit code 2.
    let o = engine()
        .args(["train", "--data-path", "x.jsonl", "--lr", "0.001", "--train-iters", "0", "--fp16"])
        .args(["--save-interval", "5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let e = stderr(&o);
    assert!(e.contains("invalid train flags") && e.contains("--train-iters 0") && e.contains("--fp16"), "{e}");
    // clap's own syntax errors.
    let o = engine().args(["train", "--data-path", "x.jsonl"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = engine().args(["eval", "--load", "m", "--data-path", "x.jsonl", "--dump-logits", "2"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("--dump-logits 2 needs --out FILE"), "{}", text(&o));
}

#[test]
fn layout_misfits_exit_3() {
    let d = synth();
    let train = |extra: &[&str]| {
        engine()
            .args(["train", "--data-path"])
            .arg(d.join("data/train.jsonl"))
            .arg("--load")
            .arg(d.join("model"))
            .args(["--lr", "0.001", "--train-iters", "1", "--seq-length", "512", "--device", "cpu"])
            .args(extra)
            .output()
            .unwrap()
    };
    // Two pipeline stages in a world of one.
    let o = train(&["--pipeline-model-parallel-size", "2"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(stderr(&o).contains("WORLD_SIZE 1 is not a multiple of"), "{}", text(&o));
    // A pipeline split that does not sum to the model's depth (found with the model).
    let o = train(&["--llm-pp-layers", "99"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(stderr(&o).contains("--llm-pp-layers"), "{}", text(&o));
    // A layout misfit beside a usage error is a usage error.
    let o = train(&["--pipeline-model-parallel-size", "2", "--log-interval", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // collective-check's layout.
    let o = engine()
        .args(["collective-check", "--tp", "2"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "3")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "29533")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[test]
fn a_missing_data_file_is_reported_once_under_the_flag_used() {
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("nothing.jsonl");
    let cause = "No such file or directory (os error 2)";
    let check = |o: Output, flag: &str| {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let e = stderr(&o);
        assert!(e.contains(&format!("{flag} {}: {cause}", missing.display())), "{flag}: {e}");
        assert_eq!(e.matches("No such file").count(), 1, "{flag}: the cause is printed once: {e}");
    };
    let train = engine()
        .args(["train", "--data-path"])
        .arg(&missing)
        .arg("--tokenizer")
        .arg(d.join("model"))
        .args(["--lr", "0.001", "--train-iters", "1", "--seq-length", "512", "--device", "cpu"])
        .output()
        .unwrap();
    check(train, "--data-path");
    for flag in ["--data-path", "--data"] {
        let eval = engine()
            .args(["eval", "--device", "cpu", "--seq-length", "512", "--load"])
            .arg(d.join("model"))
            .arg(flag)
            .arg(&missing)
            .output()
            .unwrap();
        check(eval, flag);
    }
}

#[test]
fn nothing_to_train_suggests_the_flag_of_whoever_started_the_engine() {
    let d = synth();
    let work = tempfile::tempdir().unwrap();
    let save = work.path().join("save");
    let train = || {
        let mut c = engine();
        c.args(["train", "--data-path"])
            .arg(d.join("data/train.jsonl"))
            .arg("--load")
            .arg(d.join("model"))
            .arg("--save")
            .arg(&save)
            .args(["--auto-resume", "--lr", "0.001", "--train-iters", "1", "--seq-length", "512"])
            .args(["--max-dynamic-patch", "1", "--log-interval", "1", "--device", "cpu"]);
        c
    };
    let o = train().output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // By hand: the engine's flag.
    let o = train().output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("nothing to train: the checkpoint is at iteration 1, --train-iters is 1"), "{t}");
    assert!(t.contains("pass --train-iters N with N above 1 to continue"), "{t}");
    assert!(!t.contains("--set "), "{t}");
    // Started by the launcher: its spelling, and not the engine flag.
    let o = train().env("LAUNCH_RUN_ID", "run-test").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("train.train_iters is 1; pass --set train.train_iters=N with N above 1 to continue"), "{t}");
    assert!(!t.contains("--train-iters"), "{t}");
}

#[test]
fn synth_refuses_an_occupied_out_folder_unless_forced() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("runs/tiny");
    // A synth folder a run has saved into.
    std::fs::create_dir_all(out.join("save/iter_0000002")).unwrap();
    let synth = |force: bool| {
        let mut c = engine();
        c.args(["synth", "--samples", "2", "--no-video", "--out"]).arg(&out);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let o = synth(false);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let e = stderr(&o);
    assert!(e.contains(&out.display().to_string()) && e.contains("--force"), "{e}");
    assert!(out.join("save/iter_0000002").exists(), "nothing is touched without --force");
    let o = synth(true);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.join("save").exists(), "--force replaces the folder");
    assert!(out.join("model/config.json").is_file() && out.join("data/train.jsonl").is_file());
    // A folder holding anything a synth folder does not is never deleted, --force or not.
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = synth(true);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("it holds keep.txt besides"), "{}", stderr(&o));
    assert!(out.join("keep.txt").exists() && out.join("model/config.json").is_file(), "untouched");
    // A file where the folder should be is refused too.
    let file = work.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = engine().args(["synth", "--samples", "2", "--no-video", "--out"]).arg(&file).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
