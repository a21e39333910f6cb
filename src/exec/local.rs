//! The local backend: each node's agent is a child process (`launch agent`) of the launcher,
//! driven with tokio::process. Used for clusters whose hosts are all this machine.
//!
//! The agent runs in its own process group, so a Ctrl-C in the terminal reaches only the
//! launcher, which then stops every host the same way, local or remote.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::exec::backend::{Backend, EventTx, Link, LinkEvent, Probe};
use crate::exec::proto::{strip_magic, Decoder, ExitStatus, ToAgent};

pub struct LocalBackend {
    /// The launcher binary; started as `<agent> agent`.
    pub agent: PathBuf,
}

impl LocalBackend {
    pub fn new(agent: PathBuf) -> LocalBackend {
        LocalBackend { agent }
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

    /// The agent is a child of this machine: /proc says how it is.
    fn probe(&self, agent_pid: u32) -> bool {
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

impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn open(&self, node: usize, events: EventTx) -> Box<dyn Link> {
        let (tx, rx) = unbounded_channel();
        tokio::spawn(run(self.agent.clone(), node, rx, events.clone()));
        Box::new(LocalLink { tx: Mutex::new(Some(tx)), node, events, agent: self.agent.clone() })
    }
}

async fn run(agent: PathBuf, node: usize, mut rx: tokio::sync::mpsc::UnboundedReceiver<Cmd>, events: EventTx) {
    let spawned = tokio::process::Command::new(&agent)
        .arg("agent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let error = Some(format!("cannot start the node agent {} agent: {e}", agent.display()));
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
