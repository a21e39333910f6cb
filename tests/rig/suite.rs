//! The behaviour suite every backend must pass (local and SSH): a test program stands in for
//! mm-engine through the cluster's `engine:` key, 3 hosts × 2 ranks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Rig;

pub const LAUNCH: &str = env!("CARGO_BIN_EXE_launch");
/// A value under a secret-looking name; it must never reach plan.json or any log.
pub const SECRET: &str = "s3cr3t-token-value-42";
/// A value a `setup:` line assigns to a secret name (`export MY_API_KEY=…`): the same rule.
pub const SETUP_SECRET: &str = "sk-setup-api-key-77";
/// A secret given to a setup line's command as a flag value (`--token VALUE`).
pub const FLAG_SECRET: &str = "hf-flag-token-4242";

/// The stand-in for mm-engine. Behaviour comes from TEST_MODE in the cluster env; it records
/// what it saw (env, args, cwd, network namespace) and every line it printed in $TEST_OUT.
pub const PROGRAM: &str = r#"#!/bin/bash
if [ "${1:-}" = "--version" ]; then echo "mm-engine 0.1.0"; exit 0; fi
out="$TEST_OUT"; r="$RANK"
env -0 > "$out/env-$r.tmp" && mv "$out/env-$r.tmp" "$out/env-$r"
printf '%s\0' "$@" > "$out/args-$r"
pwd > "$out/pwd-$r"
ip netns identify $$ > "$out/netns-$r" 2>/dev/null
say() { echo "$1"; echo "$1" > "$out/last-$r.tmp"; mv -f "$out/last-$r.tmp" "$out/last-$r"; }
case "$TEST_MODE" in
  layout)
    for i in $(seq 1 50); do say "rank $r line $i"; done
    echo "rank $r stderr line" >&2
    echo "rank $r token is $HF_TOKEN"
    echo "rank $r api key is ${MY_API_KEY:-unset}, monkey ${MONKEY_PATCH:-unset}"
    say "rank $r done" ;;
  run)
    # bash reports killed children ("Terminated") on its stderr; keep that noise out.
    exec 3>&2 2>/dev/null
    if [ "${IGNORE_TERM_RANK:-x}" = "$r" ]; then trap '' TERM; else trap 'say "rank $r stopping"; exit 0' TERM; fi
    touch "$out/running-$r"
    i=0
    while true; do
      i=$((i + 1))
      say "rank $r tick $i"
      sleep 0.05
      # Fail only once every rank runs (has its SIGTERM trap): a loaded machine starts slowly.
      if [ "${FAIL_RANK:-x}" = "$r" ] && [ "$i" -ge 10 ] && [ "$(ls "$out" | grep -c '^running-')" = "$WORLD_SIZE" ]; then
        echo "error: rank $r failing on purpose" >&3
        exit 3
      fi
    done ;;
  flaky)
    if [ "$r" = 1 ] && [ ! -e "$out/failed-once" ]; then
      touch "$out/failed-once"
      say "rank $r fails on attempt $LAUNCH_ATTEMPT"
      exit 1
    fi
    sleep 0.3
    say "rank $r ok on attempt $LAUNCH_ATTEMPT" ;;
  progress)
    for i in 1 2 3; do
      echo "@@mm-progress {\"event\":\"step\",\"iteration\":$i,\"train_iters\":3,\"loss\":$((4 - i)).5,\"lr\":0.001,\"tokens_per_sec\":1000.0,\"samples_per_sec\":2.0,\"step_ms\":10.0,\"consumed_samples\":$((4 * i))}"
      sleep 0.1
    done
    echo "@@mm-progress {\"event\":\"done\",\"iteration\":3,\"final_loss\":1.5,\"tokens_per_sec\":1000.0}" ;;
  *) echo "unknown TEST_MODE '$TEST_MODE'" >&2; exit 99 ;;
esac
"#;

#[derive(Clone, Copy)]
pub enum Place<'a> {
    Local,
    Rig(&'a Rig),
}

pub struct TestHost {
    pub name: String,
    pub address: String,
}

