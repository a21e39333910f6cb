//! Launch events: what the dispatcher tells the reporters (run directory, console, progress).
//! Reporters only consume events; they never touch processes or connections.
//!
//! Output arrives as chunks of whole lines of one unit's stream, already split by rank for
//! units that host several ranks (torchrun's `[defaultN]:` tags, removed), and with secret
//! values scrubbed.

use std::time::Duration;

use mm_spec::ProgressEvent;

use crate::exec::proto::{ExitStatus, Stream};
use crate::render::Rendered;

/// One host of the run as the reporters name it.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub name: String,
    pub address: String,
    pub ranks: Vec<usize>,
}

#[derive(Debug)]
pub enum LaunchEvent<'a> {
    /// A new attempt begins (0 first; restarts count up).
    AttemptStarting {
        attempt: u32,
        max_restarts: u32,
    },
    Connected {
        node: usize,
        elapsed: Duration,
    },
    /// Every host answered; the exact units about to start (secrets included: reporters must
    /// redact what they write).
    Launching {
        rendered: &'a Rendered,
        master_port: u16,
        elapsed: Duration,
    },
    UnitStarted {
        node: usize,
        unit: usize,
        pid: u32,
    },
    AllStarted {
        elapsed: Duration,
    },
    /// Whole lines of one rank's stream, or of a multi-rank unit's own lines (`rank` None).
    Output {
        node: usize,
        unit: usize,
        rank: Option<usize>,
        stream: Stream,
        data: &'a [u8],
    },
    /// A progress event in the `Output` just before it (a logged iteration, a checkpoint, the
    /// end), parsed once by the dispatcher in the template's format ([`ProgressSource`]).
    ///
    /// [`ProgressSource`]: crate::progress::ProgressSource
    Progress {
        node: usize,
        rank: Option<usize>,
        event: &'a ProgressEvent,
    },
    /// A unit ended. `stopped`: it ended during a stop the launcher ordered.
    UnitExited {
        node: usize,
        unit: usize,
        status: ExitStatus,
        stopped: bool,
    },
    /// A line of launcher news worth keeping in the aggregated log (node: which host, if any).
    Notice {
        node: Option<usize>,
        message: String,
        warning: bool,
    },
    HostLost {
        node: usize,
        reason: String,
    },
    Stopping {
        reason: String,
        grace: Duration,
    },
    AttemptFinished {
        attempt: u32,
        summary: String,
    },
}

pub trait Reporter {
    fn event(&mut self, ev: &LaunchEvent<'_>);
    /// Called a few times a second: flush what followers (`launch logs -f`) should see.
    fn tick(&mut self) {}
    /// The attempt is over: write everything out.
    fn flush(&mut self) {}
}

/// Fans an event out to every reporter.
#[derive(Default)]
pub struct Reporters(pub Vec<Box<dyn Reporter + Send>>);

impl Reporter for Reporters {
    fn event(&mut self, ev: &LaunchEvent<'_>) {
        for r in &mut self.0 {
            r.event(ev);
        }
    }
    fn tick(&mut self) {
        for r in &mut self.0 {
            r.tick();
        }
    }
    fn flush(&mut self) {
        for r in &mut self.0 {
            r.flush();
        }
    }
}

/// Which rank a line of a multi-rank unit belongs to, from torchrun's `[defaultN]:` (local
/// rank N) or `[rankN]:` (global rank N) prefix. `ranks`: the unit's global ranks in local
/// order.
pub fn line_rank(line: &[u8], ranks: &[usize]) -> Option<usize> {
    line_tag(line, ranks).map(|(rank, _)| rank)
}

/// [`line_rank`] and the length of the tag.
fn line_tag(line: &[u8], ranks: &[usize]) -> Option<(usize, usize)> {
    let rest = line.strip_prefix(b"[")?;
    let (is_global, digits) = if let Some(d) = rest.strip_prefix(b"default") {
        (false, d)
    } else if let Some(d) = rest.strip_prefix(b"rank") {
        (true, d)
    } else {
        return None;
    };
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    if end == 0 || !digits[end..].starts_with(b"]:") {
        return None;
    }
    let n: usize = std::str::from_utf8(&digits[..end]).ok()?.parse().ok()?;
    let rank = if is_global { ranks.contains(&n).then_some(n) } else { ranks.get(n).copied() }?;
    Some((rank, line.len() - digits.len() + end + 2))
}

/// Splits a chunk of whole lines of a multi-rank unit into runs of consecutive lines with
/// the same rank (None: no rank prefix), each line without its rank tag: the rank's log and
/// `[host rN]` say whose it is.
pub fn split_by_rank(data: &[u8], ranks: &[usize]) -> Vec<(Option<usize>, Vec<u8>)> {
    let mut out: Vec<(Option<usize>, Vec<u8>)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let end = memchr::memchr(b'\n', &data[pos..]).map(|i| pos + i + 1).unwrap_or(data.len());
        let line = &data[pos..end];
        let (rank, text) = match line_tag(line, ranks) {
            Some((rank, tag)) => (Some(rank), &line[tag..]),
            None => (None, line),
        };
        match out.last_mut() {
            Some((r, run)) if *r == rank => run.extend_from_slice(text),
            _ => out.push((rank, text.to_vec())),
        }
        pos = end;
    }
    out
}

