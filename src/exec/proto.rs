//! The wire protocol between the launcher and a node agent (`launch agent`).
//!
//! ```text
//! agent stdout:  MAGIC line, then frames        launcher → agent stdin: frames
//! frame:         kind u8 | len u32 LE | payload
//!   kind 1  control: one JSON object (ToAgent or FromAgent, tagged by "t")
//!   kind 2  output:  unit u32 LE | stream u8 | bytes (complete lines only)
//! ```
//!
//! Control messages are rare and typed (serde); rank output is the hot path and stays binary,
//! so a chunk of lines crosses the wire with one header and no escaping. The agent only ever
//! sends whole lines (it holds a partial line until its newline or the end of the stream), so
//! the launcher can write chunks as they come and never cuts or interleaves a line.
//!
//! Pitfall: the magic line comes first so that a login script printing noise, or the
//! "agent missing" marker of the SSH bootstrap command, is told apart from a frame.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Set in the environment of an agent started as a Slurm step (exec::local): its signals are
/// Slurm's (scancel, the time limit, preemption), which it says when it stops its ranks.
pub const SLURM_STEP_MARK: &str = "MM_LAUNCH_SLURM_STEP";

/// First bytes an agent writes on stdout.
pub const MAGIC: &[u8] = b"@@mm-agent 1\n";
/// What the SSH bootstrap command prints instead when the agent binary is not on the host.
pub const MISSING_MARKER: &[u8] = b"@@mm-agent-missing\n";
/// Protocol revision carried in Hello; bumped on incompatible changes.
pub const PROTOCOL: u32 = 2;

const KIND_CONTROL: u8 = 1;
const KIND_OUTPUT: u8 = 2;
const HEADER: usize = 5;
/// No frame is larger than this; a bigger length means a corrupt stream.
pub const MAX_FRAME: usize = 64 << 20;

/// Which pipe of a unit a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn code(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }

    fn from_code(c: u8) -> Option<Stream> {
        match c {
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// How a process ended: an exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    pub fn code(code: i32) -> ExitStatus {
        ExitStatus { code: Some(code), signal: None }
    }

    pub fn signal(signal: i32) -> ExitStatus {
        ExitStatus { code: None, signal: Some(signal) }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The shell convention: the code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }

    /// "exit code 3", "signal SIGKILL (9)".
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(s)) => format!("signal {} ({s})", signal_name(s)),
            (None, None) => "an unknown status".into(),
        }
    }
}

impl From<std::process::ExitStatus> for ExitStatus {
    fn from(s: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus { code: s.code(), signal: s.signal() }
    }
}

/// SIGTERM, SIGKILL, … ("signal 77" for numbers without a name).
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("signal {sig}"))
}

/// One process the agent starts: `bash -c script` with `env` added to the agent's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitSpec {
    pub env: BTreeMap<String, String>,
    pub script: String,
}

/// One rank's state file as its agent read it, with the /proc state of the rank's process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankReport {
    pub proc_state: Option<char>,
    pub state: mm_spec::flight::RankState,
}

/// Launcher → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ToAgent {
    /// First message: heartbeat period (0: none) and how many of the launcher's may be
    /// missed before the agent treats it as gone and stops its units (0: never).
    Init {
        heartbeat_ms: u64,
        miss: u32,
    },
    /// Find a free TCP port on this host (MASTER_PORT 0).
    PickPort,
    /// Start these units; `grace_ms` is the stop grace the agent uses on its own (stdin EOF,
    /// lost launcher, a signal to the agent).
    Start {
        grace_ms: u64,
        units: Vec<UnitSpec>,
    },
    /// Orderly stop: SIGTERM to every unit's process group, SIGKILL after the grace period.
    Stop {
        grace_ms: u64,
    },
    /// SIGKILL every unit's process group now.
    Kill,
    Heartbeat,
}

