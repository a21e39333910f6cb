//! The node agent: `launch agent`, one per host, started by the launcher over SSH (or as a
//! local child). It plays the role of torchrun's per-node agent.
//!
//! ```text
//!   stdin ──frames──► stdin thread ─┐
//!   SIGTERM/INT/HUP ─► signal thread ┼─► control loop (main thread) ─► spawn units (setsid)
//!   unit exits ─────► waiter threads ┤        │  stop: SIGTERM groups + strays, grace, SIGKILL
//!   unit pipes ─────► reader threads ┘        ▼
//!                           └──── output frames ──► writer thread ──► stdout ──► launcher
//! ```
//!
//! Guarantees:
//! - every unit runs `bash -c SCRIPT` in its own session and process group, with the
//!   parent-death signal set, and the agent is a child subreaper: whatever a unit leaves behind
//!   stays below the agent and is found by a /proc walk when stopping;
//! - output goes out as whole lines (a partial line waits for its newline or for the end of
//!   the stream); a unit's `Exited` is sent after its pipes are drained, so its last lines
//!   precede it;
//! - the agent stops its units (SIGTERM, grace, SIGKILL) on stdin EOF, on a signal, and when
//!   the launcher's heartbeats stop (a host whose link went down cleans up by itself);
//! - `Done` is sent only when every unit and every descendant is gone.
//!
//! Pitfall: the units are spawned from the main thread: the parent-death signal fires when
//! the spawning *thread* exits, so a short-lived thread would kill the units early.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use crate::exec::proto::{encode_output, Decoder, ExitStatus, FromAgent, Stream, ToAgent, UnitSpec, MAGIC, PROTOCOL};

/// Grace before SIGKILL until the launcher says otherwise (torchrun's default as well).
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// How long after a unit's process exits its pipes may stay open (a leftover child holding
/// them) before its exit is reported anyway.
const UNIT_DRAIN: Duration = Duration::from_millis(500);
/// How long the agent waits for the last frames to be written before it exits regardless.
const FINAL_FLUSH: Duration = Duration::from_secs(5);
/// A line longer than this is sent in pieces rather than held in memory.
const MAX_LINE: usize = 1 << 20;
/// Read size for unit pipes.
const READ_CHUNK: usize = 64 * 1024;
/// How often the ranks' state files and /proc states are read.
const STATE_POLL: Duration = Duration::from_secs(1);

enum Ctl {
    Msg(ToAgent),
    StdinClosed,
    BadInput(String),
    StdoutBroken,
    Signal(i32),
    Reaped { unit: usize, status: ExitStatus },
    ReaderDone { unit: usize },
}

struct Unit {
    pid: i32,
    reaped: Option<(ExitStatus, Instant)>,
    /// Pipes still open (a reader may finish before the count is set, so it can dip below 0).
    open_streams: i8,
    reported: bool,
}

struct Agent {
    pid: i32,
    out: SyncSender<Vec<u8>>,
    ctl_tx: Sender<Ctl>,
    units: Vec<Unit>,
    started: bool,
    stop_requested: bool,
    kill_at: Option<Instant>,
    grace: Duration,
    heartbeat: Option<(Duration, u32)>,
    next_heartbeat: Instant,
    last_from_launcher: Instant,
    launcher_gone: bool,
    signals: u32,
    finish_deadline: Option<Instant>,
    /// Where the units write their rank state files (`MM_RANK_STATE_DIR`), and when to read
    /// them next.
    state_dir: Option<std::path::PathBuf>,
    next_state_poll: Instant,
    /// The last `Ranks` message sent, to send only changes.
    last_ranks: Vec<u8>,
}

