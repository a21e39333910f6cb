//! The local and Slurm backends: each node's agent is a child process of the launcher, driven
//! with tokio::process over its stdio: `launch agent` itself for clusters whose hosts are all
//! this machine, or `srun --nodes 1 --ntasks 1 --nodelist HOST … launch agent` for a Slurm
//! allocation, where srun relays the agent's stdio and Slurm owns the processes on the node
//! (`scancel` reaches them, a lost node ends the step, nothing needs SSH).
//!
//! The child runs in its own process group, so a Ctrl-C in the terminal reaches only the
//! launcher, which then stops every host the same way, local or remote.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::exec::backend::{Backend, EventTx, Link, LinkEvent, Probe};
use crate::exec::proto::{strip_magic, Decoder, ExitStatus, ToAgent, SLURM_STEP_MARK};

pub struct LocalBackend {
    /// The launcher binary; started as `<agent> agent`.
    pub agent: PathBuf,
    /// None: a child of this machine. Some: the Slurm node each node index runs on.
    slurm: Option<SlurmSteps>,
}

/// Where and how the agents run as Slurm steps.
#[derive(Clone)]
struct SlurmSteps {
    /// Slurm's node name of each node, in node order.
    nodes: Vec<String>,
    /// Each node's allocated CPUs: the step asks for all of them, so ranks are not confined
    /// to one.
    cpus: Vec<Option<u32>>,
}

/// `srun` with the options of one agent step on `node` (the command follows).
fn srun_step(node: &str, cpus: Option<u32>) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("srun");
    c.args(["--nodes=1", "--ntasks=1", "--kill-on-bad-exit=1", "--overlap", "--unbuffered", "--quiet"])
        .arg(format!("--nodelist={node}"))
        .arg("--job-name=launch-agent")
        .env(SLURM_STEP_MARK, "1")
        // A lost node's srun is abandoned; it must not outlive the launcher's interest in it.
        .kill_on_drop(true);
    if let Some(n) = cpus {
        c.arg(format!("--cpus-per-task={n}"));
    }
    c
}

impl LocalBackend {
    pub fn new(agent: PathBuf) -> LocalBackend {
        LocalBackend { agent, slurm: None }
    }

    /// Agents as one Slurm step per node of the allocation this process runs in (`agent` must
    /// be on a file system the nodes share).
    pub fn slurm(agent: PathBuf, nodes: Vec<String>, cpus: Vec<Option<u32>>) -> LocalBackend {
        LocalBackend { agent, slurm: Some(SlurmSteps { nodes, cpus }) }
    }
}

enum Cmd {
    Bytes(Vec<u8>),
    Close,
    Abandon,
}

struct LocalLink {
    tx: Mutex<Option<UnboundedSender<Cmd>>>,
    node: usize,
    events: EventTx,
    /// The agent's executable (what /proc names its process after).
    agent: PathBuf,
    /// Set for agents that run as Slurm steps: (node name, CPUs on it).
    slurm_node: Option<(String, Option<u32>)>,
}

impl Link for LocalLink {
    fn send(&self, msg: &ToAgent) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(Cmd::Bytes(msg.encode()));
        }
    }

    fn close(&self) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(Cmd::Close);
        }
    }

    fn abandon(&self) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(Cmd::Abandon);
        }
    }

    /// The agent is a child of this machine: /proc says how it is. On a Slurm node another
    /// step (overlapping the agent's) reads the node's /proc and continues a stopped agent.
    fn probe(&self, agent_pid: u32) -> bool {
        if let Some((node, _)) = &self.slurm_node {
            let (node, agent, events, me) =
                (node.clone(), self.agent.display().to_string(), self.events.clone(), self.node);
            std::thread::spawn(move || {
                let found = probe_over_srun(&node, agent_pid, &agent, PROBE_TIMEOUT);
                // Waits for room: a dropped answer would read as a host that never answered.
                let _ = events.blocking_send((me, LinkEvent::Probe(found)));
            });
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/{agent_pid}/stat")).unwrap_or_default();
        let found = Probe::from_stat(&stat, &self.agent.display().to_string());
        if found == Probe::Alive('T') {
            // SAFETY: plain syscall to the launcher's own child.
            unsafe {
                libc::kill(agent_pid as i32, libc::SIGCONT);
            }
        }
        self.events.try_send((self.node, LinkEvent::Probe(found))).is_ok()
    }
}