/// Agent → launcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum FromAgent {
    Hello {
        protocol: u32,
        version: String,
        pid: u32,
        hostname: String,
    },
    Port {
        port: u16,
    },
    PortFailed {
        message: String,
    },
    Started {
        unit: u32,
        pid: u32,
    },
    SpawnFailed {
        unit: u32,
        message: String,
    },
    Exited {
        unit: u32,
        status: ExitStatus,
    },
    /// Complete lines of one unit's stdout or stderr (binary frame, never JSON).
    #[serde(skip)]
    Output {
        unit: u32,
        stream: Stream,
        data: Vec<u8>,
    },
    Heartbeat,
    /// What the ranks on this host are doing (their state files and /proc states), sent
    /// when it changed: the launcher's stall watchdog reads it.
    Ranks {
        ranks: Vec<RankReport>,
        /// Each running unit's main process: (unit, /proc state letter).
        units: Vec<(u32, char)>,
    },
    /// The agent stopped its units on its own (the launcher fell silent, the agent got a
    /// signal), sent before it signals them: a launcher that wakes up reads this first.
    StoppingRanks {
        reason: String,
    },
    /// Something the user should know (a process outlived its group, a pipe never closed).
    Warning {
        message: String,
    },
    /// Every unit has exited and all output was sent; the agent exits next.
    Done,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtoError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("bad control message: {0}")]
    Json(String),
    #[error("bad output frame")]
    Output,
}

fn header(out: &mut Vec<u8>, kind: u8, len: usize) {
    out.push(kind);
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

fn control<T: Serialize>(msg: &T, out: &mut Vec<u8>) {
    // Serializing these enums cannot fail: strings, integers and string maps only.
    let json = serde_json::to_vec(msg).unwrap_or_default();
    header(out, KIND_CONTROL, json.len());
    out.extend_from_slice(&json);
}

impl ToAgent {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        control(self, &mut out);
        out
    }
}

impl FromAgent {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            FromAgent::Output { unit, stream, data } => encode_output(*unit, *stream, data, out),
            other => control(other, out),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// An output frame without building a `FromAgent` first (the agent's hot path).
pub fn encode_output(unit: u32, stream: Stream, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER + 5 + data.len());
    header(out, KIND_OUTPUT, 5 + data.len());
    out.extend_from_slice(&unit.to_le_bytes());
    out.push(stream.code());
    out.extend_from_slice(data);
}

/// Incremental frame decoder: push bytes as they arrive, pop whole frames.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

/// A decoded frame: control JSON (not yet parsed into a direction's type) or output.
pub enum Frame {
    Control(Vec<u8>),
    Output { unit: u32, stream: Stream, data: Vec<u8> },
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER {
            self.compact();
            return Ok(None);
        }
        let kind = avail[0];
        let len = u32::from_le_bytes([avail[1], avail[2], avail[3], avail[4]]) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::TooLarge(len));
        }
        if avail.len() < HEADER + len {
            self.compact();
            return Ok(None);
        }
        let payload = &avail[HEADER..HEADER + len];
        let frame = match kind {
            KIND_CONTROL => Frame::Control(payload.to_vec()),
            KIND_OUTPUT => {
                if payload.len() < 5 {
                    return Err(ProtoError::Output);
                }
                let unit = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let stream = Stream::from_code(payload[4]).ok_or(ProtoError::Output)?;
                Frame::Output { unit, stream, data: payload[5..].to_vec() }
            }
            k => return Err(ProtoError::Kind(k)),
        };
        self.start += HEADER + len;
        Ok(Some(frame))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    pub fn next_from_agent(&mut self) -> Result<Option<FromAgent>, ProtoError> {
        Ok(match self.next_frame()? {
            None => None,
            Some(Frame::Output { unit, stream, data }) => Some(FromAgent::Output { unit, stream, data }),
            Some(Frame::Control(json)) => {
                Some(serde_json::from_slice(&json).map_err(|e| ProtoError::Json(e.to_string()))?)
            }
        })
    }

    pub fn next_to_agent(&mut self) -> Result<Option<ToAgent>, ProtoError> {
        Ok(match self.next_frame()? {
            None => None,
            Some(Frame::Output { .. }) => return Err(ProtoError::Kind(KIND_OUTPUT)),
            Some(Frame::Control(json)) => {
                Some(serde_json::from_slice(&json).map_err(|e| ProtoError::Json(e.to_string()))?)
            }
        })
    }
}

