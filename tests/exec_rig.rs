//! The execution stage over SSH on the multi-host rig (network namespaces running OpenSSH,
//! scripts/rig.sh): the shared behaviour suite plus what only a network can show — lost
//! links, host keys, shell metacharacters crossing SSH, restarts. Needs root: without it
//! these tests fail and say why.

mod rig;

use std::time::{Duration, Instant};

use rig::suite::{self, yq, Job, Place, LAUNCH};
use rig::Rig;

/// (a) 3 hosts × 2 ranks, with the environment checks and the agent uploaded over SFTP.
#[test]
fn rig_layout_and_complete_logs() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    // The launcher uploads itself into ~/.cache/mm-launch/<key>/ (shared by the rig hosts):
    // start without a cached copy so the upload path runs, and remove it afterwards.
    let key = std::process::Command::new(LAUNCH).args(["agent", "--cache-key"]).output().unwrap();
    let key = String::from_utf8(key.stdout).unwrap().trim().to_string();
    assert!(!key.is_empty());
    let cache =
        std::path::PathBuf::from(std::env::var("HOME").unwrap_or("/root".into())).join(".cache/mm-launch").join(&key);
    let _ = std::fs::remove_dir_all(&cache);
    // The checks run too: give them the paths the tiny recipe names, under a workdir.
    let work = job.dir.path().join("work");
    for d in ["runs/tiny/model", "runs/tiny/data", "runs/tiny/save"] {
        std::fs::create_dir_all(work.join(d)).unwrap();
    }
    std::fs::write(work.join("runs/tiny/data/train.jsonl"), "{}\n").unwrap();
    suite::layout_with_extra(&job, &[], &format!("workdir: {}\n", yq(&work.display().to_string())));
    assert!(cache.join("launch").exists(), "the agent was uploaded to {}", cache.display());
    for i in 0..6 {
        assert_eq!(job.out_file(&format!("pwd-{i}")).unwrap().trim(), work.display().to_string());
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// (b) one rank exits 3 mid-run.
#[test]
fn rig_fail_fast() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    suite::fail_fast(&job, &["--no-checks", "--agent-path", LAUNCH]);
}

/// (c) SIGINT to the launcher mid-run.
#[test]
fn rig_sigint_stops_everything() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    suite::sigint(&job, &["--no-checks", "--agent-path", LAUNCH]);
}

/// Starts a job whose ranks run until stopped (grace 2 s) and waits until every rank runs.
fn start_running(job: &Job) -> (std::process::Child, Instant) {
    let cluster = job.cluster(&[("TEST_MODE", "run")], "");
    let t0 = Instant::now();
    let child = job.spawn(&cluster, &["--no-checks", "--agent-path", LAUNCH, "--grace", "2s"]);
    job.wait_all_running();
    (child, t0)
}

/// (d) a host's link goes down mid-run: its silence is noticed after keepalive interval ×
/// count (1 s × 3), a new connection to it fails within the connect timeout (3 s), so it is
/// declared lost (not a frozen agent), the others stopped, a clear report; the lost host's
/// agent stops its own ranks.
#[test]
fn rig_lost_host_is_noticed_and_cleaned() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    let (child, t0) = start_running(&job);
    let down_at = Instant::now();
    rig.link_down(&rig.hosts[1]);
    let f = job.wait(child, t0, Duration::from_secs(60));
    let after_down = down_at.elapsed();
    assert_eq!(f.code, 255, "stderr:\n{}", f.stderr);
    assert!(f.stderr.contains("host h2 (10.78.0.3) was lost: no sign of life for"), "{}", f.stderr);
    assert!(f.stderr.contains("keepalive 1s × 3"), "{}", f.stderr);
    assert!(f.stderr.contains("LOST:"), "h2's status line says so:\n{}", f.stderr);
    // Noticed after about 3 s, probed for up to 3 s, then the others stop (they exit on
    // SIGTERM at once).
    assert!(f.stderr.contains("and a new connection failed"), "{}", f.stderr);
    assert!(after_down < Duration::from_secs(3 + 3 + 2 + 4), "took {after_down:?}");
    let lost_at: f64 = f
        .stderr
        .split("no sign of life for ")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!((3.0..7.5).contains(&lost_at), "declared lost after {lost_at}s of silence");
    // The reachable hosts are clean right away; h2's agent notices the silence (4 s), stops
    // its ranks (grace 2 s) and exits. Only sshd's session, stuck on the dead TCP connection,
    // may remain there.
    job.assert_clean(Duration::from_secs(15), true);
    for r in [2, 3] {
        let last = job.out_file(&format!("last-{r}")).unwrap();
        assert_eq!(last.trim(), format!("rank {r} stopping"), "rank {r} on the lost host was stopped by its agent");
    }
}

