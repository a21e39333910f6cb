//! Data-parallel training end to end: the built `mm-engine` binary started as N processes on
//! 127.0.0.1 (RANK/WORLD_SIZE/… as the launcher sets them, Gloo over loopback), on
//! `mm-engine synth` output.
//!
//! - 2 and 4 ranks, with and without the distributed optimizer, give one rank's losses;
//! - a stopped and resumed 2-rank run is bit-identical to an uninterrupted one, and its
//!   sharded optimizer state resumes on 1 and 4 ranks (resharded);
//! - a killed or stopped rank makes the others fail fast with an error naming the collective.

mod ranks;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mm_spec::checkpoint::Manifest;
use mm_spec::ProgressEvent;
use ranks::{events, free_port, launch, lines, rank_cmd, steps, text};

fn synth() -> &'static Path {
    ranks::synth_once("dp", &[])
}

/// The training flags of every run here (tiny model, one tile per image, per-token loss).
fn train_args(extra: &str) -> Vec<String> {
    ranks::tiny_train_args(synth(), false, &format!("--log-tps --loss-reduction per_token --seed 7 {extra}"))
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// The largest relative difference of losses and grad norms between two runs' steps.
fn max_rel(a: &[(u64, f64, f64)], b: &[(u64, f64, f64)]) -> (f64, f64) {
    assert_eq!(a.iter().map(|s| s.0).collect::<Vec<_>>(), b.iter().map(|s| s.0).collect::<Vec<_>>());
    let loss = a.iter().zip(b).map(|(x, y)| rel(x.1, y.1)).fold(0.0, f64::max);
    let norm = a.iter().zip(b).map(|(x, y)| rel(x.2, y.2)).fold(0.0, f64::max);
    (loss, norm)
}

/// The token count of the end-of-run throughput line.
fn summary_tokens(o: &Output) -> u64 {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.starts_with("throughput")).unwrap_or_else(|| panic!("no summary:\n{}", text(o)));
    let before = line.split(" tokens (").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn two_and_four_ranks_give_the_losses_of_one_with_and_without_zero1() {
    let args = |extra: &str| {
        train_args(&format!("--load {} --train-iters 4 --global-batch-size 4 {extra}", synth().join("model").display()))
    };
    let one = launch(1, &args(""));
    let want = steps(&one[0]);
    assert_eq!(want.len(), 4, "{}", text(&one[0]));
    let tokens = summary_tokens(&one[0]);
    // Small buckets in one run: many all-reduces, and a bucket boundary inside most tensors' neighbours.
    for (world, extra) in
        [(2, ""), (2, "--use-distributed-optimizer"), (4, "--dp-bucket-mb 0.05"), (4, "--use-distributed-optimizer")]
    {
        let out = launch(world, &args(extra));
        let got = steps(&out[0]);
        let (loss, norm) = max_rel(&got, &want);
        println!("{world} ranks {extra:?}: max relative difference to 1 rank: loss {loss:.2e}, grad norm {norm:.2e}");
        assert!(loss < 1e-5 && norm < 1e-5, "{world} ranks {extra}: {got:?} vs {want:?}");
        // Progress lines come from global rank 0 only; the others log plain text.
        for (r, o) in out.iter().enumerate().skip(1) {
            assert!(events(o).is_empty(), "rank {r} printed progress lines:\n{}", text(o));
            assert!(String::from_utf8_lossy(&o.stdout).contains("iteration        4/       4"), "{}", text(o));
        }
        // Throughput counts the whole group: the global batch's samples and tokens.
        let done = events(&out[0]);
        let ProgressEvent::Step(last) = &done[done.len() - 2] else { panic!("{done:?}") };
        assert_eq!(last.consumed_samples, 16);
        assert!(last.tokens_per_sec > 0.0 && last.samples_per_sec > 0.0);
        assert!(matches!(done.last(), Some(ProgressEvent::Done(mm_spec::progress::RunSummary { iteration: 4, .. }))));
        assert_eq!(summary_tokens(&out[0]), tokens, "{world} ranks: tokens over the group");
        let stdout = String::from_utf8_lossy(&out[0].stdout);
        assert!(stdout.contains(&format!("throughput over {world} data-parallel ranks: 4 iterations")), "{stdout}");
    }
}

#[test]
fn a_stopped_two_rank_run_resumes_bit_identically_and_reshards_to_one_and_four_ranks() {
    let work = tempfile::tempdir().unwrap();
    let model = synth().join("model");
    let common = "--train-iters 6 --global-batch-size 4 --use-distributed-optimizer --lr-decay-style cosine --lr-warmup-fraction 0.2 \
        --weight-decay 0.05 --clip-grad 1.0";
    let run = |world: usize, load: &Path, more: &str| {
        launch(world, &train_args(&format!("{common} --load {} {more}", load.display())))
    };
    let straight = work.path().join("straight");
    let a = run(2, &model, &format!("--save {} --save-interval 3", straight.display()));
    let resumed = work.path().join("resumed");
    let b1 = run(2, &model, &format!("--save {} --exit-interval 3", resumed.display()));
    let b2 = run(2, &resumed, &format!("--save {}", resumed.display()));
    let (la, lb) = (steps(&a[0]), [steps(&b1[0]), steps(&b2[0])].concat());
    assert_eq!(la.len(), 6, "{}", text(&a[0]));
    assert_eq!(lb.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!((x.1.to_bits(), x.2.to_bits()), (y.1.to_bits(), y.2.to_bits()), "iteration {}: {x:?} vs {y:?}", x.0);
    }
    let file = |dir: &Path, f: &str| std::fs::read(dir.join("iter_0000006/mp_rank_00").join(f)).unwrap();
    for f in ["model.safetensors", "optimizer.dp0-of-2.safetensors", "optimizer.dp1-of-2.safetensors"] {
        assert!(file(&straight, f) == file(&resumed, f), "{f} differs after the resume");
    }

    // The layout: MM files by DP rank 0, one optimizer shard per rank, the flat layout in the state.
    let iter = straight.join("iter_0000003");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(iter.join("manifest.json")).unwrap()).unwrap();
    manifest.verify().unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(iter.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!((state["data_parallel_size"].as_u64(), state["optimizer_layout"]["dp"].as_u64()), (Some(2), Some(2)));
    assert_eq!(state["data_position"], 12);
    assert!(!iter.join("mp_rank_00/optimizer.safetensors").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&straight)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(!String::from_utf8_lossy(&a[1].stdout).contains("saved checkpoint"), "rank 1 reported a save");

    // Resharding: iteration 3's two shards resume on 4 ranks (ZeRO) and on 1 rank (AdamW);
    // the 1-rank run's per-parameter save at 5 resumes on 2 ranks (ZeRO) again.
    let four = run(4, &iter, "");
    let hop = work.path().join("hop");
    let one = run(1, &iter, &format!("--save {} --exit-interval 5", hop.display()));
    let two = run(2, &hop, "");
    for (name, got) in [("4 ranks", steps(&four[0])), ("1 rank", steps(&one[0])), ("2 ranks from 1", steps(&two[0]))] {
        let first = got[0].0 as usize;
        let (loss, norm) = max_rel(&got, &la[first - 1..first - 1 + got.len()]);
        println!("resharded to {name}: max relative difference: loss {loss:.2e}, grad norm {norm:.2e}");
        assert!(loss < 1e-5 && norm < 1e-5, "{name}: {got:?} vs {la:?}");
    }
    assert_eq!(steps(&two[0]).iter().map(|s| s.0).collect::<Vec<_>>(), [6]);
}

#[test]
fn ranks_started_with_different_flags_refuse_to_train() {
    let port = free_port();
    let model = synth().join("model");
    let children: Vec<Child> = [4, 5]
        .iter()
        .enumerate()
        .map(|(r, iters)| {
            let args = train_args(&format!("--load {} --global-batch-size 2 --train-iters {iters}", model.display()));
            rank_cmd(r, 2, port, 60, &args).spawn().unwrap()
        })
        .collect();
    for (r, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(!o.status.success(), "rank {r} trained:\n{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("rank {r}: agreement on the job")), "{err}");
        assert!(err.contains("data-parallel ranks [1] differ from rank 0"), "{err}");
        assert!(events(&o).is_empty(), "no training step ran");
    }
}

/// Waits up to `limit` for `child` to exit; kills it and fails the test if it does not.
fn exit_within(child: &mut Child, limit: Duration, what: &str) -> (std::process::ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}: it hangs in a collective");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut s).unwrap();
    s
}

/// Starts two ranks of a long run and returns them once global rank 0 logged iteration 2.
fn two_running(timeout_s: u64) -> Vec<Child> {
    let args =
        train_args(&format!("--load {} --train-iters 100000 --global-batch-size 2", synth().join("model").display()));
    let port = free_port();
    // Rank 1's stdout is not read: it prints little (one line per iteration) and is killed soon.
    let mut children: Vec<Child> = (0..2)
        .map(|r| {
            let mut c = rank_cmd(r, 2, port, timeout_s, &args);
            if r == 1 {
                c.stdout(Stdio::null());
            }
            c.spawn().unwrap()
        })
        .collect();
    let rx = lines(&mut children[0]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        match line.ok().and_then(|l| ProgressEvent::parse(&l)?.ok()) {
            Some(ProgressEvent::Step(p)) if p.iteration >= 2 => break,
            _ if Instant::now() > deadline => {
                for c in &mut children {
                    let _ = c.kill();
                }
                panic!("the two ranks did not reach iteration 2");
            }
            _ => {}
        }
    }
    // Keep draining rank 0's stdout so it never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    children
}

#[test]
fn a_killed_or_stopped_rank_makes_the_other_fail_fast_naming_the_collective() {
    // SIGKILL: Gloo sees the closed socket at once.
    let timeout = 5;
    let mut ranks = two_running(timeout);
    ranks[1].kill().unwrap();
    let _ = ranks[1].wait();
    let (status, took) =
        exit_within(&mut ranks[0], Duration::from_secs(timeout + 15), "rank 0 after rank 1 was killed");
    let err = stderr_of(&mut ranks[0]);
    println!("rank 0 exited {took:?} after rank 1 was killed: {}", err.trim());
    assert_eq!(status.code(), Some(1), "a clean error exit: {err}");
    assert!(err.contains("mm-engine: error: rank 0: "), "{err}");
    assert!(
        ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier"].iter().any(|op| err.contains(op)),
        "the failed collective is named: {err}"
    );

    // SIGSTOP: rank 0 is alive but silent; rank 1 gives up after MM_DIST_TIMEOUT_S.
    let timeout = 3;
    let mut ranks = two_running(timeout);
    let pid = ranks[0].id().to_string();
    let stop = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(stop.success());
    let result = exit_within(&mut ranks[1], Duration::from_secs(timeout + 15), "rank 1 after rank 0 was stopped");
    let _ = ranks[0].kill();
    let _ = ranks[0].wait();
    let (status, took) = result;
    let err = stderr_of(&mut ranks[1]);
    println!("rank 1 exited {took:?} after rank 0 was stopped: {}", err.trim());
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(took >= Duration::from_secs(timeout - 1), "it waited for the timeout: {took:?}");
    assert!(err.contains("mm-engine: error: rank 1: "), "{err}");
    assert!(err.contains(&format!("no answer within MM_DIST_TIMEOUT_S = {timeout} s")), "{err}");
}
