//! The SSH backend: one OS thread per host (libssh2 is blocking), all connecting at once.
//!
//! ```text
//! thread per host: connect (known_hosts, agent/keys; src/ssh.rs) → exec the agent
//!     (missing? upload this binary over SFTP into ~/.cache/mm-launch/<key>/launch, retry)
//!   → non-blocking pump: poll(socket, wake pipe) → read frames → events channel
//!                                                ← queued commands ← Link::send
//! ```
//!
//! Liveness is judged by the dispatcher from the agent's heartbeats, so it is the same for
//! every backend; libssh2's own keepalives keep idle NAT/firewall state alive.
//!
//! Pitfall: a libssh2 session is not safe to block in from two threads (a blocking read holds
//! the session lock and starves writes), hence one thread that never blocks inside libssh2 and
//! waits in poll(2) instead, woken by a pipe when the dispatcher queues a command.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};

use ssh2::{Channel, Session};

use crate::exec::backend::{Backend, EventTx, Link, LinkEvent, Probe};
use crate::exec::proto::{strip_magic, Decoder, ExitStatus, ToAgent};
use crate::render::shell_quote;
use crate::ssh::{RecordedKey, SshTarget};

/// Where the agent comes from on the hosts.
#[derive(Debug, Clone)]
pub enum AgentSource {
    /// A `launch` binary already installed at this path on every host.
    Path(String),
    /// Uploaded from this local file on first use into `~/.cache/mm-launch/<key>/launch`.
    Upload { local: PathBuf, key: String },
}

impl AgentSource {
    /// This launcher's own binary, keyed by version and a fingerprint of the file, so a
    /// rebuilt launcher never runs a stale agent.
    pub fn upload_self() -> std::io::Result<AgentSource> {
        let local = std::env::current_exe()?;
        let key = cache_key(&local)?;
        Ok(AgentSource::Upload { local, key })
    }

    /// The agent's executable on the hosts (for the name /proc gives its process).
    pub fn exe(&self) -> String {
        match self {
            AgentSource::Path(p) => p.clone(),
            AgentSource::Upload { .. } => "launch".into(),
        }
    }

    /// The remote cache directory (relative to the login directory), if uploading.
    pub fn cache_dir(&self) -> Option<String> {
        match self {
            AgentSource::Upload { key, .. } => Some(format!(".cache/mm-launch/{key}")),
            AgentSource::Path(_) => None,
        }
    }

    fn command(&self) -> String {
        match self {
            AgentSource::Path(p) => format!("exec {} agent", shell_quote(p)),
            AgentSource::Upload { key, .. } => format!(
                "p=\"$HOME/.cache/mm-launch/{key}/launch\"; if [ -x \"$p\" ]; then exec \"$p\" agent; fi; \
                 echo @@mm-agent-missing"
            ),
        }
    }
}

/// `<version>-<16 hex digits>`: FNV-1a over the size, mtime and the first and last 64 KiB.
pub fn cache_key(binary: &Path) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(binary)?;
    let meta = f.metadata()?;
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    eat(&meta.len().to_le_bytes());
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
    eat(&mtime.as_nanos().to_le_bytes());
    let mut buf = vec![0u8; 64 * 1024];
    let n = f.read(&mut buf)?;
    eat(&buf[..n]);
    if meta.len() > buf.len() as u64 {
        f.seek(SeekFrom::End(-(buf.len() as i64)))?;
        f.read_exact(&mut buf)?;
        eat(&buf);
    }
    Ok(format!("{}-{h:016x}", env!("CARGO_PKG_VERSION")))
}

/// Per blocking call while starting the agent (channel, exec, greeting, each SFTP write).
const BOOTSTRAP_TIMEOUT_MS: u32 = 60_000;

/// A host reached and its agent started, not yet attached to a dispatcher.
struct Prepared {
    sess: Session,
    ch: Channel,
    rest: Vec<u8>,
}

/// The host key `accept-new` recorded while connecting (to announce, whether or not the
/// agent then started), and the host reached with its agent started.
type Reached = (Option<RecordedKey>, Result<Prepared, String>);

type Early = mpsc::Receiver<Reached>;

pub struct SshBackend {
    targets: Vec<SshTarget>,
    agent: AgentSource,
    /// Connections started ahead of the first attempt (see [`SshBackend::start_early`]).
    early: Mutex<Vec<Option<Early>>>,
}