/// (e) an unknown host key is refused with a clear message, a changed one too; nothing starts
/// anywhere. accept-new records a first-seen key.
#[test]
fn rig_host_keys_are_verified() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    let all = std::fs::read_to_string(rig.known_hosts()).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    let args = ["--no-checks", "--agent-path", LAUNCH];

    let unknown = job.dir.path().join("kh-unknown");
    std::fs::write(&unknown, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
    let c = job.cluster_with(&job.prog, &[("TEST_MODE", "layout")], "", Some(&unknown));
    let f = job.run(&c, &args);
    assert_eq!(f.code, 4, "{}", f.stderr);
    assert!(f.stderr.contains("h2: host key for 10.78.0.3:22 is not in"), "{}", f.stderr);
    assert!(f.stderr.contains("refusing to connect"), "{}", f.stderr);
    assert!(f.stderr.contains("not reached"), "{}", f.stderr);
    assert!(job.out_file("env-0").is_none(), "no rank may start when a host is refused");

    let changed = job.dir.path().join("kh-changed");
    let other_key = lines[0].split_once(' ').unwrap().1; // h1's key, claimed for h2
    std::fs::write(&changed, format!("{}\n10.78.0.3 {other_key}\n{}\n", lines[0], lines[2])).unwrap();
    let c = job.cluster_with(&job.prog, &[("TEST_MODE", "layout")], "", Some(&changed));
    let f = job.run(&c, &args);
    assert_eq!(f.code, 4, "{}", f.stderr);
    assert!(f.stderr.contains("HOST KEY CHANGED for 10.78.0.3:22"), "{}", f.stderr);
    assert!(job.out_file("env-0").is_none());

    let fresh = job.dir.path().join("kh-fresh");
    std::fs::write(&fresh, format!("{}\n", lines[0])).unwrap();
    let c = job.cluster_with(&job.prog, &[("TEST_MODE", "layout")], "", Some(&fresh));
    let text = std::fs::read_to_string(&c)
        .unwrap()
        .replace("  agent: false\n", "  agent: false\n  strict_host_key_checking: accept-new\n");
    std::fs::write(&c, text).unwrap();
    let f = job.run(&c, &args);
    assert_eq!(f.code, 0, "{}", f.stderr);
    let recorded = std::fs::read_to_string(&fresh).unwrap();
    assert!(recorded.contains(lines[1].split(' ').nth(2).unwrap()), "h2's key was recorded:\n{recorded}");
    job.assert_clean(Duration::from_secs(5), false);
}

/// The cluster file `job` writes for the rig with `known_hosts` and accept-new.
fn accept_new_cluster(job: &Job, known_hosts: &std::path::Path) -> std::path::PathBuf {
    let c = job.cluster_with(&job.prog, &[("TEST_MODE", "layout")], "", Some(known_hosts));
    let text = std::fs::read_to_string(&c)
        .unwrap()
        .replace("  agent: false\n", "  agent: false\n  strict_host_key_checking: accept-new\n");
    std::fs::write(&c, text).unwrap();
    c
}

/// `ssh-keygen -lf`'s SHA256 fingerprint of rig host `i`'s key.
fn fingerprint(rig: &Rig, i: usize) -> String {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(rig.dir.path().join(format!("host_key_h{i}.pub")))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().nth(1).expect("ssh-keygen -l prints a fingerprint").to_string()
}