/// Replaces every secret value in `data` (values of TOKEN/KEY/SECRET/PASSWORD variables) by
/// `<redacted>`. Borrowed when nothing matched (the common case costs one search per secret).
pub struct Scrubber {
    finders: Vec<(memchr::memmem::Finder<'static>, usize)>,
}

impl Scrubber {
    /// Values shorter than 4 bytes are not scrubbed: they would mangle ordinary text.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Scrubber {
        let mut values: Vec<String> = secrets.into_iter().filter(|v| v.len() >= 4).map(str::to_string).collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Scrubber {
            finders: values
                .into_iter()
                .map(|v| {
                    let len = v.len();
                    (memchr::memmem::Finder::new(v.as_bytes()).into_owned(), len)
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.finders.is_empty()
    }

    pub fn scrub<'a>(&self, data: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let mut cur: std::borrow::Cow<'a, [u8]> = std::borrow::Cow::Borrowed(data);
        for (f, len) in &self.finders {
            if f.find(&cur).is_none() {
                continue;
            }
            let mut out = Vec::with_capacity(cur.len());
            let mut last = 0;
            for i in f.find_iter(&cur) {
                if i < last {
                    continue;
                }
                out.extend_from_slice(&cur[last..i]);
                out.extend_from_slice(b"<redacted>");
                last = i + len;
            }
            out.extend_from_slice(&cur[last..]);
            cur = std::borrow::Cow::Owned(out);
        }
        cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchrun_prefixes_map_to_ranks() {
        let ranks = [8, 9, 10, 11];
        assert_eq!(line_rank(b"[default0]:hello\n", &ranks), Some(8));
        assert_eq!(line_rank(b"[default3]:x", &ranks), Some(11));
        assert_eq!(line_rank(b"[default4]:x", &ranks), None);
        assert_eq!(line_rank(b"[rank10]:x", &ranks), Some(10));
        assert_eq!(line_rank(b"[rank1]:x", &ranks), None);
        assert_eq!(line_rank(b"[default]:x", &ranks), None);
        assert_eq!(line_rank(b"[default1] x", &ranks), None);
        assert_eq!(line_rank(b"plain", &ranks), None);
    }

    #[test]
    fn chunks_split_into_rank_runs() {
        let data = b"[default0]:a\n[default0]:b\n[default1]:c\nplain\n[default0]:d\n[rank1]: e";
        let runs = split_by_rank(data, &[0, 1]);
        let got: Vec<(Option<usize>, &str)> = runs.iter().map(|(r, d)| (*r, std::str::from_utf8(d).unwrap())).collect();
        assert_eq!(
            got,
            vec![(Some(0), "a\nb\n"), (Some(1), "c\n"), (None, "plain\n"), (Some(0), "d\n"), (Some(1), " e")]
        );
        assert!(split_by_rank(b"", &[0]).is_empty());
    }

    #[test]
    fn secrets_are_scrubbed() {
        let s = Scrubber::new(["hunter2-secret", "abc", "tok-123"]);
        assert_eq!(&*s.scrub(b"pw=hunter2-secret and tok-123 tok-123\n"), b"pw=<redacted> and <redacted> <redacted>\n");
        assert!(matches!(s.scrub(b"nothing here abc\n"), std::borrow::Cow::Borrowed(_)), "short values are kept");
        assert!(Scrubber::new(["ab"]).is_empty());
    }
}