/// Splits the bytes before the magic line from the stream. Returns `Ok(Some(rest))` once the
/// magic was seen (rest: bytes after it), `Ok(None)` while more bytes are needed, and
/// `Err(text)` when what arrived cannot be an agent (text: what the host printed instead).
pub fn strip_magic(seen: &[u8]) -> Result<Option<&[u8]>, String> {
    let n = seen.len().min(MAGIC.len());
    if seen[..n] == MAGIC[..n] {
        return Ok((seen.len() >= MAGIC.len()).then(|| &seen[MAGIC.len()..]));
    }
    let m = seen.len().min(MISSING_MARKER.len());
    if seen[..m] == MISSING_MARKER[..m] {
        return if seen.len() >= MISSING_MARKER.len() { Err("missing".into()) } else { Ok(None) };
    }
    Err(String::from_utf8_lossy(&seen[..seen.len().min(400)]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_any_split() {
        let msgs = vec![
            FromAgent::Hello { protocol: PROTOCOL, version: "0.1.0".into(), pid: 7, hostname: "h".into() },
            FromAgent::Output { unit: 3, stream: Stream::Stderr, data: b"a\nb\n".to_vec() },
            FromAgent::Exited { unit: 3, status: ExitStatus::signal(15) },
            FromAgent::Output { unit: 0, stream: Stream::Stdout, data: Vec::new() },
            FromAgent::Done,
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            m.encode_into(&mut bytes);
        }
        for chunk in [1, 2, 3, 7, 64, bytes.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                d.push(piece);
                while let Some(m) = d.next_from_agent().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "chunk {chunk}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn to_agent_round_trips() {
        let mut env = BTreeMap::new();
        env.insert("X".to_string(), "$(touch /tmp/pwned)\n'\"".to_string());
        let m = ToAgent::Start { grace_ms: 5, units: vec![UnitSpec { env, script: "echo hi".into() }] };
        let mut d = Decoder::default();
        d.push(&m.encode());
        assert_eq!(d.next_to_agent().unwrap(), Some(m));
    }

    #[test]
    fn corrupt_streams_are_errors_not_panics() {
        let mut d = Decoder::default();
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.next_frame().err(), Some(ProtoError::Kind(9)));
        let mut d = Decoder::default();
        d.push(&[1, 255, 255, 255, 255]);
        assert!(matches!(d.next_frame(), Err(ProtoError::TooLarge(_))));
        let mut d = Decoder::default();
        d.push(&[1, 2, 0, 0, 0, b'{', b'x']);
        assert!(matches!(d.next_from_agent(), Err(ProtoError::Json(_))));
        let mut d = Decoder::default();
        d.push(&[2, 1, 0, 0, 0, 0]);
        assert_eq!(d.next_frame().err(), Some(ProtoError::Output));
    }

    #[test]
    fn magic_detection() {
        assert_eq!(strip_magic(b"@@mm-ag"), Ok(None));
        assert_eq!(strip_magic(b"@@mm-agent 1\nrest"), Ok(Some(&b"rest"[..])));
        assert_eq!(strip_magic(b"@@mm-agent-missing\n"), Err("missing".into()));
        assert_eq!(strip_magic(b"@@mm-agent-mi"), Ok(None));
        assert_eq!(strip_magic(b"Welcome to host\n"), Err("Welcome to host\n".into()));
    }

    #[test]
    fn exit_status_descriptions() {
        assert_eq!(ExitStatus::code(3).shell_code(), 3);
        assert_eq!(ExitStatus::signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::signal(15).describe(), "signal SIGTERM (15)");
        assert_eq!(ExitStatus::code(0).describe(), "exit code 0");
        assert!(ExitStatus::code(0).success() && !ExitStatus::signal(2).success());
    }
}