impl SshBackend {
    pub fn new(targets: Vec<SshTarget>, agent: AgentSource) -> SshBackend {
        let early = Mutex::new(targets.iter().map(|_| None).collect());
        SshBackend { targets, agent, early }
    }

    /// Starts connecting to every host and starting its agent right away, while the launcher
    /// does its other work (the environment checks, the run directory); the first attempt's
    /// links pick these up. An agent started this way runs nothing until told to, and exits
    /// when its connection is dropped.
    pub fn start_early(targets: Vec<SshTarget>, agent: AgentSource) -> SshBackend {
        let early = targets.iter().map(|t| connect_ahead(t, &agent)).collect();
        SshBackend { targets, agent, early: Mutex::new(early) }
    }
}

/// Connects to `t` and starts its agent on a thread; the receiver gets the result.
fn connect_ahead(t: &SshTarget, agent: &AgentSource) -> Option<Early> {
    let (tx, rx) = mpsc::channel();
    let (t, a) = (t.clone(), agent.clone());
    let spawned = std::thread::Builder::new().name(format!("ssh-early-{}", t.host)).spawn(move || {
        let _ = tx.send(prepare(&t, &a));
    });
    spawned.ok().map(|_| rx)
}

enum Cmd {
    Bytes(Vec<u8>),
    Close,
}

struct SshLink {
    tx: Mutex<Option<Sender<Cmd>>>,
    wake: Option<UnixStream>,
    abandoned: Arc<AtomicBool>,
    /// For [`Link::probe`]: the host, the agent's executable there, and where to report.
    target: SshTarget,
    agent_exe: String,
    node: usize,
    events: EventTx,
}

impl SshLink {
    fn push(&self, cmd: Cmd, take: bool) {
        let mut guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = guard.as_ref() {
            let _ = tx.send(cmd);
        }
        if take {
            guard.take();
        }
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = &self.wake {
            let _ = (&*w).write(&[1]);
        }
    }
}

impl Link for SshLink {
    fn send(&self, msg: &ToAgent) {
        self.push(Cmd::Bytes(msg.encode()), false);
    }

    fn close(&self) {
        self.push(Cmd::Close, false);
    }

    fn abandon(&self) {
        // A disconnected command channel tells the thread to drop the session at once.
        self.abandoned.store(true, Ordering::SeqCst);
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.wake();
    }

    /// A new SSH connection reads the agent's /proc/<pid>/stat (and continues it when it is
    /// stopped, so that it can carry out the launcher's stop): a frozen agent is told apart
    /// from a host that is down.
    fn probe(&self, agent_pid: u32) -> bool {
        let (target, node, events) = (self.target.clone(), self.node, self.events.clone());
        let exe = self.agent_exe.clone();
        let spawned = std::thread::Builder::new().name(format!("ssh-probe-{}", target.host)).spawn(move || {
            let found = probe_agent(&target, agent_pid, &exe);
            let _ = events.blocking_send((node, LinkEvent::Probe(found)));
        });
        spawned.is_ok()
    }
}

/// How long a probe's command may take once connected.
const PROBE_TIMEOUT_MS: u32 = 5_000;

fn probe_agent(target: &SshTarget, pid: u32, exe: &str) -> Probe {
    let (sess, _) = match target.connect() {
        Ok(c) => c,
        Err(e) => return Probe::Unreachable(e.to_string()),
    };
    sess.set_timeout(PROBE_TIMEOUT_MS);
    // Only that program's process, and only when stopped (T), is continued.
    let stopped = shell_quote(&format!("{pid} ({}) T", crate::exec::backend::comm_of(exe)));
    let script = format!(
        "s=$(cat /proc/{pid}/stat 2>/dev/null) || {{ echo gone; exit 0; }}; echo \"$s\"; \
         case \"$s\" in {stopped}*) kill -CONT {pid};; esac"
    );
    let mut out = String::new();
    let ran = sess.channel_session().and_then(|mut ch| {
        ch.exec(&script)?;
        let _ = ch.read_to_string(&mut out);
        ch.wait_close()
    });
    match ran {
        Ok(()) => Probe::from_stat(&out, exe),
        Err(e) => Probe::Unreachable(format!("{}: connected, but the probe failed: {e}", target.host)),
    }
}

