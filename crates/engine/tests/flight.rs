//! The rank state file, fault injection and the agreed stop, end to end: the built
//! `mm-engine` as 1 to 3 ranks on 127.0.0.1 (Gloo over loopback) on `mm-engine synth` output.
//!
//! - every rank writes `$MM_RANK_STATE_DIR/rank-R.json` (phase, iteration, groups, the last
//!   collectives with per-group sequence numbers that agree across ranks);
//! - `MM_ENGINE_FAULT=sleep:…` makes mm-spec's diagnosis name the sleeping rank, and
//!   `desync:…` a collective desync, from the state files alone;
//! - SIGTERM to one rank stops every rank after the same iteration with a checkpoint and exit
//!   code 143, and the resumed run ends bit-identical to an uninterrupted one; a second signal
//!   kills at once; a malformed fault variable fails at startup.

mod ranks;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mm_spec::flight::{diagnose, state_file_name, Diagnosis, Phase, RankState, RankView, FAULT_ENV, STATE_DIR_ENV};
use mm_spec::progress::RunSummary;
use mm_spec::ProgressEvent;
use ranks::{events, free_port, launch, lines, rank_cmd, steps, text};

fn synth() -> &'static Path {
    ranks::synth_once("flight", &[])
}

/// Tiny model, one sample per rank and step.
fn train_args(extra: &str) -> Vec<String> {
    ranks::tiny_train_args(synth(), true, &format!("--loss-reduction per_token --seed 7 {extra}"))
}