/// Entry point of `launch agent`; returns the process exit code.
pub fn run() -> i32 {
    // Signals are taken by a sigwait thread; block them before any thread exists so every
    // thread inherits the mask (units get a clean mask: std resets it, and so does pre_exec).
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [nix::sys::signal::SIGTERM, nix::sys::signal::SIGINT, nix::sys::signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        eprintln!("launch agent: cannot block signals");
        return 70;
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let pid = std::process::id() as i32;
    let (ctl_tx, ctl_rx) = mpsc::channel::<Ctl>();
    let (out_tx, out_rx) = mpsc::sync_channel::<Vec<u8>>(256);
    let (flushed_tx, flushed_rx) = mpsc::channel::<()>();

    let stdout = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            eprintln!("launch agent: cannot use stdout: {e}");
            return 70;
        }
    };
    let broken_tx = ctl_tx.clone();
    thread::spawn(move || writer(stdout, out_rx, broken_tx, flushed_tx));

    let hostname = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let hello =
        FromAgent::Hello { protocol: PROTOCOL, version: env!("CARGO_PKG_VERSION").into(), pid: pid as u32, hostname };
    let _ = out_tx.send(hello.encode());

    let stdin_tx = ctl_tx.clone();
    thread::spawn(move || stdin_reader(stdin_tx));
    let sig_tx = ctl_tx.clone();
    thread::spawn(move || loop {
        match set.wait() {
            Ok(sig) => {
                if sig_tx.send(Ctl::Signal(sig as i32)).is_err() {
                    return;
                }
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    });

    let now = Instant::now();
    let mut agent = Agent {
        pid,
        out: out_tx,
        ctl_tx,
        units: Vec::new(),
        started: false,
        stop_requested: false,
        kill_at: None,
        grace: DEFAULT_GRACE,
        heartbeat: None,
        next_heartbeat: now,
        last_from_launcher: now,
        launcher_gone: false,
        signals: 0,
        finish_deadline: None,
        state_dir: None,
        next_state_poll: now,
        last_ranks: Vec::new(),
    };
    agent.control_loop(ctl_rx);
    if let Some(dir) = agent.state_dir.take() {
        let _ = std::fs::remove_dir_all(dir);
    }
    // Every unit is gone. Let the writer deliver what is queued, but never hang on a launcher
    // that stopped reading.
    drop(agent);
    let _ = flushed_rx.recv_timeout(FINAL_FLUSH);
    0
}

fn writer(mut stdout: std::fs::File, rx: Receiver<Vec<u8>>, ctl: Sender<Ctl>, flushed: Sender<()>) {
    let mut w = std::io::BufWriter::with_capacity(256 * 1024, &mut stdout);
    let mut ok = w.write_all(MAGIC).and_then(|_| w.flush()).is_ok();
    while let Ok(frame) = rx.recv() {
        if ok {
            ok = w.write_all(&frame).is_ok();
            while ok {
                match rx.try_recv() {
                    Ok(f) => ok = w.write_all(&f).is_ok(),
                    Err(_) => break,
                }
            }
            ok = ok && w.flush().is_ok();
            if !ok {
                let _ = ctl.send(Ctl::StdoutBroken);
            }
        }
    }
    let _ = w.flush();
    let _ = flushed.send(());
}

fn stdin_reader(tx: Sender<Ctl>) {
    let mut stdin = std::io::stdin().lock();
    let mut dec = Decoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send(Ctl::StdinClosed);
                return;
            }
            Ok(n) => {
                dec.push(&buf[..n]);
                loop {
                    match dec.next_to_agent() {
                        Ok(Some(m)) => {
                            if tx.send(Ctl::Msg(m)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(Ctl::BadInput(e.to_string()));
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Reads one pipe and sends whole lines; a partial line waits for its end.
fn pipe_reader(mut pipe: impl Read, unit: u32, stream: Stream, out: SyncSender<Vec<u8>>) {
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut partial: Vec<u8> = Vec::new();
    let mut delivering = true;
    loop {
        let n = match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let data = &chunk[..n];
        match memchr::memrchr(b'\n', data) {
            Some(last) => {
                let mut frame = Vec::with_capacity(16 + partial.len() + last + 1);
                if partial.is_empty() {
                    encode_output(unit, stream, &data[..=last], &mut frame);
                } else {
                    partial.extend_from_slice(&data[..=last]);
                    encode_output(unit, stream, &partial, &mut frame);
                    partial.clear();
                }
                partial.extend_from_slice(&data[last + 1..]);
                // Keep reading after the launcher is gone so the unit never blocks on a full pipe.
                if delivering {
                    delivering = out.send(frame).is_ok();
                }
            }
            None => {
                partial.extend_from_slice(data);
                if partial.len() >= MAX_LINE {
                    let mut frame = Vec::new();
                    encode_output(unit, stream, &partial, &mut frame);
                    partial.clear();
                    if delivering {
                        delivering = out.send(frame).is_ok();
                    }
                }
            }
        }
    }
    if !partial.is_empty() && delivering {
        partial.push(b'\n');
        let mut frame = Vec::new();
        encode_output(unit, stream, &partial, &mut frame);
        let _ = out.send(frame);
    }
}

impl Agent {
    fn send(&self, msg: FromAgent) {
        let _ = self.out.send(msg.encode());
    }

    fn warn(&self, message: String) {
        self.send(FromAgent::Warning { message });
    }

    fn control_loop(&mut self, rx: Receiver<Ctl>) {
        loop {
            let now = Instant::now();
            let timeout =
                self.next_deadline().map(|d| d.saturating_duration_since(now)).unwrap_or(Duration::from_secs(3600));
            let got = rx.recv_timeout(timeout);
            // Back far later than asked: the agent itself did not run (SIGSTOP, a starved
            // host). The launcher's silence is not the launcher's then: its heartbeats wait
            // unread in stdin. A fresh budget lets them arrive.
            if Instant::now().saturating_duration_since(now + timeout) > Duration::from_secs(1) {
                eprintln!("launch agent: the agent did not run for a while; the launcher's budget restarts");
                self.last_from_launcher = Instant::now();
            }
            match got {
                Ok(ctl) => self.handle(ctl),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.on_time();
            if self.finished() {
                return;
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut ds: Vec<Instant> = Vec::new();
        if let (Some((interval, miss)), false) = (self.heartbeat, self.launcher_gone) {
            ds.push(self.next_heartbeat);
            if miss > 0 {
                ds.push(self.last_from_launcher + interval * (miss + 1));
            }
        }
        ds.extend(self.kill_at);
        if self.state_dir.is_some() {
            ds.push(self.next_state_poll);
        }
        if let Some(d) = self.finish_deadline {
            // Re-check soon: killed leftovers vanish within milliseconds.
            ds.push(d.min(Instant::now() + Duration::from_millis(50)));
        }
        ds.extend(self.units.iter().filter(|u| !u.reported).filter_map(|u| u.reaped.map(|(_, t)| t + UNIT_DRAIN)));
        ds.into_iter().min()
    }

    fn handle(&mut self, ctl: Ctl) {
        match ctl {
            Ctl::Msg(m) => {
                self.last_from_launcher = Instant::now();
                self.on_message(m);
            }
            Ctl::StdinClosed | Ctl::StdoutBroken => self.launcher_lost(),
            Ctl::BadInput(e) => {
                eprintln!("launch agent: bad input from the launcher: {e}");
                self.launcher_lost();
            }
            Ctl::Signal(sig) => {
                self.signals += 1;
                let name = crate::exec::proto::signal_name(sig);
                // As a Slurm step, a signal is Slurm's: scancel, the time limit, preemption.
                let slurm_step = std::env::var_os(crate::exec::proto::SLURM_STEP_MARK).is_some();
                let reason = match std::env::var("SLURM_STEP_ID") {
                    Ok(step) if slurm_step && !step.is_empty() => format!(
                        "Slurm sent {name} to the agent's step {}.{step} (scancel, the job's time limit or \
                         preemption); stopping its ranks",
                        std::env::var("SLURM_JOB_ID").unwrap_or_default()
                    ),
                    _ => format!("the agent received {name}; stopping its ranks"),
                };
                self.send(FromAgent::StoppingRanks { reason });
                if self.signals == 1 {
                    self.begin_stop(self.grace);
                } else {
                    self.kill_now();
                }
            }
            Ctl::Reaped { unit, status } => {
                if let Some(u) = self.units.get_mut(unit) {
                    u.reaped = Some((status, Instant::now()));
                }
            }
            Ctl::ReaderDone { unit } => {
                if let Some(u) = self.units.get_mut(unit) {
                    u.open_streams -= 1;
                }
            }
        }
    }

    fn on_message(&mut self, m: ToAgent) {
        match m {
            ToAgent::Init { heartbeat_ms, miss } => {
                // miss 0: send heartbeats, but never stop on the launcher's silence.
                self.heartbeat = (heartbeat_ms > 0).then(|| (Duration::from_millis(heartbeat_ms), miss));
                self.next_heartbeat = Instant::now();
            }
            ToAgent::PickPort => match std::net::TcpListener::bind(("0.0.0.0", 0)).and_then(|l| l.local_addr()) {
                Ok(addr) => self.send(FromAgent::Port { port: addr.port() }),
                Err(e) => self.send(FromAgent::PortFailed { message: e.to_string() }),
            },
            ToAgent::Start { grace_ms, units } => {
                self.grace = Duration::from_millis(grace_ms);
                if self.started || self.stop_requested {
                    return;
                }
                self.started = true;
                self.state_dir = make_state_dir(self.pid);
                for (i, spec) in units.iter().enumerate() {
                    let mut spec = spec.clone();
                    if let Some(dir) = &self.state_dir {
                        spec.env.insert(mm_spec::flight::STATE_DIR_ENV.into(), dir.display().to_string());
                    }
                    self.spawn(i, &spec);
                }
            }
            ToAgent::Stop { grace_ms } => self.begin_stop(Duration::from_millis(grace_ms)),
            ToAgent::Kill => self.kill_now(),
            ToAgent::Heartbeat => {}
        }
    }

    /// Starts a unit from the control (main) thread: the parent-death signal is tied to the
    /// spawning thread, and this one lives as long as the agent. A waiter thread per unit
    /// reaps it; reader threads drain its pipes.
    fn spawn(&mut self, index: usize, spec: &UnitSpec) {
        self.units.push(Unit { pid: 0, reaped: None, open_streams: 0, reported: false });
        let mut cmd = unit_command(spec, self.pid);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return self.on_spawn_error(index, format!("cannot start bash: {e}")),
        };
        let pid = child.id() as i32;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let mut streams = 0;
        for (pipe, stream) in [
            (stdout.map(|p| Box::new(p) as Box<dyn Read + Send>), Stream::Stdout),
            (stderr.map(|p| Box::new(p) as Box<dyn Read + Send>), Stream::Stderr),
        ] {
            if let Some(pipe) = pipe {
                streams += 1;
                let (out, ctl) = (self.out.clone(), self.ctl_tx.clone());
                thread::spawn(move || {
                    pipe_reader(pipe, index as u32, stream, out);
                    let _ = ctl.send(Ctl::ReaderDone { unit: index });
                });
            }
        }
        let ctl = self.ctl_tx.clone();
        thread::spawn(move || {
            let status = match child.wait() {
                Ok(s) => ExitStatus::from(s),
                Err(_) => ExitStatus { code: None, signal: None },
            };
            let _ = ctl.send(Ctl::Reaped { unit: index, status });
        });
        if let Some(u) = self.units.get_mut(index) {
            u.pid = pid;
            u.open_streams += streams;
        }
        self.send(FromAgent::Started { unit: index as u32, pid: pid as u32 });
    }

    fn on_spawn_error(&mut self, unit: usize, message: String) {
        if let Some(u) = self.units.get_mut(unit) {
            u.reaped = Some((ExitStatus::code(127), Instant::now()));
            u.reported = true;
        }
        self.send(FromAgent::SpawnFailed { unit: unit as u32, message });
    }

    fn launcher_lost(&mut self) {
        if !self.launcher_gone {
            self.launcher_gone = true;
            self.begin_stop(self.grace);
        }
    }

    fn begin_stop(&mut self, grace: Duration) {
        self.stop_requested = true;
        let at = Instant::now() + grace;
        self.kill_at = Some(self.kill_at.map_or(at, |k| k.min(at)));
        self.signal_all(libc::SIGTERM);
    }

    fn kill_now(&mut self) {
        self.stop_requested = true;
        self.kill_at = Some(Instant::now());
        self.on_time();
    }

    /// The signal to every unit's process group and to every other descendant. SIGTERM is
    /// followed by SIGCONT: a stopped process (SIGSTOP, Ctrl-Z) only acts on SIGTERM once it
    /// runs, and would otherwise waste the whole grace period.
    fn signal_all(&self, sig: i32) {
        let sigs: &[i32] = if sig == libc::SIGTERM { &[libc::SIGTERM, libc::SIGCONT] } else { &[sig] };
        for &sig in sigs {
            for u in self.units.iter().filter(|u| u.pid > 0 && u.reaped.is_none()) {
                // SAFETY: plain syscall; a vanished group gives ESRCH, which is fine.
                unsafe {
                    libc::kill(-u.pid, sig);
                }
            }
            for pid in descendants(self.pid) {
                // SAFETY: as above.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
        }
    }

    /// Reads the ranks' state files and the /proc states of their processes and sends them
    /// when anything changed since the last time.
    fn report_ranks(&mut self) {
        let Some(dir) = &self.state_dir else { return };
        let mut ranks = read_rank_states(dir);
        ranks.sort_by_key(|r| r.state.rank);
        let units: Vec<(u32, char)> = self
            .units
            .iter()
            .enumerate()
            .filter(|(_, u)| u.pid > 0 && u.reaped.is_none())
            .filter_map(|(i, u)| proc_state(u.pid).map(|s| (i as u32, s)))
            .collect();
        let msg = FromAgent::Ranks { ranks, units };
        let bytes = msg.encode();
        if bytes != self.last_ranks {
            let _ = self.out.send(bytes.clone());
            self.last_ranks = bytes;
        }
    }

    fn on_time(&mut self) {
        let now = Instant::now();
        if let Some((interval, miss)) = self.heartbeat {
            if !self.launcher_gone {
                if now >= self.next_heartbeat {
                    self.send(FromAgent::Heartbeat);
                    self.next_heartbeat = now + interval;
                }
                if miss > 0 && now >= self.last_from_launcher + interval * (miss + 1) {
                    let reason = format!(
                        "no word from the launcher for {:.1}s (its heartbeat is every {:.1}s); the agent stopped the \
                         ranks",
                        (now - self.last_from_launcher).as_secs_f64(),
                        interval.as_secs_f64()
                    );
                    eprintln!("launch agent: {reason}");
                    self.send(FromAgent::StoppingRanks { reason });
                    self.launcher_lost();
                }
            }
        }
        if self.state_dir.is_some() && now >= self.next_state_poll {
            self.next_state_poll = now + STATE_POLL;
            self.report_ranks();
        }
        if let Some(at) = self.kill_at {
            if now >= at {
                self.signal_all(libc::SIGKILL);
                // Keep killing until everything is gone (a process may fork while dying).
                self.kill_at = Some(now + Duration::from_millis(200));
            }
        }
        for i in 0..self.units.len() {
            let u = &self.units[i];
            if let (false, Some((status, at))) = (u.reported, u.reaped) {
                if u.open_streams <= 0 || now >= at + UNIT_DRAIN {
                    self.units[i].reported = true;
                    self.send(FromAgent::Exited { unit: i as u32, status });
                }
            }
        }
    }

    fn finished(&mut self) -> bool {
        if !self.started {
            // Nothing runs: leave once the launcher is gone or asked for a stop.
            if self.launcher_gone || self.stop_requested {
                self.send(FromAgent::Done);
                return true;
            }
            return false;
        }
        if !self.units.iter().all(|u| u.reported) {
            return false;
        }
        // Every unit's main process is gone; nothing it started may outlive it.
        let left = descendants(self.pid);
        if !left.is_empty() {
            let deadline = *self.finish_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
            for &pid in &left {
                // SAFETY: plain syscall.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            reap_strays();
            if Instant::now() < deadline {
                return false;
            }
            self.warn(format!("processes {left:?} could not be killed"));
        }
        reap_strays();
        self.send(FromAgent::Done);
        true
    }
}

/// A private folder for this agent's rank state files: `$TMPDIR/mm-launch-<agent pid>-<time>`,
/// mode 0700, created new (never an existing path). None when it cannot be made (the ranks
/// then run without a watchdog's view).
fn make_state_dir(agent_pid: i32) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let dir = std::env::temp_dir().join(format!("mm-launch-{agent_pid}-{:x}", nanos as u64));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            eprintln!("launch agent: cannot create {}: {e}; the stall watchdog sees no rank state", dir.display());
            None
        }
    }
}

/// Every `rank-R.json` in `dir` that parses, with the /proc state of its process.
fn read_rank_states(dir: &std::path::Path) -> Vec<crate::exec::proto::RankReport> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().and_then(mm_spec::flight::rank_of_state_file).is_some())
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<mm_spec::flight::RankState>(&b).ok())
        .map(|state| crate::exec::proto::RankReport { proc_state: proc_state(state.pid as i32), state })
        .collect()
}

/// The state letter of /proc/<pid>/stat (R, S, D, T, Z, …).
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat).map(|f| f.state)
}

/// The fields of a /proc/<pid>/stat line the launcher reads.
#[derive(Debug, PartialEq)]
pub struct StatFields<'a> {
    pub comm: &'a str,
    pub state: char,
    pub ppid: i32,
    /// When the process started, in clock ticks since boot (field 22): with the pid, it names
    /// one process for good (pids are reused).
    pub start: u64,
}

/// Parses `pid (comm) state ppid …`; comm may hold spaces and parentheses.
pub fn stat_fields(stat: &str) -> Option<StatFields<'_>> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied().unwrap_or("");
    Some(StatFields {
        comm: stat.get(open + 1..close)?,
        state: rest.first()?.chars().next()?,
        ppid: field(4).parse().unwrap_or(0),
        start: field(22).parse().unwrap_or(0),
    })
}

