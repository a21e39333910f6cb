//! The execution stage on the local backend (every host is this machine): the same behaviour
//! suite as the SSH rig (layout, fail fast, SIGINT), plus `launch logs`.

mod rig;

use std::process::Command;
use std::time::Duration;

use rig::suite::{self, Job, Place, LAUNCH};

#[test]
fn local_layout_and_complete_logs() {
    let job = Job::new(Place::Local);
    suite::layout(&job, &["--no-checks"]);
}

#[test]
fn local_fail_fast() {
    let job = Job::new(Place::Local);
    suite::fail_fast(&job, &["--no-checks"]);
}

#[test]
fn local_sigint_stops_everything() {
    let job = Job::new(Place::Local);
    suite::sigint(&job, &["--no-checks"]);
}

#[test]
fn logs_command_filters_and_follows() {
    let job = Job::new(Place::Local);
    let cluster = job.cluster(&[("TEST_MODE", "layout")], "");
    let child = job.spawn(&cluster, &["--no-checks", "--tee", "all"]);
    let t0 = std::time::Instant::now();
    // Follow the run while it goes: wait for its directory, then tail it to the end.
    job.wait_for("the run directory", || job.logs.join("latest").exists(), Duration::from_secs(30));
    let follow = Command::new(LAUNCH).args(["logs", "-f", "--log-dir"]).arg(&job.logs).output().unwrap();
    let f = job.wait(child, t0, Duration::from_secs(60));
    assert_eq!(f.code, 0, "{}", f.stderr);
    assert!(follow.status.success(), "{}", String::from_utf8_lossy(&follow.stderr));
    let followed = String::from_utf8_lossy(&follow.stdout);
    for rank in 0..6 {
        let host = job.host_of(rank);
        assert_eq!(
            followed.lines().filter(|l| l.starts_with(&format!("[{host} r{rank}] "))).count(),
            54,
            "-f saw every line of rank {rank}"
        );
    }
    // --tee all put every rank on the console.
    assert!(f.stdout.contains("[l2 r3] rank 3 line 50"), "{}", f.stdout);

    let logs = |args: &[&str]| {
        let o = Command::new(LAUNCH).arg("logs").args(args).arg("--log-dir").arg(&job.logs).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let r3 = logs(&["--rank", "3"]);
    assert_eq!(r3.lines().count(), 54);
    assert!(r3.lines().all(|l| l.starts_with("[l2 r3] ")), "{r3}");
    let h3 = logs(&["--host", "l3", "--grep", "line (7|49)$"]);
    let mut got: Vec<&str> = h3.lines().collect();
    got.sort();
    assert_eq!(
        got,
        ["[l3 r4] rank 4 line 49", "[l3 r4] rank 4 line 7", "[l3 r5] rank 5 line 49", "[l3 r5] rank 5 line 7"]
    );
    // A given run by id, and a clear error for an unknown one.
    let id = std::fs::read_link(job.logs.join("latest")).unwrap();
    assert_eq!(logs(&[id.to_str().unwrap(), "--rank", "0"]).lines().count(), 54);
    let bad = Command::new(LAUNCH).args(["logs", "nope", "--log-dir"]).arg(&job.logs).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no run `nope`"));
    // Filters that cannot match are errors that say what exists, not empty output.
    let refused = |args: &[&str]| {
        let o = Command::new(LAUNCH).arg("logs").args(args).arg("--log-dir").arg(&job.logs).output().unwrap();
        assert!(!o.status.success() && o.stdout.is_empty(), "{args:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let run_id = id.to_str().unwrap();
    assert_eq!(
        refused(&["--rank", "9"]),
        format!("error: run {run_id} has no rank 9: its ranks are 0-5 (on l1, l2, l3)\n")
    );
    assert_eq!(
        refused(&["--host", "l4x"]),
        format!("error: run {run_id} has no host `l4x`; its hosts are l1, l2, l3\n")
    );
    assert!(refused(&["--host", "L2"]).contains("has no host `L2` (did you mean `l2`?)"));
    job.assert_clean(Duration::from_secs(5), false);
}

#[test]
fn local_restarts_use_attempt_folders() {
    let job = Job::new(Place::Local);
    let cluster = job.cluster(&[("TEST_MODE", "flaky")], "");
    let f = job.run(&cluster, &["--no-checks", "--max-restarts", "2", "--grace", "2s"]);
    assert_eq!(f.code, 0, "{}", f.stderr);
    let run = job.run_dir();
    assert!(job.rank_log(&run.join("attempt-0"), "l1", 1).contains("rank 1 fails on attempt 0"));
    assert!(job.rank_log(&run.join("attempt-1"), "l1", 1).contains("rank 1 ok on attempt 1"));
    assert!(!run.join("attempt-2").exists());
    job.assert_clean(Duration::from_secs(5), false);
}

#[test]
fn local_sigterm_exits_143() {
    let job = Job::new(Place::Local);
    let cluster = job.cluster(&[("TEST_MODE", "run")], "");
    let t0 = std::time::Instant::now();
    let child = job.spawn(&cluster, &["--no-checks", "--grace", "5s"]);
    let pid = child.id() as i32;
    job.wait_all_running();
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let f = job.wait(child, t0, Duration::from_secs(60));
    assert_eq!(f.code, 143, "{}", f.stderr);
    assert!(f.stderr.contains("interrupted by SIGTERM"), "{}", f.stderr);
    job.assert_clean(Duration::from_secs(5), false);
}

/// A node agent that dies (SIGKILL) is a failure like any other: the others are stopped, and
/// its ranks die with it (parent-death signal).
#[test]
fn local_dead_agent_stops_everything() {
    let job = Job::new(Place::Local);
    let cluster = job.cluster(&[("TEST_MODE", "run")], "");
    let t0 = std::time::Instant::now();
    let child = job.spawn(&cluster, &["--no-checks", "--grace", "5s"]);
    job.wait_all_running();
    let agents: Vec<u32> =
        job.our_processes().into_iter().filter(|(_, cmd)| cmd.trim_end().ends_with(" agent")).map(|(p, _)| p).collect();
    assert_eq!(agents.len(), 3, "one agent per host");
    // SAFETY: killing a process this test started.
    unsafe {
        libc::kill(agents[1] as i32, libc::SIGKILL);
    }
    let f = job.wait(child, t0, Duration::from_secs(60));
    assert_eq!(f.code, 255, "{}", f.stderr);
    assert!(f.stderr.contains("FAILED: the node agent on l"), "{}", f.stderr);
    assert!(f.stderr.contains("signal SIGKILL"), "{}", f.stderr);
    job.assert_clean(Duration::from_secs(5), false);
}

/// The engine's progress lines become plain progress lines when stdout is not a terminal.
#[test]
fn local_progress_lines() {
    let job = Job::new(Place::Local);
    let cluster = job.cluster(&[("TEST_MODE", "progress")], "");
    let f = job.run(&cluster, &["--no-checks"]);
    assert_eq!(f.code, 0, "{}", f.stderr);
    assert!(f.stderr.contains("[launch] iteration 1/3 · loss 3.5000 · 1000 tok/s · ETA"), "{}", f.stderr);
    assert!(f.stderr.contains("[launch] iteration 3/3 · loss 1.5000"), "{}", f.stderr);
    assert_eq!(f.stderr.matches("iteration 3/3").count(), 1, "one line per iteration, whichever rank printed it");
    // Every rank sent `done`; the summary says it once, from the first.
    assert_eq!(f.stderr.matches("final loss   1.500000 (iteration 3)").count(), 1, "{}", f.stderr);
    assert!(f.stderr.contains("throughput   1000.0 tokens/s\n  checkpoint   none written"), "{}", f.stderr);
    assert!(!f.stdout.contains("@@mm-progress"), "progress lines stay in the logs:\n{}", f.stdout);
}

/// A Ctrl-C while the checks run (a `setup:` line makes them take 5 s) is held, not fatal:
/// the launcher says so at once, finishes the checks, starts nothing and exits 130.
#[test]
fn sigint_during_the_checks_is_held_and_nothing_starts() {
    let job = Job::new(Place::Local);
    let cluster = job.cluster(&[("TEST_MODE", "run")], "setup:\n  - sleep 5\n");
    let t0 = std::time::Instant::now();
    let child = job.spawn(&cluster, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let f = job.wait(child, t0, Duration::from_secs(60));
    assert_eq!(f.code, 130, "{}", f.stderr);
    assert!(f.stderr.contains("signal received before any rank started"), "{}", f.stderr);
    assert!(f.stderr.contains("launch: SIGINT received before the start: nothing was started"), "{}", f.stderr);
    assert!((0..6).all(|r| !job.out.join(format!("running-{r}")).exists()), "no rank may start");
    job.assert_clean(Duration::from_secs(5), false);
}

/// The run folder (and `latest`) exist before the checks run: `launch logs -f` typed right
/// after `finetune` follows the new run, not the previous one. A run the checks refuse says so
/// in its folder too (status finished, exit 3, the table in launch.log).
#[test]
fn the_run_folder_comes_before_the_checks() {
    let job = Job::new(Place::Local);
    let cluster = job.cluster(&[("TEST_MODE", "layout")], "setup:\n  - sleep 3\n");
    let t0 = std::time::Instant::now();
    let child = job.spawn(&cluster, &["--skip-check", "path"]);
    job.wait_for("the run folder", || job.logs.join("latest").exists(), Duration::from_secs(30));
    let made = t0.elapsed();
    let follow = Command::new(LAUNCH).args(["logs", "-f", "--log-dir"]).arg(&job.logs).output().unwrap();
    let f = job.wait(child, t0, Duration::from_secs(60));
    assert_eq!(f.code, 0, "{}", f.stderr);
    assert!(made < Duration::from_secs(3), "the run folder came {made:?} after the start, not before the 3 s checks");
    let followed = String::from_utf8_lossy(&follow.stdout);
    assert!(followed.contains("[l1 r0] rank 0 done") && followed.contains("[l3 r5] rank 5 done"), "{followed}");

    let f = job.run(&cluster, &[]);
    assert_eq!(f.code, 3, "the tiny recipe's paths do not exist here:\n{}", f.stderr);
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(job.run_dir().join("status.json")).unwrap()).unwrap();
    assert_eq!((status["state"].as_str(), status["exit_code"].as_i64()), (Some("finished"), Some(3)), "{status}");
    let o = Command::new(LAUNCH).args(["logs", "--log-dir"]).arg(&job.logs).output().unwrap();
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(shown.contains("path:load") && shown.contains("environment checks failed"), "{shown}");
}