/// Running ranks, killed when the test ends (passed or not).
struct Ranks(Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `world` ranks with `env` on top of the launcher's variables.
fn start(world: usize, timeout_s: u64, args: &[String], env: &[(&str, &str)]) -> Ranks {
    let port = free_port();
    Ranks(
        (0..world)
            .map(|r| {
                let mut c = rank_cmd(r, world, port, timeout_s, args);
                c.env_remove(FAULT_ENV).env_remove(STATE_DIR_ENV);
                for (k, v) in env {
                    c.env(k, v);
                }
                c.spawn().expect("spawn mm-engine")
            })
            .collect(),
    )
}

/// Reads `rx` until a Step event of at least `iteration` (panics after `limit`); returns every
/// line read.
fn until_step(rx: &mpsc::Receiver<String>, iteration: u64, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no step {iteration} within {limit:?}: {seen:#?}"));
        let at = matches!(ProgressEvent::parse(&line), Some(Ok(ProgressEvent::Step(p))) if p.iteration >= iteration);
        seen.push(line);
        if at {
            return seen;
        }
    }
}

/// Waits for the child, at most `limit`.
fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn read_to_string(r: Option<impl std::io::Read>) -> String {
    let mut s = String::new();
    if let Some(mut r) = r {
        let _ = r.read_to_string(&mut s);
    }
    s
}

/// Every rank's state file that exists and parses.
fn states(dir: &Path, world: usize) -> Vec<Option<RankState>> {
    (0..world)
        .map(|r| {
            let bytes = std::fs::read(dir.join(state_file_name(r))).ok()?;
            Some(serde_json::from_slice(&bytes).expect("a state file always parses (written by rename)"))
        })
        .collect()
}

fn diagnosis(states: &[Option<RankState>]) -> Diagnosis {
    let views: Vec<RankView> = states
        .iter()
        .enumerate()
        .map(|(rank, s)| RankView {
            rank,
            host: "localhost",
            pid: s.as_ref().map(|s| s.pid),
            proc_state: None,
            state: s.as_ref(),
        })
        .collect();
    diagnose(&views)
}

/// Polls the state files until every rank is in a training step and no file changed for 2.5 s
/// (a dozen writer periods, and longer than a tiny step's compute on a loaded machine: a
/// stall, as the launcher's watchdog sees one), then diagnoses
/// them (panics after `limit`). Earlier, the files can disagree for a moment (each rank
/// writes on its own 200 ms clock), which a diagnosis must not be asked about.
fn diagnose_stall(dir: &Path, world: usize, limit: Duration) -> (Diagnosis, Vec<RankState>) {
    let deadline = Instant::now() + limit;
    let mut still: Option<(Vec<u64>, Instant)> = None;
    loop {
        let s = states(dir, world);
        if s.iter().all(|s| s.as_ref().is_some_and(|s| s.phase == Phase::Step)) {
            let ticks: Vec<u64> = s.iter().flatten().map(|s| s.ticks).collect();
            match &still {
                Some((t, since)) if *t == ticks => {
                    if since.elapsed() >= Duration::from_millis(2500) {
                        return (diagnosis(&s), s.into_iter().flatten().collect());
                    }
                }
                _ => still = Some((ticks, Instant::now())),
            }
        }
        assert!(Instant::now() < deadline, "no stall within {limit:?}; states: {s:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn done(o: &Output) -> RunSummary {
    events(o)
        .into_iter()
        .find_map(|e| match e {
            ProgressEvent::Done(s) => Some(s),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no done event:\n{}", text(o)))
}

#[test]
fn every_rank_writes_its_state_file_with_sequence_numbers_that_agree() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("state");
    let args = train_args("--train-iters 3 --global-batch-size 2");
    let mut ranks = start(2, 60, &args, &[(STATE_DIR_ENV, dir.to_str().unwrap())]);
    let outputs: Vec<Output> =
        std::mem::take(&mut ranks.0).into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (r, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    let s: Vec<RankState> = states(&dir, 2).into_iter().map(|s| s.expect("a state file per rank")).collect();
    for (r, st) in s.iter().enumerate() {
        assert_eq!((st.rank, st.phase, st.iteration, st.stop.as_deref()), (r, Phase::Done, 3, None), "{st:#?}");
        assert!(st.pid > 0 && st.ticks > 0 && st.updated_ms > 0, "{st:#?}");
        assert_eq!(st.groups.get("world"), Some(&vec![0, 1]), "{st:#?}");
        assert_eq!(st.groups.get("dp[0,1]"), Some(&vec![0, 1]), "{st:#?}");
        assert!(!st.collectives.is_empty() && st.collectives.len() <= mm_spec::flight::RING);
        assert!(st.collectives.iter().all(|c| c.end_ms.is_some_and(|e| e >= c.start_ms)), "{st:#?}");
        assert!(st.in_flight().is_none());
        // The loop's collectives say what they are for.
        for what in ["step totals: micro batches, samples, supervised and real tokens, model FLOPs", "end of training"]
        {
            assert!(st.collectives.iter().any(|c| c.what == what), "{what:?} missing: {st:#?}");
        }
        let stop = st.collectives.iter().find(|c| c.what.starts_with("stop agreement")).expect("a stop agreement");
        assert_eq!((stop.group.as_str(), stop.op.as_str()), ("world", "all_reduce"));
    }
    // The same collectives in the same order, numbered alike per group, on both ranks.
    let key = |st: &RankState| -> Vec<(String, u64, String, String)> {
        st.collectives.iter().map(|c| (c.group.clone(), c.seq, c.op.clone(), c.what.clone())).collect()
    };
    assert_eq!(key(&s[0]), key(&s[1]));
    // Sequence numbers count up by one per group.
    for st in &s {
        let mut last: std::collections::BTreeMap<&str, u64> = Default::default();
        for c in &st.collectives {
            if let Some(prev) = last.insert(&c.group, c.seq) {
                assert_eq!(c.seq, prev + 1, "{}: {:?}", c.group, st.collectives);
            }
        }
    }
    // Nothing else in the folder (the temporary files were renamed).
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["rank-0.json", "rank-1.json"]);
}

#[test]
fn a_sleeping_rank_is_named_by_the_diagnosis_and_the_run_then_completes() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("state");
    let args = train_args("--train-iters 4 --global-batch-size 2");
    let started = Instant::now();
    let mut ranks = start(
        2,
        60,
        &args,
        &[(STATE_DIR_ENV, dir.to_str().unwrap()), (FAULT_ENV, "sleep:rank=1:iteration=3:seconds=8")],
    );
    let (d, st) = diagnose_stall(&dir, 2, Duration::from_secs(60));
    println!("diagnosis while rank 1 sleeps ({:?} in): {}", started.elapsed(), d.summary);
    assert_eq!(st.iter().map(|s| s.iteration).collect::<Vec<_>>(), [2, 2], "{st:#?}");
    assert_eq!(d.culprits, vec![1], "{d:?}");
    assert!(!d.desync);
    assert!(
        d.summary.starts_with(
            "waiting in all_reduce (step totals: micro batches, samples, supervised and real tokens, model FLOPs) on dp[0,1]"
        ),
        "{}",
        d.summary
    );
    assert!(d.summary.contains(": rank 0; not arrived: rank 1 on localhost"), "{}", d.summary);
    assert!(d.summary.contains("step at iteration 2, not in a collective"), "{}", d.summary);

    let outputs: Vec<Output> =
        std::mem::take(&mut ranks.0).into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (r, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}:\n{}", text(o));
    }
    let err1 = String::from_utf8_lossy(&outputs[1].stderr);
    assert!(
        err1.contains("warning: fault injection active: MM_ENGINE_FAULT=sleep:rank=1:iteration=3:seconds=8"),
        "{err1}"
    );
    assert!(!String::from_utf8_lossy(&outputs[0].stderr).contains("fault injection"), "only rank 1 warns");
    assert_eq!(done(&outputs[0]).iteration, 4);
    assert!(started.elapsed() >= Duration::from_secs(8));
}

#[test]
fn a_desync_is_diagnosed_from_the_state_files_and_every_rank_fails_within_the_timeout() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("state");
    let timeout = 10;
    let args = train_args("--train-iters 4 --global-batch-size 3");
    let mut ranks =
        start(3, timeout, &args, &[(STATE_DIR_ENV, dir.to_str().unwrap()), (FAULT_ENV, "desync:rank=1:iteration=2")]);
    let (d, _) = diagnose_stall(&dir, 3, Duration::from_secs(60));
    println!("diagnosis of the desync: {}", d.summary);
    assert_eq!(d.culprits, vec![1], "{d:?}");
    assert!(d.summary.starts_with("collective desync on dp[0,1,2] at #"), "{}", d.summary);
    assert!(
        d.summary.ends_with(
            ": ranks 0,2 in all_reduce (step totals: micro batches, samples, supervised and real tokens, model FLOPs); rank 1 in \
             broadcast (fault injection)"
        ),
        "{}",
        d.summary
    );
    // Gloo matches neither: every rank waits until MM_DIST_TIMEOUT_S and fails (or, when a
    // peer's timeout fired first and it exited, fails on the closed connection).
    let since = Instant::now();
    let mut timed_out = 0;
    for (r, c) in ranks.0.iter_mut().enumerate() {
        let status = exit_within(c, Duration::from_secs(timeout + 20))
            .unwrap_or_else(|| panic!("rank {r} still runs {:?} after the desync was seen", since.elapsed()));
        let err = read_to_string(c.stderr.take());
        println!("rank {r} exited with {status} ({:?} after the diagnosis): {}", since.elapsed(), err.trim());
        assert_eq!(status.code(), Some(1), "{err}");
        let op = if r == 1 { "broadcast (fault injection)" } else { "all_reduce (step totals" };
        assert!(err.contains(&format!("mm-engine: error: rank {r}: {op}")), "{err}");
        let timeout_said = err.contains(&format!("no answer within MM_DIST_TIMEOUT_S = {timeout} s"));
        assert!(timeout_said || err.contains("a peer rank of this group exited or was killed"), "{err}");
        timed_out += usize::from(timeout_said);
    }
    assert!(timed_out > 0, "no rank reported the timeout");
    // The last states, written on the way out, still show where each rank gave up.
    let last = diagnosis(&states(&dir, 3));
    assert!(last.desync && last.culprits == vec![1], "{last:?}");
}

#[test]
fn sigterm_to_one_rank_stops_every_rank_with_a_checkpoint_that_resumes_exactly() {
    let work = tempfile::tempdir().unwrap();
    let common = "--train-iters 6 --global-batch-size 2 --use-distributed-optimizer --lr-decay-style cosine \
        --weight-decay 0.05 --clip-grad 1.0";
    let straight = launch(2, &train_args(&format!("{common} --save {}", work.path().join("straight").display())));

    // Rank 0 sleeps at the start of iteration 3, so the signal reaches rank 1 while it waits in
    // that step: every rank stops after iteration 3.
    let save = work.path().join("stopped");
    let dir = work.path().join("state");
    let args = train_args(&format!("{common} --save {}", save.display()));
    let mut ranks = start(
        2,
        60,
        &args,
        &[(STATE_DIR_ENV, dir.to_str().unwrap()), (FAULT_ENV, "sleep:rank=0:iteration=3:seconds=3")],
    );
    let rx = lines(&mut ranks.0[0]);
    let mut out0 = until_step(&rx, 2, Duration::from_secs(60));
    let pid = ranks.0[1].id() as libc::pid_t;
    // SAFETY: a signal to a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut statuses = Vec::new();
    for (r, c) in ranks.0.iter_mut().enumerate() {
        let status = exit_within(c, Duration::from_secs(60)).unwrap_or_else(|| panic!("rank {r} did not stop"));
        statuses.push((status, read_to_string(c.stderr.take())));
    }
    out0.extend(rx.iter());
    let stdout0 = out0.join("\n");
    for (r, (status, err)) in statuses.iter().enumerate() {
        assert_eq!(status.code(), Some(143), "rank {r}: {status}\n{err}\nrank 0's stdout:\n{stdout0}");
        assert!(err.contains("mm-engine: stopped at iteration 3 of 6 on SIGTERM"), "rank {r}: {err}");
    }
    assert!(
        stdout0.contains(
            "stopping at iteration 3: SIGTERM received (preemption or an operator's stop); saving a checkpoint"
        ),
        "{stdout0}"
    );
    let stopped: Vec<ProgressEvent> = out0
        .iter()
        .filter_map(|l| ProgressEvent::parse(l)?.ok())
        .filter(|e| matches!(e, ProgressEvent::Stopped { .. }))
        .collect();
    let want = save.join("iter_0000003");
    assert_eq!(
        stopped,
        [ProgressEvent::Stopped {
            iteration: 3,
            signal: "SIGTERM".into(),
            checkpoint: Some(want.display().to_string())
        }]
    );
    assert!(want.join("manifest.json").exists());
    assert_eq!(std::fs::read_to_string(save.join("latest_checkpointed_iteration.txt")).unwrap(), "3");
    for st in states(&dir, 2) {
        let st = st.expect("a state file per rank");
        assert_eq!((st.phase, st.iteration, st.stop.as_deref()), (Phase::Stopping, 3, Some("SIGTERM")), "{st:#?}");
        assert!(st.in_flight().is_none(), "{st:#?}");
    }

    // Resumed from the save folder, the run ends where the uninterrupted one did, bit for bit.
    let resumed = launch(2, &train_args(&format!("{common} --save {} --auto-resume", save.display())));
    let (a, b) = (done(&straight[0]), done(&resumed[0]));
    assert_eq!((a.iteration, b.iteration, b.steps), (6, 6, Some(3)));
    assert_eq!(
        a.final_loss.to_bits(),
        b.final_loss.to_bits(),
        "{} straight vs {} stopped and resumed",
        a.final_loss,
        b.final_loss
    );
    let before: Vec<(u64, f64, f64)> = out0
        .iter()
        .filter_map(|l| match ProgressEvent::parse(l)?.ok()? {
            ProgressEvent::Step(p) => Some((p.iteration, p.loss, p.grad_norm.unwrap_or(f64::NAN))),
            _ => None,
        })
        .collect();
    let all = [before, steps(&resumed[0])].concat();
    let want: Vec<(u64, u64, u64)> = steps(&straight[0]).iter().map(|s| (s.0, s.1.to_bits(), s.2.to_bits())).collect();
    assert_eq!(all.iter().map(|s| (s.0, s.1.to_bits(), s.2.to_bits())).collect::<Vec<_>>(), want);
}

#[test]
fn one_rank_stops_on_sigint_a_second_signal_kills_and_a_bad_fault_fails_at_startup() {
    let args = train_args("--train-iters 6 --global-batch-size 1");
    // One SIGINT: the step finishes, nothing to save, exit 130.
    let mut one = start(1, 60, &args, &[(FAULT_ENV, "sleep:rank=0:iteration=2:seconds=2")]);
    let rx = lines(&mut one.0[0]);
    let mut out = until_step(&rx, 1, Duration::from_secs(60));
    let pid = one.0[0].id() as libc::pid_t;
    // SAFETY: signals to a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = exit_within(&mut one.0[0], Duration::from_secs(30)).expect("the rank stops");
    out.extend(rx.iter());
    let err = read_to_string(one.0[0].stderr.take());
    assert_eq!(status.code(), Some(130), "{status}\n{err}\n{}", out.join("\n"));
    assert!(out.iter().any(|l| l == "stopping at iteration 2: SIGINT received (preemption or an operator's stop); no --save: nothing is saved"), "{out:#?}");
    assert!(
        out.iter().any(|l| ProgressEvent::parse(l).and_then(Result::ok)
            == Some(ProgressEvent::Stopped { iteration: 2, signal: "SIGINT".into(), checkpoint: None })),
        "{out:#?}"
    );

    // Repeated SIGTERMs (a Slurm step and the launcher's agent both signal) are one request:
    // the rank still stops, saves what it would and exits 143.
    let mut dup = start(1, 60, &args, &[(FAULT_ENV, "sleep:rank=0:iteration=2:seconds=2")]);
    let rx = lines(&mut dup.0[0]);
    let mut out = until_step(&rx, 1, Duration::from_secs(60));
    let pid = dup.0[0].id() as libc::pid_t;
    for _ in 0..3 {
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = exit_within(&mut dup.0[0], Duration::from_secs(30)).expect("the rank stops");
    out.extend(rx.iter());
    assert_eq!(status.code(), Some(143), "{status}\n{}", out.join("\n"));

    // A SIGINT after the first signal kills at once (while the rank sleeps 60 s): a second
    // Ctrl-C.
    let mut two = start(1, 60, &args, &[(FAULT_ENV, "sleep:rank=0:iteration=2:seconds=60")]);
    let rx = lines(&mut two.0[0]);
    until_step(&rx, 1, Duration::from_secs(60));
    let pid = two.0[0].id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = exit_within(&mut two.0[0], Duration::from_secs(10)).expect("the second signal kills");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status}");

    // A malformed fault variable: an error at startup, naming it and the expected form.
    let o = {
        let mut c: Command = rank_cmd(0, 1, free_port(), 60, &args);
        c.env(FAULT_ENV, "sleep:rank=0:iteration=2").stdout(Stdio::piped());
        c.output().unwrap()
    };
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        err.contains("MM_ENGINE_FAULT=\"sleep:rank=0:iteration=2\" is not valid: sleep takes 3 fields")
            && err.contains("expected sleep:rank=R:iteration=N:seconds=S or desync:rank=R:iteration=N"),
        "{err}"
    );
    assert!(events(&o).is_empty(), "nothing trained");
}