/// The start time (see [`StatFields::start`]) of process `pid`, if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat).map(|f| f.start)
}

/// `bash -c SCRIPT` for a unit: its own session and process group, a clean signal mask,
/// SIGKILL when its spawning thread (and so the agent) dies, stdin from /dev/null.
fn unit_command(spec: &UnitSpec, parent: i32) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(&spec.script).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // The SSH login shell `exec`ed the agent, which lowers SHLVL to 0; a bash that sees
    // SHLVL 0 and SSH_CLIENT believes sshd started it and sources ~/.bashrc again — in
    // every rank (slow, and a heavy .bashrc serializes on its own locks). Ranks are
    // children of the login shell's environment, not new logins.
    if std::env::var("SHLVL").ok().and_then(|v| v.parse::<i32>().ok()).unwrap_or(0) < 1 {
        cmd.env("SHLVL", "1");
    }
    cmd.envs(&spec.env);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        });
    }
    cmd
}

/// Reaps zombies the agent inherited as subreaper. Only called once every unit was reaped
/// by its waiter thread, so no status is stolen from them.
fn reap_strays() {
    loop {
        // SAFETY: plain syscall with a null status pointer.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            return;
        }
    }
}

/// Every live (non-zombie) descendant of `root`, from /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(f) = stat_fields(&stat) else { continue };
        if f.state != 'Z' && f.state != 'X' {
            children.entry(f.ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_reader_sends_whole_lines_only() {
        let input: &[u8] = b"one\ntw";
        let (tx, rx) = mpsc::sync_channel(16);
        // A reader that returns the bytes in awkward pieces.
        struct Pieces(Vec<Vec<u8>>);
        impl Read for Pieces {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                let p = self.0.remove(0);
                buf[..p.len()].copy_from_slice(&p);
                Ok(p.len())
            }
        }
        let pieces = Pieces(vec![input.to_vec(), b"o\nthr".to_vec(), b"ee".to_vec()]);
        pipe_reader(pieces, 2, Stream::Stdout, tx);
        let mut dec = Decoder::default();
        let mut lines = Vec::new();
        while let Ok(f) = rx.try_recv() {
            dec.push(&f);
            while let Some(FromAgent::Output { unit, data, .. }) = dec.next_from_agent().unwrap() {
                assert_eq!(unit, 2);
                assert_eq!(data.last(), Some(&b'\n'), "frames end at a line end");
                lines.push(String::from_utf8(data).unwrap());
            }
        }
        assert_eq!(lines.concat(), "one\ntwo\nthree\n");
    }

    #[test]
    fn descendants_finds_grandchildren() {
        let mut child = Command::new("bash").arg("-c").arg("sleep 30 & sleep 30 & wait").spawn().unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut found = Vec::new();
        while Instant::now() < deadline {
            found = descendants(pid);
            if found.len() >= 2 {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        assert!(descendants(std::process::id() as i32).contains(&pid));
        assert_eq!(found.len(), 2, "the two sleeps: {found:?}");
        for p in found.iter().chain([&pid]) {
            unsafe {
                libc::kill(*p, libc::SIGKILL);
            }
        }
        let _ = child.wait();
    }
}