impl Backend for SshBackend {
    fn name(&self) -> &'static str {
        "ssh"
    }

    fn reach_ahead(&self) {
        let mut early = self.early.lock().unwrap_or_else(|e| e.into_inner());
        for (slot, t) in early.iter_mut().zip(&self.targets) {
            if slot.is_none() {
                *slot = connect_ahead(t, &self.agent);
            }
        }
    }

    fn open(&self, node: usize, events: EventTx) -> Box<dyn Link> {
        let (tx, rx) = mpsc::channel();
        let (wake_r, wake_w) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                let _ = events.try_send((
                    node,
                    LinkEvent::Closed { status: None, error: Some(format!("cannot create a socket pair: {e}")) },
                ));
                return Box::new(SshLink {
                    tx: Mutex::new(None),
                    wake: None,
                    abandoned: Arc::default(),
                    target: self.targets[node].clone(),
                    agent_exe: self.agent.exe(),
                    node,
                    events,
                });
            }
        };
        let _ = wake_r.set_nonblocking(true);
        let _ = wake_w.set_nonblocking(true);
        let target = self.targets[node].clone();
        let agent = self.agent.clone();
        let early = self.early.lock().unwrap_or_else(|e| e.into_inner()).get_mut(node).and_then(Option::take);
        let abandoned = Arc::new(AtomicBool::new(false));
        let gone = abandoned.clone();
        let link_events = events.clone();
        let spawned = std::thread::Builder::new().name(format!("ssh-{}", target.host)).spawn(move || {
            let (status, error) = match host_thread(&target, &agent, early, node, &events, &rx, &wake_r, &gone) {
                Ok(status) => (status, None),
                Err(e) => (None, Some(e)),
            };
            let _ = events.blocking_send((node, LinkEvent::Closed { status, error }));
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start a thread for node {node}: {e}");
        }
        Box::new(SshLink {
            tx: Mutex::new(Some(tx)),
            wake: Some(wake_w),
            abandoned,
            target: self.targets[node].clone(),
            agent_exe: self.agent.exe(),
            node,
            events: link_events,
        })
    }
}

/// Connects and starts the agent (blocking).
fn prepare(target: &SshTarget, agent: &AgentSource) -> Reached {
    let t0 = std::time::Instant::now();
    let (sess, recorded) = match target.connect() {
        Ok(c) => c,
        Err(e) => return (None, Err(e.to_string())),
    };
    (recorded, start_session(sess, t0, target, agent))
}

fn start_session(
    sess: Session,
    t0: std::time::Instant,
    target: &SshTarget,
    agent: &AgentSource,
) -> Result<Prepared, String> {
    // libssh2 ends a *blocking* wait with "Timed out waiting on socket" once the keepalive
    // interval passes, so keepalives stay off while bootstrapping (blocking, with a generous
    // per-call timeout instead) and come back for the non-blocking pump.
    sess.set_keepalive(false, 0);
    sess.set_timeout(BOOTSTRAP_TIMEOUT_MS);
    tracing::debug!(host = %target.host, elapsed_ms = t0.elapsed().as_millis() as u64, "ssh session ready");
    let (ch, rest) = start_agent(&sess, target, agent)?;
    tracing::debug!(host = %target.host, elapsed_ms = t0.elapsed().as_millis() as u64, "agent started");
    Ok(Prepared { sess, ch, rest })
}

/// Takes the early connection (or makes one), then pumps until the agent's channel closes.
#[allow(clippy::too_many_arguments)]
fn host_thread(
    target: &SshTarget,
    agent: &AgentSource,
    early: Option<Early>,
    node: usize,
    events: &EventTx,
    cmds: &Receiver<Cmd>,
    wake: &UnixStream,
    abandoned: &AtomicBool,
) -> Result<Option<ExitStatus>, String> {
    let (recorded, prepared) = match early.map(|rx| rx.recv()) {
        Some(Ok(reached)) => reached,
        // The early thread could not even report: connect now.
        Some(Err(_)) | None => prepare(target, agent),
    };
    if let Some(k) = recorded {
        let _ = events.blocking_send((node, LinkEvent::Notice(k.announcement())));
    }
    let prepared = prepared?;
    if abandoned.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let Prepared { sess, ch, rest } = prepared;
    pump(&sess, ch, rest, target, node, events, cmds, wake)
}

