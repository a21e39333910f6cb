//! The one seam between the dispatcher and the machines: a [`Backend`] opens a [`Link`] to
//! the node agent of one host. Local (a child process), SSH (a channel on libssh2 threads) and
//! fake (an in-process simulation for unit tests) implement it; the dispatcher cannot tell
//! them apart.

use crate::exec::proto::{ExitStatus, FromAgent, ToAgent};

/// What a link reports, tagged with its node index on the shared channel.
#[derive(Debug)]
pub enum LinkEvent {
    /// A message from the agent.
    Msg(FromAgent),
    /// A line the agent (or the remote shell) wrote on stderr: diagnostics, never rank output.
    Stderr(String),
    /// News from the backend itself, worth a line on the console: a host key `accept-new`
    /// just recorded (once per host: the next connection finds the key).
    Notice(String),
    /// The link ended; nothing more comes from this node. Without a Hello before it, the host
    /// was never reached (`error` says why); after one, the agent exited or the connection
    /// broke (`status`: the agent's exit status when known).
    Closed { status: Option<ExitStatus>, error: Option<String> },
    /// What [`Link::probe`] found.
    Probe(Probe),
}

/// A silent agent looked at from outside its link: over a new SSH connection, or in /proc
/// for a local one.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// The host answers and the agent process is there, in this /proc state (a stopped one
    /// was sent SIGCONT so that it can act on the launcher's stop).
    Alive(char),
    /// The host answers but the agent process is gone.
    Gone,
    /// The host does not answer.
    Unreachable(String),
}

impl Probe {
    /// The answer of `cat /proc/<pid>/stat` (or "gone") for an agent process whose executable
    /// is called `exe`: another name means the pid now belongs to another program.
    pub fn from_stat(stat: &str, exe: &str) -> Probe {
        match crate::agent::stat_fields(stat.trim()) {
            Some(f) if f.comm == comm_of(exe) => Probe::Alive(f.state),
            _ => Probe::Gone,
        }
    }
}

/// The name /proc shows for a process running `exe` (its file name, cut to 15 bytes).
pub fn comm_of(exe: &str) -> &str {
    let name = exe.rsplit('/').next().unwrap_or(exe);
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

pub type EventTx = tokio::sync::mpsc::Sender<(usize, LinkEvent)>;

/// The launcher's end of one agent connection. Sends never block; they are queued.
pub trait Link: Send {
    fn send(&self, msg: &ToAgent);
    /// Half-close: the agent reads EOF (and stops its units if any still run), the link keeps
    /// delivering what the agent sends until it exits.
    fn close(&self);
    /// Give up on the connection now (a host that stopped answering): stop reading, drop it.
    fn abandon(&self);
    /// Look at the agent (pid `agent_pid`) from outside this link and report a
    /// [`LinkEvent::Probe`]; false when the backend cannot (the caller decides without it).
    fn probe(&self, _agent_pid: u32) -> bool {
        false
    }
}

pub trait Backend: Send + Sync {
    /// "local", "ssh", "fake": for messages.
    fn name(&self) -> &'static str;
    /// Reach node `node` and start its agent; everything it reports goes to `events`.
    /// Must be called inside a tokio runtime; returns at once.
    fn open(&self, node: usize, events: EventTx) -> Box<dyn Link>;
    /// Start reaching the hosts again ahead of the next [`Backend::open`], where a backend can
    /// (SSH: connect and start the agent in the background). Called after a short-lived use of
    /// the links, such as the checks' probe, so the first attempt does not wait to connect.
    fn reach_ahead(&self) {}
}

#[cfg(test)]
mod tests {
    use super::Probe;

    #[test]
    fn probes_read_the_agents_stat_line() {
        assert_eq!(Probe::from_stat("812 (launch) T 1 812 812 0 -1\n", "launch"), Probe::Alive('T'));
        assert_eq!(Probe::from_stat("812 (launch) S 1 812", "/opt/bin/launch"), Probe::Alive('S'));
        // An agent installed under another name (cut to 15 bytes, as /proc does).
        let exe = "/opt/mm/bin/mm-launch-0.1.0-linux";
        assert_eq!(Probe::from_stat("9 (mm-launch-0.1.0) T 1", exe), Probe::Alive('T'));
        // The pid now belongs to another program, or the shell said so.
        assert_eq!(Probe::from_stat("812 (bash) S 1 812", "launch"), Probe::Gone);
        assert_eq!(Probe::from_stat("gone\n", "launch"), Probe::Gone);
    }
}