/// (e2) a known_hosts that cannot hold keys is refused before any host is contacted (under
/// accept-new it would trust every key, a changed one too); accept-new announces each key it
/// records once, and still refuses a changed key.
#[test]
fn rig_accept_new_announces_and_needs_a_real_known_hosts() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    let all = std::fs::read_to_string(rig.known_hosts()).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    let args = ["--no-checks", "--agent-path", LAUNCH];

    let folder = job.dir.path().join("kh-folder");
    std::fs::create_dir(&folder).unwrap();
    for (kh, needle) in [
        (std::path::PathBuf::from("/dev/null"), "ssh.known_hosts: `/dev/null` is a device".to_string()),
        (folder.clone(), format!("ssh.known_hosts: `{}` is a directory", folder.display())),
    ] {
        let f = job.run(&accept_new_cluster(&job, &kh), &args);
        assert_eq!(f.code, 2, "refused as a configuration error: {}", f.stderr);
        assert!(f.stderr.contains(&needle), "{}", f.stderr);
        assert!(f.stderr.contains("hint: point `ssh.known_hosts` at a regular file"), "{}", f.stderr);
        assert!(!job.logs.exists(), "nothing ran: no run directory");
    }

    // First run: h2 and h3 are new, each announced once with its address, type and fingerprint.
    let fresh = job.dir.path().join("kh-fresh");
    std::fs::write(&fresh, format!("{}\n", lines[0])).unwrap();
    let c = accept_new_cluster(&job, &fresh);
    let f = job.run(&c, &args);
    assert_eq!(f.code, 0, "{}", f.stderr);
    for (i, name) in [(2, "h2"), (3, "h3")] {
        let line = format!(
            "[launch] {name} (10.78.0.{}:22): first connection, recorded its ed25519 key {} in {}\n",
            i + 1,
            fingerprint(&rig, i),
            fresh.display()
        );
        assert_eq!(f.stderr.matches(&line).count(), 1, "{line} once:\n{}", f.stderr);
    }
    assert_eq!(f.stderr.matches("first connection").count(), 2, "h1 was known:\n{}", f.stderr);
    let launch_log = std::fs::read_to_string(job.run_dir().join("launch.log")).unwrap();
    assert!(launch_log.contains("h2 (10.78.0.3:22): first connection"), "kept in the run's log:\n{launch_log}");
    // Second run: every key is known, nothing to announce.
    let f = job.run(&c, &args);
    assert_eq!(f.code, 0, "{}", f.stderr);
    assert!(!f.stderr.contains("first connection"), "{}", f.stderr);

    // The checks' probe is the first to connect when the checks run: it announces.
    let probe = job.dir.path().join("kh-probe");
    std::fs::write(&probe, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
    let c = accept_new_cluster(&job, &probe);
    let out = std::process::Command::new(LAUNCH)
        .arg("--cluster")
        .arg(&c)
        .args(["check", "tiny", "--set", "train.global_batch_size=6", "--agent-path", LAUNCH])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("first connection").count(), 1, "{stderr}");
    assert!(stderr.contains("[launch] h3 (10.78.0.4:22): first connection, recorded its ed25519 key"), "{stderr}");

    // accept-new trusts new keys only: a changed one is refused as under strict.
    let changed = job.dir.path().join("kh-changed");
    let other_key = lines[0].split_once(' ').unwrap().1; // h1's key, claimed for h2
    std::fs::write(&changed, format!("{}\n10.78.0.3 {other_key}\n{}\n", lines[0], lines[2])).unwrap();
    let f = job.run(&accept_new_cluster(&job, &changed), &args);
    assert_eq!(f.code, 4, "{}", f.stderr);
    assert!(f.stderr.contains("HOST KEY CHANGED for 10.78.0.3:22"), "{}", f.stderr);
    assert!(!f.stderr.contains("first connection"), "{}", f.stderr);
    job.assert_clean(Duration::from_secs(5), false);
}

/// (e3) every sshd on a host killed mid-run: the cause reads as the SSH connection dropping,
/// not as libssh2's "transport read"; the other hosts are stopped.
#[test]
fn rig_killed_sshd_reads_as_a_dropped_connection() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    let (child, t0) = start_running(&job);
    let h3 = &rig.hosts[2];
    let sshds: Vec<u32> =
        rig.processes(h3).into_iter().filter(|(_, cmd)| cmd.starts_with("sshd")).map(|(p, _)| p).collect();
    assert!(!sshds.is_empty(), "sshd runs on h3");
    for p in sshds {
        // SAFETY: kill(2) on a pid of the rig's namespace.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    let f = job.wait(child, t0, Duration::from_secs(60));
    assert_eq!(f.code, 255, "stderr:\n{}", f.stderr);
    assert!(f.stderr.contains("FAILED: the SSH connection to h3 dropped (sshd gone or host rebooted)"), "{}", f.stderr);
    assert!(!f.stderr.contains("transport read"), "{}", f.stderr);
    assert!(!f.stderr.contains("lines:\n  log:"), "no empty log tail:\n{}", f.stderr);
    job.assert_clean(Duration::from_secs(15), true);
}