fn start_agent(sess: &Session, target: &SshTarget, agent: &AgentSource) -> Result<(Channel, Vec<u8>), String> {
    let host = &target.host;
    for attempt in 0..2 {
        let mut ch = sess.channel_session().map_err(|e| format!("{host}: cannot open a channel: {e}"))?;
        ch.exec(&agent.command()).map_err(|e| format!("{host}: cannot start the agent: {e}"))?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let outcome = loop {
            match ch.read(&mut buf) {
                Ok(0) => break Err(None),
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    match strip_magic(&seen) {
                        Ok(None) => continue,
                        Ok(Some(rest)) => break Ok(rest.to_vec()),
                        Err(text) => break Err(Some(text)),
                    }
                }
                Err(e) => return Err(format!("{host}: reading the agent's greeting: {e}")),
            }
        };
        match outcome {
            Ok(rest) => return Ok((ch, rest)),
            Err(Some(text)) if text == "missing" => match agent {
                AgentSource::Upload { local, key } if attempt == 0 => {
                    let _ = ch.wait_close();
                    upload(sess, host, local, key)?;
                }
                _ => return Err(format!("{host}: the uploaded agent is still not runnable")),
            },
            Err(Some(text)) => {
                return Err(format!(
                    "{host}: the host printed {text:?} instead of starting the agent (a login script that \
                     prints text breaks non-interactive sessions)"
                ))
            }
            Err(None) => {
                let mut err = String::new();
                let _ = ch.stderr().read_to_string(&mut err);
                let _ = ch.wait_close();
                let code = ch.exit_status().unwrap_or(-1);
                let fix = match agent {
                    AgentSource::Path(p) => {
                        format!("is the launch binary at {p} on this host (--agent-path)? Same version and CPU architecture?")
                    }
                    AgentSource::Upload { .. } => {
                        "the uploaded launch binary may not run there (another CPU architecture or C library?)".into()
                    }
                };
                return Err(format!("{host}: the agent exited {code} before starting: {}\n  {fix}", err.trim()));
            }
        }
    }
    Err(format!("{host}: cannot start the agent"))
}