/// How long a probe step may take: a node whose slurmd does not answer is unreachable (above
/// Slurm's default MessageTimeout of 10 s, so a slow controller is not a lost node).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The agent's /proc state on a Slurm node, read by a step that overlaps the agent's (and
/// that continues a stopped agent); Unreachable when the step does not run within `limit`.
fn probe_over_srun(node: &str, agent_pid: u32, agent: &str, limit: std::time::Duration) -> Probe {
    let spawned = std::process::Command::new("srun")
        // The smallest step: one CPU, no GRES, a token of memory, overlapping the agent's.
        .args(["--nodes=1", "--ntasks=1", "--overlap", "--quiet", "--job-name=launch-probe"])
        .args(["--cpus-per-task=1", "--gres=none", "--mem-per-cpu=1M"])
        .arg(format!("--nodelist={node}"))
        .args(["sh", "-c", "cat /proc/$0/stat 2>/dev/null || echo gone; kill -CONT $0 2>/dev/null; true"])
        .arg(agent_pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Probe::Unreachable(format!("cannot run srun to look at {node}: {e}")),
    };
    let start = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(std::time::Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Probe::Unreachable(format!(
                    "a Slurm step on {node} did not run within {}s (its slurmd does not answer)",
                    limit.as_secs()
                ));
            }
        }
    }
    let out = child.wait_with_output();
    let (stdout, stderr, ok) = match out {
        Ok(o) => (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            o.status.success(),
        ),
        Err(e) => (String::new(), e.to_string(), false),
    };
    if !ok && stdout.trim().is_empty() {
        return Probe::Unreachable(format!("srun on {node} failed: {}", stderr.trim()));
    }
    Probe::from_stat(&stdout, agent)
}

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        if self.slurm.is_some() {
            "slurm"
        } else {
            "local"
        }
    }

    fn open(&self, node: usize, events: EventTx) -> Box<dyn Link> {
        let (tx, rx) = unbounded_channel();
        let slurm_node = self
            .slurm
            .as_ref()
            .map(|s| (s.nodes.get(node).cloned().unwrap_or_default(), s.cpus.get(node).copied().flatten()));
        tokio::spawn(run(self.agent.clone(), slurm_node.clone(), node, rx, events.clone()));
        Box::new(LocalLink { tx: Mutex::new(Some(tx)), node, events, agent: self.agent.clone(), slurm_node })
    }
}

async fn run(
    agent: PathBuf,
    slurm_node: Option<(String, Option<u32>)>,
    node: usize,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Cmd>,
    events: EventTx,
) {
    let mut command = match &slurm_node {
        Some((name, cpus)) => {
            let mut c = srun_step(name, *cpus);
            c.arg(&agent);
            c
        }
        None => {
            let mut c = tokio::process::Command::new(&agent);
            c.env_remove(SLURM_STEP_MARK);
            c
        }
    };
    let spawned = command
        .arg("agent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let error = Some(match &slurm_node {
                Some((name, _)) => {
                    format!("cannot start srun for the node agent on {name}: {e} (is Slurm's srun on PATH?)")
                }
                None => format!("cannot start the node agent {} agent: {e}", agent.display()),
            });
            let _ = events.send((node, LinkEvent::Closed { status: None, error })).await;
            return;
        }
    };
    let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ =
            events.send((node, LinkEvent::Closed { status: None, error: Some("no pipes to the agent".into()) })).await;
        return;
    };
    let (abandon_tx, mut abandon_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Cmd::Bytes(b) => {
                    if stdin.write_all(&b).await.is_err() {
                        break;
                    }
                    let _ = stdin.flush().await;
                }
                Cmd::Close => break,
                Cmd::Abandon => {
                    let _ = abandon_tx.send(true);
                    break;
                }
            }
        }
        // Dropping stdin is the agent's EOF.
    });
    let err_events = events.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if err_events.send((node, LinkEvent::Stderr(line))).await.is_err() {
                break;
            }
        }
    });

    let mut buf = vec![0u8; 256 * 1024];
    let mut head: Vec<u8> = Vec::new();
    let mut dec: Option<Decoder> = None;
    let mut error = None;
    loop {
        let n = tokio::select! {
            r = stdout.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = abandon_rx.changed() => {
                error = Some("abandoned".to_string());
                break;
            }
        };
        let data: &[u8] = &buf[..n];
        let d = match dec.as_mut() {
            Some(d) => {
                d.push(data);
                d
            }
            None => {
                head.extend_from_slice(data);
                match strip_magic(&head) {
                    Ok(None) => continue,
                    Ok(Some(rest)) => {
                        let mut d = Decoder::default();
                        d.push(rest);
                        dec.insert(d)
                    }
                    Err(text) => {
                        error = Some(format!("the agent printed {text:?} instead of its greeting"));
                        break;
                    }
                }
            }
        };
        loop {
            match d.next_from_agent() {
                Ok(Some(m)) => {
                    if events.send((node, LinkEvent::Msg(m))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(format!("corrupt stream from the agent: {e}"));
                    break;
                }
            }
        }
        if error.is_some() {
            break;
        }
    }
    let status = if error.is_some() {
        // The agent's stdin closes with the writer task; it stops its units on that EOF.
        None
    } else {
        child.wait().await.ok().map(ExitStatus::from)
    };
    let _ = events.send((node, LinkEvent::Closed { status, error })).await;
}