/// (f) shell metacharacters in env values, paths and arguments reach the program literally
/// and run nothing.
#[test]
fn rig_metacharacters_run_nothing() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    let d = job.dir.path();
    let pwned: Vec<std::path::PathBuf> = (1..=5).map(|i| d.join(format!("pwned{i}"))).collect();
    let _ = std::fs::remove_file("/tmp/pwned");
    let bin = d.join(format!("bin $(touch {}) 'q' \"dq\" ;x", pwned[0].display()));
    std::fs::create_dir_all(&bin).unwrap();
    let prog = bin.join("prog;$(id).sh");
    std::fs::copy(&job.prog, &prog).unwrap();
    suite::make_executable(&prog);
    let work = d.join(format!("work `touch {}` ';' \\ end", pwned[1].display()));
    std::fs::create_dir_all(&work).unwrap();
    let nasty_env = format!("$(touch /tmp/pwned); echo \"hi\" 'q' `touch {}`\nsecond line; $HOME", pwned[2].display());
    let nasty_arg = format!("data $(touch {}) ';' x\ny \"z\".jsonl", pwned[3].display());
    let extra = format!("workdir: {}\njob:\n  data_path: {}\n", yq(&work.display().to_string()), yq(&nasty_arg));
    let c = job.cluster_with(&prog, &[("TEST_MODE", "layout"), ("NASTY", &nasty_env)], &extra, None);
    let f = job.run(&c, &["--no-checks", "--agent-path", LAUNCH]);
    assert_eq!(f.code, 0, "{}", f.stderr);
    for p in pwned.iter().map(|p| p.as_path()).chain([std::path::Path::new("/tmp/pwned")]) {
        assert!(!p.exists(), "{} was created: a value ran as shell", p.display());
    }
    for rank in 0..6 {
        let env = job.rank_env(rank);
        assert_eq!(env.get("NASTY").map(String::as_str), Some(nasty_env.as_str()), "rank {rank}: env value intact");
        assert_eq!(job.out_file(&format!("pwd-{rank}")).unwrap().trim_end_matches('\n'), work.display().to_string());
        let args = std::fs::read(job.out.join(format!("args-{rank}"))).unwrap();
        let args: Vec<String> = args.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let i = args.iter().position(|a| a == "--data-path").expect("--data-path passed");
        assert_eq!(args[i + 1], nasty_arg, "rank {rank}: argument intact");
        assert_eq!(args[0], "train");
    }
    job.assert_clean(Duration::from_secs(5), false);
}

/// (g) --max-restarts 2 with a program that fails on its first attempt and succeeds on the
/// second: exit 0, each attempt in its own folder.
#[test]
fn rig_max_restarts() {
    let rig = Rig::up(3);
    let job = Job::new(Place::Rig(&rig));
    let cluster = job.cluster(&[("TEST_MODE", "flaky")], "");
    let f = job.run(&cluster, &["--no-checks", "--agent-path", LAUNCH, "--max-restarts", "2", "--grace", "2s"]);
    assert_eq!(f.code, 0, "{}", f.stderr);
    assert!(f.stderr.contains("attempt 0 failed (exit 1); restarting every rank (1 of 2 restarts)"), "{}", f.stderr);
    let run = job.run_dir();
    assert!(job.rank_log(&run.join("attempt-0"), "h1", 1).contains("rank 1 fails on attempt 0"));
    for rank in 0..6 {
        let log = job.rank_log(&run.join("attempt-1"), job.host_of(rank), rank);
        assert!(log.contains(&format!("rank {rank} ok on attempt 1")), "rank {rank}: {log}");
    }
    assert!(!run.join("attempt-2").exists());
    let agg = std::fs::read_to_string(run.join("launch.log")).unwrap();
    assert!(agg.contains("=== attempt 0 (of up to 3) ===") && agg.contains("=== attempt 1 (of up to 3) ==="));
    job.assert_clean(Duration::from_secs(5), false);
}