pub struct Job<'a> {
    pub dir: tempfile::TempDir,
    pub out: PathBuf,
    pub prog: PathBuf,
    pub logs: PathBuf,
    pub hosts: Vec<TestHost>,
    pub place: Place<'a>,
}

pub struct Finished {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML).
pub fn yq(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

impl<'a> Job<'a> {
    pub fn new(place: Place<'a>) -> Job<'a> {
        let dir = tempfile::Builder::new().prefix("mm-exec-").tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let prog = dir.path().join("prog.sh");
        std::fs::write(&prog, PROGRAM).unwrap();
        make_executable(&prog);
        let hosts = match place {
            Place::Local => {
                (1..=3).map(|i| TestHost { name: format!("l{i}"), address: format!("127.0.0.{i}") }).collect()
            }
            Place::Rig(rig) => {
                rig.hosts.iter().map(|h| TestHost { name: h.name.clone(), address: h.address.clone() }).collect()
            }
        };
        let logs = dir.path().join("logs");
        Job { dir, out, prog, logs, hosts, place }
    }

    pub fn is_rig(&self) -> bool {
        matches!(self.place, Place::Rig(_))
    }

    /// Writes a cluster file: every host with 2 CPU ranks, the test program as the engine,
    /// TEST_OUT / TEST_MODE / HF_TOKEN plus `env` in the cluster env; `extra` is appended.
    pub fn cluster(&self, env: &[(&str, &str)], extra: &str) -> PathBuf {
        self.cluster_with(&self.prog, env, extra, None)
    }

    pub fn cluster_with(
        &self,
        engine: &Path,
        env: &[(&str, &str)],
        extra: &str,
        known_hosts: Option<&Path>,
    ) -> PathBuf {
        let mut y = String::from("name: exec-test\nhosts:\n");
        for h in &self.hosts {
            y += &format!("  - {{address: {}, name: {}}}\n", h.address, h.name);
        }
        y += "accelerator: cpu\ndevices_per_node: 2\nmaster: {port: 0}\n";
        match self.place {
            Place::Local => y += "local: true\n",
            Place::Rig(rig) => {
                let kh = known_hosts.map(Path::to_path_buf).unwrap_or_else(|| rig.known_hosts());
                y += &format!(
                    "local: false\nssh:\n  user: root\n  identity_files: [{}]\n  known_hosts: {}\n  connect_timeout: 3s\n  \
                     keepalive_interval: 1s\n  keepalive_count: 3\n  agent: false\n",
                    yq(&rig.key().display().to_string()),
                    yq(&kh.display().to_string())
                );
            }
        }
        if !extra.contains("keepalive") && matches!(self.place, Place::Local) {
            y += "ssh: {keepalive_interval: 1s, keepalive_count: 3}\n";
        }
        y += &format!(
            "engine: {}\nlog_dir: {}\n",
            yq(&engine.display().to_string()),
            yq(&self.logs.display().to_string())
        );
        y += "env:\n  OMP_NUM_THREADS: 1\n";
        y += &format!("  TEST_OUT: {}\n  HF_TOKEN: {}\n", yq(&self.out.display().to_string()), yq(SECRET));
        for (k, v) in env {
            y += &format!("  {k}: {}\n", yq(v));
        }
        y += extra;
        let p = self.dir.path().join("cluster.yaml");
        std::fs::write(&p, y).unwrap();
        p
    }

    /// `launch --cluster C finetune tiny <args>` with the batch fitted to 6 ranks.
    pub fn command(&self, cluster: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(LAUNCH);
        c.arg("--cluster").arg(cluster).args(["finetune", "tiny", "--set", "train.global_batch_size=6"]).args(args);
        c.env("TEST_MARK", self.dir.path()).current_dir(self.dir.path());
        c
    }

    /// The agent binary on the rig hosts (they share this file system), so most tests skip the
    /// upload; the layout test exercises it.
    pub fn agent_args(&self) -> Vec<&'static str> {
        if self.is_rig() {
            vec!["--agent-path", LAUNCH]
        } else {
            vec![]
        }
    }

    pub fn spawn(&self, cluster: &Path, args: &[&str]) -> Child {
        let so = std::fs::File::create(self.dir.path().join("stdout.txt")).unwrap();
        let se = std::fs::File::create(self.dir.path().join("stderr.txt")).unwrap();
        self.command(cluster, args).stdin(Stdio::null()).stdout(so).stderr(se).spawn().unwrap()
    }

    pub fn wait(&self, mut child: Child, started: Instant, limit: Duration) -> Finished {
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "launch did not finish within {limit:?}\nstderr:\n{}",
                    std::fs::read_to_string(self.dir.path().join("stderr.txt")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        use std::os::unix::process::ExitStatusExt;
        Finished {
            code: status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
            stdout: std::fs::read_to_string(self.dir.path().join("stdout.txt")).unwrap_or_default(),
            stderr: std::fs::read_to_string(self.dir.path().join("stderr.txt")).unwrap_or_default(),
            elapsed: started.elapsed(),
        }
    }

    pub fn run(&self, cluster: &Path, args: &[&str]) -> Finished {
        let t0 = Instant::now();
        let child = self.spawn(cluster, args);
        self.wait(child, t0, Duration::from_secs(90))
    }

    pub fn run_dir(&self) -> PathBuf {
        let target = std::fs::read_link(self.logs.join("latest")).expect("a `latest` link in the log dir");
        self.logs.join(target)
    }

    pub fn rank_log(&self, attempt_dir: &Path, host: &str, rank: usize) -> String {
        let p = attempt_dir.join(host).join(format!("rank-{rank}.log"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    pub fn host_of(&self, rank: usize) -> &str {
        &self.hosts[rank / 2].name
    }

    pub fn out_file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.out.join(name)).ok()
    }

    /// The environment a rank recorded.
    pub fn rank_env(&self, rank: usize) -> BTreeMap<String, String> {
        let raw = std::fs::read(self.out.join(format!("env-{rank}"))).unwrap_or_default();
        raw.split(|b| *b == 0)
            .filter_map(|kv| {
                let s = String::from_utf8_lossy(kv);
                s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    }

    pub fn wait_for(&self, what: &str, cond: impl Fn() -> bool, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; stderr so far:\n{}",
                std::fs::read_to_string(self.dir.path().join("stderr.txt")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_all_running(&self) {
        self.wait_for(
            "every rank to run",
            || (0..6).all(|r| self.out.join(format!("running-{r}")).exists()),
            Duration::from_secs(60),
        );
    }

    /// Every process this test started (the launcher's env marker reaches local agents and
    /// ranks; TEST_OUT reaches every rank on any host).
    pub fn our_processes(&self) -> Vec<(u32, String)> {
        let mark = format!("TEST_MARK={}", self.dir.path().display());
        let out = format!("TEST_OUT={}", self.out.display());
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
            let hit = env.split(|b| *b == 0).any(|kv| kv == mark.as_bytes() || kv == out.as_bytes());
            if hit {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if !cmd.is_empty() {
                    found.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
                }
            }
        }
        found
    }

    /// Nothing this test started runs anywhere (and on rig hosts nothing but sshd).
    pub fn assert_clean(&self, within: Duration, allow_sessions: bool) {
        let deadline = Instant::now() + within;
        loop {
            let left = self.our_processes();
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "processes left behind: {left:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Place::Rig(rig) = self.place {
            rig.assert_clean(within, allow_sessions);
        }
    }

    /// No file of the run directory holds a secret value (from `env:` or a `setup:` line).
    pub fn assert_no_secret_in_logs(&self) {
        for e in walk(&self.logs) {
            let body = std::fs::read(&e).unwrap_or_default();
            for secret in [SECRET, SETUP_SECRET, FLAG_SECRET] {
                assert!(memchr_find(&body, secret.as_bytes()).is_none(), "{} contains {secret}", e.display());
            }
        }
    }
}

pub fn make_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_symlink() {
                continue;
            }
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

// ───────────────────────────── the shared behaviours ─────────────────────────────

/// (a) every rank sees the right layout variables; per-rank logs are complete.
pub fn layout(job: &Job, args: &[&str]) {
    layout_with_extra(job, args, "")
}

/// [`layout`] with more cluster YAML (a workdir, say).
pub fn layout_with_extra(job: &Job, args: &[&str], extra: &str) {
    // A setup line assigning a secret name (redacted everywhere) next to one that only
    // contains the word (shown).
    // A secret flag value in a setup line is redacted the same way.
    let setup = format!(
        "setup:\n  - export MY_API_KEY={SETUP_SECRET} MONKEY_PATCH=visible-monkey-9\n  - ': login --token {FLAG_SECRET} --add'\n"
    );
    let cluster = job.cluster(&[("TEST_MODE", "layout")], &format!("{extra}{setup}"));
    let f = job.run(&cluster, args);
    assert_eq!(f.code, 0, "launch failed:\n{}", f.stderr);
    let run = job.run_dir();
    let master_addr = &job.hosts[0].address;
    let mut ports = Vec::new();
    for rank in 0..6 {
        let env = job.rank_env(rank);
        let get = |k: &str| env.get(k).map(String::as_str).unwrap_or("<unset>");
        let want = [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", (rank % 2).to_string()),
            ("WORLD_SIZE", "6".into()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("NODE_RANK", (rank / 2).to_string()),
            ("NNODES", "3".into()),
            ("MASTER_ADDR", master_addr.clone()),
            ("OMP_NUM_THREADS", "1".into()),
            ("LAUNCH_ATTEMPT", "0".into()),
        ];
        for (k, v) in want {
            assert_eq!(get(k), v, "rank {rank}: {k}");
        }
        let port: u16 = get("MASTER_PORT").parse().unwrap_or(0);
        assert_ne!(port, 0, "rank {rank}: MASTER_PORT 0 must be replaced by a picked port");
        ports.push(port);
        if let Place::Rig(rig) = job.place {
            let ns = job.out_file(&format!("netns-{rank}")).unwrap_or_default();
            assert_eq!(ns.trim(), rig.hosts[rank / 2].ns, "rank {rank} must run on host {}", rig.hosts[rank / 2].name);
        }
        // The complete per-rank log: 50 numbered lines, the stderr line, the redacted token and
        // key, done.
        let log = job.rank_log(&run, job.host_of(rank), rank);
        let mut lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 54, "rank {rank} log:\n{log}");
        lines.sort();
        let mut want: Vec<String> = (1..=50).map(|i| format!("rank {rank} line {i}")).collect();
        want.push(format!("rank {rank} stderr line"));
        want.push(format!("rank {rank} token is <redacted>"));
        want.push(format!("rank {rank} api key is <redacted>, monkey visible-monkey-9"));
        want.push(format!("rank {rank} done"));
        want.sort();
        assert_eq!(lines, want, "rank {rank}");
        // Stdout order is kept.
        let stdout_lines: Vec<&str> = log.lines().filter(|l| l.contains(" line ") && !l.contains("stderr")).collect();
        let numbered: Vec<String> = (1..=50).map(|i| format!("rank {rank} line {i}")).collect();
        assert_eq!(stdout_lines, numbered, "rank {rank}: stdout lines out of order");
    }
    assert!(ports.windows(2).all(|w| w[0] == w[1]), "one MASTER_PORT for every rank: {ports:?}");
    // The aggregated log has every rank's lines, prefixed.
    let agg = std::fs::read_to_string(run.join("launch.log")).unwrap();
    for rank in 0..6 {
        let prefix = format!("[{} r{rank}] ", job.host_of(rank));
        assert_eq!(agg.lines().filter(|l| l.starts_with(&prefix)).count(), 54, "rank {rank} in launch.log");
    }
    // The console shows rank 0 by default, not the others.
    assert!(f.stdout.contains(&format!("[{} r0] rank 0 line 50", job.hosts[0].name)), "{}", f.stdout);
    assert!(!f.stdout.contains("rank 3 line"), "rank 3 is not shown by default:\n{}", f.stdout);
    assert!(f.stderr.contains("all 6 ranks on 3 hosts finished"), "{}", f.stderr);
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["plan"]["master_port"], serde_json::json!(ports[0]), "plan.json records the picked port");
    assert!(run.join("launcher.log").exists());
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["exit_code"], serde_json::json!(0));
    let plan_text = std::fs::read_to_string(run.join("plan.json")).unwrap();
    assert!(plan_text.contains("export MY_API_KEY=<redacted> MONKEY_PATCH=visible-monkey-9"), "{plan_text}");
    assert!(plan_text.contains(": login --token <redacted> --add"), "{plan_text}");
    job.assert_no_secret_in_logs();
    job.assert_clean(Duration::from_secs(5), false);
}

/// (b) one rank exits 3 mid-run: everyone else is stopped within the grace period (rank 0
/// ignores SIGTERM and needs the SIGKILL), exit code 3, a report naming host and rank.
pub fn fail_fast(job: &Job, args: &[&str]) {
    let cluster = job.cluster(&[("TEST_MODE", "run"), ("FAIL_RANK", "3"), ("IGNORE_TERM_RANK", "0")], "");
    let mut all = vec!["--grace", "2s"];
    all.extend_from_slice(args);
    let f = job.run(&cluster, &all);
    assert_eq!(f.code, 3, "exit code of the failing rank; stderr:\n{}", f.stderr);
    let h2 = &job.hosts[1];
    let headline = format!("FAILED: rank 3 on {} ({}) exited with exit code 3", h2.name, h2.address);
    assert!(f.stderr.contains(&headline), "report names host and rank:\n{}", f.stderr);
    let run = job.run_dir();
    let log_path = run.join(&h2.name).join("rank-3.log");
    assert!(f.stderr.contains(&format!("log: {}", log_path.display())), "{}", f.stderr);
    assert!(f.stderr.contains("| error: rank 3 failing on purpose"), "the report quotes the log tail:\n{}", f.stderr);
    for h in &job.hosts {
        assert!(f.stderr.contains(&format!("  {} ({})", h.name, h.address)), "a status line per host:\n{}", f.stderr);
    }
    // Rank 1 stopped on SIGTERM and said so; rank 0 ignored it and was killed after the grace.
    let r1 = job.rank_log(&run, job.host_of(1), 1);
    assert_eq!(r1.lines().last(), Some("rank 1 stopping"), "rank 1 log:\n{r1}");
    assert!(f.stderr.contains("rank 0 stopped (SIGKILL)") || f.stderr.contains("stopped (SIGKILL)"), "{}", f.stderr);
    // The failure is noticed at once; the stop takes the grace period (2 s) and not much more.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("status.json")).unwrap()).unwrap();
    assert_eq!(report["exit_code"], serde_json::json!(3));
    let after: f64 = f
        .stderr
        .split("exited with exit code 3 (")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .expect("the report says when the failure happened");
    let connect_and_run = Duration::from_secs_f64(after);
    assert!(
        f.elapsed < connect_and_run + Duration::from_secs(2 + 5),
        "stopping took too long: failure at {after:.1}s, launcher done at {:?}",
        f.elapsed
    );
    assert!(f.elapsed >= Duration::from_secs(2), "rank 0 ignores SIGTERM: the grace period must pass first");
    job.assert_clean(Duration::from_secs(5), false);
}

/// (c) SIGINT to the launcher mid-run: everything stops, nothing is left, and every rank's last
/// printed line is in its log.
pub fn sigint(job: &Job, args: &[&str]) {
    let cluster = job.cluster(&[("TEST_MODE", "run")], "");
    let mut all = vec!["--grace", "5s"];
    all.extend_from_slice(args);
    let t0 = Instant::now();
    let child = job.spawn(&cluster, &all);
    let pid = child.id() as i32;
    job.wait_all_running();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let f = job.wait(child, t0, Duration::from_secs(60));
    assert_eq!(f.code, 130, "stderr:\n{}", f.stderr);
    assert!(f.stderr.contains("interrupted by SIGINT"), "{}", f.stderr);
    let run = job.run_dir();
    for rank in 0..6 {
        let last = job.out_file(&format!("last-{rank}")).expect("the rank recorded its last line");
        let log = job.rank_log(&run, job.host_of(rank), rank);
        assert_eq!(log.lines().last(), Some(last.trim()), "rank {rank}: its last printed line ends its log");
        assert_eq!(last.trim(), format!("rank {rank} stopping"), "rank {rank} got SIGTERM");
    }
    job.assert_clean(Duration::from_secs(5), false);
}
