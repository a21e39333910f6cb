//! Shared by the multi-process tests: the built `mm-engine` started as N ranks on 127.0.0.1
//! with the environment the launcher sets (Gloo over loopback), and what rank 0 reports.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use mm_spec::ProgressEvent;

/// `mm-engine synth --samples 16 EXTRA` into a temporary folder named after `tag`, made once
/// per test binary (the first call's arguments make it).
pub fn synth_once(tag: &str, extra: &[&str]) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mm-engine-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        let o = engine().args(["synth", "--samples", "16"]).args(extra).arg("--out").arg(&dir).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        dir
    })
}

/// `train --model tiny` on the data and tokenizer of `dir` (a [`synth_once`] folder; its
/// model loaded when `load`), the CPU flags every test shares (one tile per image, short
/// videos, a log line per step), then `flags` (whitespace separated).
pub fn tiny_train_args(dir: &Path, load: bool, flags: &str) -> Vec<String> {
    let mut v: Vec<String> = vec!["train".into(), "--model".into(), "tiny".into()];
    let mut paths = vec![
        ("--data-path", dir.join("data/train.jsonl")),
        ("--data-folder", dir.join("data")),
        ("--tokenizer", dir.join("model")),
    ];
    if load {
        paths.push(("--load", dir.join("model")));
    }
    for (k, p) in paths {
        v.push(k.into());
        v.push(p.display().to_string());
    }
    let common = "--device cpu --seq-length 512 --use-thumbnail --max-dynamic-patch 1 --min-num-frame 2 \
        --max-num-frame 4 --log-interval 1 --micro-batch-size 1 --lr 0.002";
    v.extend(common.split_whitespace().chain(flags.split_whitespace()).map(String::from));
    v
}

/// A child's stdout lines, read on a thread.
pub fn lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// The binary with no inherited rank environment.
pub fn engine() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mm-engine"));
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MM_BIND_ADDR"] {
        c.env_remove(v);
    }
    c
}

pub fn text(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// Rank `rank` of `world`, as the launcher starts it.
pub fn rank_cmd(rank: usize, world: usize, port: u16, timeout_s: u64, args: &[String]) -> Command {
    let mut c = engine();
    c.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("MM_DIST_TIMEOUT_S", timeout_s.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `world` ranks to the end; every one must succeed (the failures are reported together).
pub fn launch(world: usize, args: &[String]) -> Vec<Output> {
    launch_with(world, args, &[])
}

/// [`launch`] with `env` added to every rank's environment.
pub fn launch_with(world: usize, args: &[String], env: &[(&str, &str)]) -> Vec<Output> {
    let mut tries = 0;
    let outputs = loop {
        // The port is free when picked and may be taken before rank 0 binds it (tests and
        // other jobs pick ports at the same time): a rendezvous that could not listen runs
        // again on another port, nothing else does.
        let port = free_port();
        let children: Vec<Child> = (0..world)
            .map(|r| rank_cmd(r, world, port, 60, args).envs(env.iter().copied()).spawn().expect("spawn mm-engine"))
            .collect();
        let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        let port_taken = String::from_utf8_lossy(&outputs[0].stderr).contains("EADDRINUSE");
        tries += 1;
        if !port_taken || tries == 3 {
            break outputs;
        }
        eprintln!("port {port} was taken before rank 0 could listen on it; again on another port");
    };
    let failed: Vec<String> = outputs
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.status.success())
        .map(|(r, o)| format!("rank {r} failed:\n{}", text(o)))
        .collect();
    assert!(failed.is_empty(), "{world} ranks:\n{}", failed.join("\n"));
    outputs
}

pub fn events(o: &Output) -> Vec<ProgressEvent> {
    String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| ProgressEvent::parse(l)?.ok()).collect()
}

/// (iteration, loss, grad norm) of each step the rank reported.
pub fn steps(o: &Output) -> Vec<(u64, f64, f64)> {
    events(o)
        .into_iter()
        .filter_map(|e| match e {
            ProgressEvent::Step(p) => Some((p.iteration, p.loss, p.grad_norm.unwrap_or(f64::NAN))),
            _ => None,
        })
        .collect()
}

/// The `lm loss` of each ` validation loss at iteration N` line a rank printed, in order.
pub fn validation_losses(o: &Output) -> Vec<f64> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split(" validation loss at iteration ").nth(1))
        .map(|l| l.split("lm loss: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// Asserts that `got`'s losses and gradient norms are `want`'s, step by step, within
/// `tolerance` relative (0: equal), naming `what` and the step that is not; returns the
/// largest relative difference.
pub fn assert_steps_close(what: &str, got: &[(u64, f64, f64)], want: &[(u64, f64, f64)], tolerance: f64) -> f64 {
    assert_eq!(
        got.iter().map(|s| s.0).collect::<Vec<_>>(),
        want.iter().map(|s| s.0).collect::<Vec<_>>(),
        "{what}: the iterations differ"
    );
    let mut worst = 0f64;
    for ((i, l, n), (_, wl, wn)) in got.iter().zip(want) {
        let (rl, rn) = ((l - wl).abs() / wl.abs(), (n - wn).abs() / wn.abs());
        assert!(
            rl <= tolerance && rn <= tolerance,
            "{what}: iteration {i}: loss {l} vs {wl} ({rl:e}), norm {n} vs {wn} ({rn:e})"
        );
        worst = worst.max(rl).max(rn);
    }
    worst
}

/// One process's (iteration, loss, grad norm) of `args`, run once per test binary (the first
/// call's arguments make it), which must report `iters` steps.
pub fn single_once(args: &[String], iters: usize) -> &'static Vec<(u64, f64, f64)> {
    static ONE: OnceLock<Vec<(u64, f64, f64)>> = OnceLock::new();
    ONE.get_or_init(|| {
        let o = launch(1, args);
        let s = steps(&o[0]);
        assert_eq!(s.len(), iters, "{}", text(&o[0]));
        s
    })
}