/// Uploads the launcher binary to `~/.cache/mm-launch/<key>/launch` (temporary name, then an
/// atomic rename, so a concurrent or interrupted upload never leaves a half file in place).
fn upload(sess: &Session, host: &str, local: &Path, key: &str) -> Result<(), String> {
    let e = |what: &str| {
        let what = format!("{host}: {what}");
        move |err: ssh2::Error| format!("{what}: {err}")
    };
    let t0 = std::time::Instant::now();
    let sftp = sess.sftp().map_err(e("cannot start SFTP to upload the agent"))?;
    let dir = format!(".cache/mm-launch/{key}");
    let mut partial = String::new();
    for part in dir.split('/') {
        if !partial.is_empty() {
            partial.push('/');
        }
        partial.push_str(part);
        let _ = sftp.mkdir(Path::new(&partial), 0o755);
    }
    let tmp = format!("{dir}/launch.tmp-{}-{}", std::process::id(), host.replace('/', "_"));
    let mut src =
        std::fs::File::open(local).map_err(|err| format!("{host}: cannot read {}: {err}", local.display()))?;
    {
        let mut dst = sftp
            .open_mode(
                Path::new(&tmp),
                ssh2::OpenFlags::WRITE | ssh2::OpenFlags::CREATE | ssh2::OpenFlags::TRUNCATE,
                0o755,
                ssh2::OpenType::File,
            )
            .map_err(e(&format!("cannot create ~/{tmp}")))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(|err| format!("{host}: reading {}: {err}", local.display()))?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n]).map_err(|err| format!("{host}: uploading the agent: {err}"))?;
        }
    }
    let fin = format!("{dir}/launch");
    if let Err(err) = sftp.rename(Path::new(&tmp), Path::new(&fin), None) {
        // Another upload (a host sharing this file system) may have won the race.
        let _ = sftp.unlink(Path::new(&tmp));
        if sftp.stat(Path::new(&fin)).is_err() {
            return Err(format!("{host}: cannot move the agent into ~/{fin}: {err}"));
        }
    }
    tracing::info!(host, elapsed_ms = t0.elapsed().as_millis() as u64, "uploaded the agent to ~/{fin}");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn pump(
    sess: &Session,
    mut ch: Channel,
    rest: Vec<u8>,
    target: &SshTarget,
    node: usize,
    events: &EventTx,
    cmds: &Receiver<Cmd>,
    wake: &UnixStream,
) -> Result<Option<ExitStatus>, String> {
    let host = &target.host;
    let mut dec = Decoder::default();
    dec.push(&rest);
    let forward = |dec: &mut Decoder| -> Result<bool, String> {
        loop {
            match dec.next_from_agent() {
                Ok(Some(m)) => {
                    if events.blocking_send((node, LinkEvent::Msg(m))).is_err() {
                        return Ok(false);
                    }
                }
                Ok(None) => return Ok(true),
                Err(e) => return Err(format!("{host}: corrupt stream from the agent: {e}")),
            }
        }
    };
    if !forward(&mut dec)? {
        return Ok(None);
    }
    sess.set_blocking(false);
    sess.set_timeout(0);
    if !target.keepalive_interval.is_zero() {
        sess.set_keepalive(true, target.keepalive_interval.as_secs().max(1) as u32);
    }
    let sock = sess.as_raw_fd();
    let mut out: Vec<u8> = Vec::new();
    let mut closing = false;
    let mut eof_sent = false;
    let mut rbuf = vec![0u8; 256 * 1024];
    let mut err_line: Vec<u8> = Vec::new();
    loop {
        let mut progressed = false;
        loop {
            match cmds.try_recv() {
                Ok(Cmd::Bytes(b)) => out.extend_from_slice(&b),
                Ok(Cmd::Close) => closing = true,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Ok(None),
            }
        }
        let mut sink = [0u8; 64];
        while matches!((&*wake).read(&mut sink), Ok(n) if n > 0) {}

        while !out.is_empty() {
            match ch.write(&out) {
                Ok(0) => break,
                Ok(n) => {
                    out.drain(..n);
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(link_error(host, "writing to the agent", sess, &e)),
            }
        }
        if closing && out.is_empty() && !eof_sent {
            match ch.send_eof() {
                Ok(()) => eof_sent = true,
                // LIBSSH2_ERROR_EAGAIN
                Err(e) if e.code() == ssh2::ErrorCode::Session(-37) => {}
                Err(e) => return Err(link_error(host, "closing the agent's input", sess, &e)),
            }
        }
        loop {
            match ch.read(&mut rbuf) {
                Ok(0) => break,
                Ok(n) => {
                    dec.push(&rbuf[..n]);
                    if !forward(&mut dec)? {
                        return Ok(None);
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(link_error(host, "reading from the agent", sess, &e)),
            }
        }
        loop {
            match ch.stderr().read(&mut rbuf) {
                Ok(0) => break,
                Ok(n) => {
                    err_line.extend_from_slice(&rbuf[..n]);
                    while let Some(pos) = memchr::memchr(b'\n', &err_line) {
                        let line = String::from_utf8_lossy(&err_line[..pos]).into_owned();
                        err_line.drain(..=pos);
                        let _ = events.blocking_send((node, LinkEvent::Stderr(line)));
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        if ch.eof() {
            break;
        }
        let _ = sess.keepalive_send();
        if !progressed {
            let mut events_mask = libc::POLLIN;
            if matches!(sess.block_directions(), ssh2::BlockDirections::Outbound | ssh2::BlockDirections::Both) {
                events_mask |= libc::POLLOUT;
            }
            let mut fds = [
                libc::pollfd { fd: sock, events: events_mask, revents: 0 },
                libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: two valid pollfd structs.
            unsafe {
                libc::poll(fds.as_mut_ptr(), 2, 1000);
            }
        }
    }
    if !err_line.is_empty() {
        let _ = events.blocking_send((node, LinkEvent::Stderr(String::from_utf8_lossy(&err_line).into_owned())));
    }
    // The agent closed its stdout: it has exited or is about to. Collect its status briefly.
    tracing::debug!(host = %host, "agent output ended");
    sess.set_keepalive(false, 0);
    sess.set_blocking(true);
    sess.set_timeout(2000);
    let _ = ch.close();
    let _ = ch.wait_close();
    let status = match ch.exit_signal() {
        Ok(sig) if sig.exit_signal.is_some() => {
            let name = sig.exit_signal.unwrap_or_default();
            Some(ExitStatus { code: None, signal: signal_number(&name) })
        }
        _ => ch.exit_status().ok().map(ExitStatus::code),
    };
    tracing::debug!(host = %host, ?status, "agent channel closed");
    Ok(status)
}

/// libssh2's codes for the connection itself ending: the peer closed the TCP connection or
/// reset it (sshd killed, host rebooted), or the socket failed (libssh2.h; ssh2 does not
/// export them).
const LIBSSH2_ERROR_SOCKET_SEND: i32 = -7;
const LIBSSH2_ERROR_SOCKET_DISCONNECT: i32 = -13;
const LIBSSH2_ERROR_SOCKET_RECV: i32 = -43;
const CONNECTION_ENDED: [i32; 3] =
    [LIBSSH2_ERROR_SOCKET_RECV, LIBSSH2_ERROR_SOCKET_SEND, LIBSSH2_ERROR_SOCKET_DISCONNECT];

/// The message for a failed read or write on the agent's channel, from the session's last
/// libssh2 error.
fn link_error(host: &str, what: &str, sess: &Session, err: &dyn std::fmt::Display) -> String {
    let code = ssh2::Error::last_session_error(sess).map(|e| e.code());
    tracing::debug!(host, ?code, "{what}: {err}");
    describe_link_error(host, what, code, err)
}

/// A connection that ended reads as that ("the SSH connection to h3 dropped"), not as
/// libssh2's "transport read"; anything else keeps libssh2's words.
fn describe_link_error(host: &str, what: &str, code: Option<ssh2::ErrorCode>, err: &dyn std::fmt::Display) -> String {
    match code {
        Some(ssh2::ErrorCode::Session(c)) if CONNECTION_ENDED.contains(&c) => {
            format!("the SSH connection to {host} dropped (sshd gone or host rebooted)")
        }
        _ => format!("{host}: {what}: {err}"),
    }
}

fn signal_number(name: &str) -> Option<i32> {
    let full = if name.starts_with("SIG") { name.to_string() } else { format!("SIG{name}") };
    full.parse::<nix::sys::signal::Signal>().ok().map(|s| s as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_changes_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bin");
        std::fs::write(&p, vec![7u8; 200_000]).unwrap();
        let a = cache_key(&p).unwrap();
        assert!(a.starts_with(env!("CARGO_PKG_VERSION")));
        let mut data = vec![7u8; 200_000];
        data[199_999] = 8;
        std::fs::write(&p, data).unwrap();
        assert_ne!(a, cache_key(&p).unwrap());
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)), "safe in a shell word: {a}");
    }

    #[test]
    fn bootstrap_commands_quote_paths() {
        let p = AgentSource::Path("/opt/my launch/$(x)".into());
        assert_eq!(p.command(), "exec '/opt/my launch/$(x)' agent");
        let u = AgentSource::Upload { local: PathBuf::from("/x"), key: "0.1.0-00ff".into() };
        assert!(u.command().contains(".cache/mm-launch/0.1.0-00ff/launch"));
        assert_eq!(u.cache_dir().as_deref(), Some(".cache/mm-launch/0.1.0-00ff"));
    }

    #[test]
    fn a_connection_that_ended_reads_as_dropped() {
        // A killed sshd: the socket reads EOF, libssh2 says SOCKET_RECV "transport read".
        let recv = Some(ssh2::ErrorCode::Session(LIBSSH2_ERROR_SOCKET_RECV));
        assert_eq!(
            describe_link_error("h3", "reading from the agent", recv, &"transport read"),
            "the SSH connection to h3 dropped (sshd gone or host rebooted)"
        );
        let send = Some(ssh2::ErrorCode::Session(LIBSSH2_ERROR_SOCKET_SEND));
        assert!(describe_link_error("h3", "writing to the agent", send, &"x").contains("dropped"));
        let other = Some(ssh2::ErrorCode::Session(-26)); // LIBSSH2_ERROR_CHANNEL_CLOSED
        assert_eq!(
            describe_link_error("h3", "reading from the agent", other, &"closed"),
            "h3: reading from the agent: closed"
        );
        assert_eq!(describe_link_error("h3", "writing to the agent", None, &"x"), "h3: writing to the agent: x");
    }

    #[test]
    fn signal_names_map_to_numbers() {
        assert_eq!(signal_number("KILL"), Some(9));
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("NOPE"), None);
    }
}
