//! Host lists from schedulers and launchers: Slurm hostlist expressions and DeepSpeed hostfiles.
//!
//! - [`expand`] turns `node[01-04,07],gpu-a[1-2]-ib,login` into one name per host, as Slurm's
//!   `scontrol show hostnames` does: zero padding is kept (the width of a range's first bound),
//!   several bracket groups in one name expand as a cartesian product with the first group
//!   outermost, commas (or whitespace) outside brackets separate names.
//! - [`parse_hostfile`] reads DeepSpeed's `host slots=N` lines, with `#` comments and blank lines,
//!   and reports every bad line with its line and column.
//!
//! Pitfall: a hostlist comes from the environment, so it is user input: a huge range such as
//! `node[0-99999999]` is refused before anything is allocated ([`MAX_HOSTS`]).

use std::collections::HashMap;
use std::path::Path;

use crate::diag::ConfigError;
use crate::input;

/// The most hosts one expression may expand to; far above any real allocation, low enough that
/// a typo cannot exhaust memory.
pub const MAX_HOSTS: usize = 100_000;

/// Why a Slurm hostlist expression could not be expanded. Columns count characters from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostlistError {
    #[error("the host list is empty")]
    Empty,
    #[error("unbalanced `[` at column {column}: no matching `]`")]
    UnclosedBracket { column: usize },
    #[error("unbalanced `]` at column {column}: no matching `[` before it")]
    UnopenedBracket { column: usize },
    #[error("nested `[` at column {column}: brackets cannot contain brackets")]
    NestedBracket { column: usize },
    #[error("empty host name at column {column}")]
    EmptyName { column: usize },
    #[error("bad range `{range}` at column {column}: {reason}")]
    BadRange { range: String, column: usize, reason: String },
    #[error("`{expression}` expands to more than {limit} hosts")]
    TooMany { expression: String, limit: usize },
}

/// One `[..]` group or a literal run of characters inside a host name.
enum Part {
    Literal(String),
    /// Each alternative, already formatted with its zero padding.
    Choices(Vec<String>),
}

/// Expands a Slurm hostlist expression (`SLURM_JOB_NODELIST`) into host names, in Slurm's order.
/// Duplicates are kept; deciding whether they are an error is the caller's business.
pub fn expand(expression: &str) -> Result<Vec<String>, HostlistError> {
    let mut hosts = Vec::new();
    for (start, name) in split_names(expression)? {
        let parts = parse_name(name, start)?;
        let count = parts.iter().try_fold(1usize, |acc, part| match part {
            Part::Literal(_) => Some(acc),
            Part::Choices(c) => acc.checked_mul(c.len()),
        });
        match count {
            Some(n) if n.saturating_add(hosts.len()) <= MAX_HOSTS => {}
            _ => return Err(HostlistError::TooMany { expression: name.to_string(), limit: MAX_HOSTS }),
        }
        hosts.extend(cartesian(&parts));
    }
    if hosts.is_empty() {
        return Err(HostlistError::Empty);
    }
    Ok(hosts)
}

/// Splits at commas and whitespace outside brackets; returns each name with its 1-based column.
fn split_names(expression: &str) -> Result<Vec<(usize, &str)>, HostlistError> {
    if expression.trim().is_empty() {
        return Err(HostlistError::Empty);
    }
    // Pass 1: check the brackets and cut at commas outside them.
    let mut open: Option<usize> = None; // column of the `[` we are inside
    let mut pieces = Vec::new(); // (start byte, start column, end byte)
    let (mut start_byte, mut start_col, mut column) = (0, 1, 0);
    for (byte, ch) in expression.char_indices() {
        column += 1;
        match ch {
            '[' if open.is_some() => return Err(HostlistError::NestedBracket { column }),
            '[' => open = Some(column),
            ']' if open.is_none() => return Err(HostlistError::UnopenedBracket { column }),
            ']' => open = None,
            ',' if open.is_none() => {
                pieces.push((start_byte, start_col, byte));
                (start_byte, start_col) = (byte + 1, column + 1);
            }
            _ => {}
        }
    }
    if let Some(column) = open {
        return Err(HostlistError::UnclosedBracket { column });
    }
    pieces.push((start_byte, start_col, expression.len()));

    // Pass 2: whitespace outside brackets also separates (Slurm accepts it); a piece between
    // commas must hold at least one name.
    let mut names = Vec::new();
    for (begin, begin_col, end) in pieces {
        let piece = &expression[begin..end];
        let before = names.len();
        let mut inside = false;
        let mut name_start: Option<(usize, usize)> = None;
        for (col, (byte, ch)) in (begin_col..).zip(piece.char_indices()) {
            match ch {
                '[' => inside = true,
                ']' => inside = false,
                _ => {}
            }
            match (ch.is_whitespace() && !inside, name_start) {
                (true, Some((b, c))) => {
                    names.push((c, &piece[b..byte]));
                    name_start = None;
                }
                (false, None) => name_start = Some((byte, col)),
                _ => {}
            }
        }
        if let Some((b, c)) = name_start {
            names.push((c, &piece[b..]));
        }
        if names.len() == before {
            return Err(HostlistError::EmptyName { column: begin_col });
        }
    }
    Ok(names)
}

/// Parses one name (brackets known to be balanced and flat) into literal runs and choices.
fn parse_name(name: &str, start_col: usize) -> Result<Vec<Part>, HostlistError> {
    let mut parts = Vec::new();
    let mut rest = name;
    let mut col = start_col;
    while !rest.is_empty() {
        match rest.find('[') {
            None => {
                parts.push(Part::Literal(rest.to_string()));
                break;
            }
            Some(open) => {
                if open > 0 {
                    parts.push(Part::Literal(rest[..open].to_string()));
                }
                col += rest[..open].chars().count();
                // Balanced and flat, checked by split_names.
                let close = rest[open..].find(']').map_or(rest.len(), |c| open + c);
                let inner = &rest[open + 1..close];
                parts.push(Part::Choices(parse_ranges(inner, col + 1)?));
                col += inner.chars().count() + 2;
                rest = rest.get(close + 1..).unwrap_or("");
            }
        }
    }
    Ok(parts)
}

/// Parses the inside of one bracket group: `01-04,07`.
fn parse_ranges(inner: &str, start_col: usize) -> Result<Vec<String>, HostlistError> {
    if inner.trim().is_empty() {
        return Err(HostlistError::BadRange {
            range: String::new(),
            column: start_col,
            reason: "empty brackets; write a number or a range such as `1-4`".into(),
        });
    }
    let mut out = Vec::new();
    let mut col = start_col;
    for item in inner.split(',') {
        let bad =
            |reason: &str| HostlistError::BadRange { range: item.to_string(), column: col, reason: reason.to_string() };
        let (lo, hi) = match item.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (item, item),
        };
        let lo_n = parse_bound(lo).map_err(|r| bad(&r))?;
        let hi_n = parse_bound(hi).map_err(|r| bad(&r))?;
        if lo_n > hi_n {
            return Err(bad(&format!("the start ({lo_n}) is greater than the end ({hi_n})")));
        }
        let len = usize::try_from(hi_n - lo_n)
            .ok()
            .and_then(|d| d.checked_add(1))
            .filter(|n| n.saturating_add(out.len()) <= MAX_HOSTS)
            .ok_or_else(|| bad(&format!("more than {MAX_HOSTS} hosts")))?;
        // Slurm keeps the width of the first bound: `[08-10]` gives 08, 09, 10.
        let width = lo.len();
        out.extend((0..len as u64).map(|i| format!("{:0width$}", lo_n + i)));
        col += item.chars().count() + 1;
    }
    Ok(out)
}

fn parse_bound(text: &str) -> Result<u64, String> {
    if text.is_empty() {
        return Err("a range needs a number on both sides of `-`".into());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{text}` is not a number; ranges are numeric, such as `01-04`"));
    }
    if text.len() > 18 {
        return Err(format!("`{text}` is too large"));
    }
    text.parse::<u64>().map_err(|e| format!("`{text}`: {e}"))
}

/// Every combination of the parts, the first group varying slowest (iterative: a name with
/// thousands of groups must not exhaust the stack).
fn cartesian(parts: &[Part]) -> Vec<String> {
    let mut names = vec![String::new()];
    for part in parts {
        match part {
            Part::Literal(text) => names.iter_mut().for_each(|n| n.push_str(text)),
            Part::Choices(choices) if choices.len() == 1 => names.iter_mut().for_each(|n| n.push_str(&choices[0])),
            Part::Choices(choices) => {
                names = names.iter().flat_map(|n| choices.iter().map(move |c| format!("{n}{c}"))).collect();
            }
        }
    }
    names
}

/// One host line of a DeepSpeed hostfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostfileEntry {
    pub host: String,
    pub slots: usize,
    /// 1-based line in the hostfile.
    pub line: usize,
    /// 1-based column of `slots=N` on that line.
    pub slots_column: usize,
}

/// Parses a DeepSpeed hostfile (`worker-1 slots=8` lines, `#` comments, blank lines) into
/// `(host, slots)` pairs in file order. `origin` names the file in errors.
pub fn parse_hostfile(text: &str, origin: &Path) -> Result<Vec<(String, usize)>, ConfigError> {
    Ok(parse_hostfile_entries(text, origin)?.into_iter().map(|e| (e.host, e.slots)).collect())
}

/// Like [`parse_hostfile`], keeping each entry's line number (the cluster checks point at it).
/// Reports every bad line at once.
pub fn parse_hostfile_entries(text: &str, origin: &Path) -> Result<Vec<HostfileEntry>, ConfigError> {
    let mut entries: Vec<HostfileEntry> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut problems = Vec::new();
    let format_hint = "each line is `HOST slots=N`, e.g. `worker-1 slots=8`; `#` starts a comment";
    'lines: for (index, raw_line) in input::strip_bom(text).lines().enumerate() {
        let line = index + 1;
        let content = raw_line.split('#').next().unwrap_or("");
        let tokens = tokens_with_columns(content);
        let Some(&(host_col, host)) = tokens.first() else {
            continue; // blank or comment-only
        };
        let err = |col: usize, message: String, hint: Option<&str>| {
            let mut e = ConfigError::new(origin, message).at(line, col);
            if let Some(h) = hint {
                e = e.with_hint(h);
            }
            e
        };
        // Before any message quotes a word: a refused character never reaches the terminal.
        for &(col, token) in &tokens {
            if let Some((i, message)) = input::unsafe_char_message(token) {
                problems.push(err(col + i - 1, message, Some(input::UNSAFE_CHAR_HINT)));
                continue 'lines;
            }
        }
        if host.contains('=') {
            problems.push(err(host_col, format!("expected a host name first, found `{host}`"), Some(format_hint)));
            continue;
        }
        let Some(&(slots_col, slots_token)) = tokens.get(1) else {
            problems.push(err(
                host_col + host.chars().count(),
                format!("host `{host}` has no `slots=N`"),
                Some("DeepSpeed hostfiles give every host its slot count: `HOST slots=N`"),
            ));
            continue;
        };
        let Some(value) = slots_token.strip_prefix("slots=") else {
            problems.push(err(
                slots_col,
                format!("expected `slots=N` after the host name, found `{slots_token}`"),
                Some(format_hint),
            ));
            continue;
        };
        let slots = match value.parse::<usize>() {
            Ok(0) => {
                problems.push(err(
                    slots_col,
                    format!("host `{host}` has slots=0"),
                    Some("give at least one slot, or delete the line (or comment it out with `#`)"),
                ));
                continue;
            }
            Ok(n) => n,
            Err(_) => {
                problems.push(err(
                    slots_col,
                    format!("slots must be a positive whole number, found `{value}`"),
                    Some(format_hint),
                ));
                continue;
            }
        };
        if let Some(&(extra_col, extra)) = tokens.get(2) {
            problems.push(err(extra_col, format!("unexpected `{extra}` after `{slots_token}`"), Some(format_hint)));
            continue;
        }
        if let Some(first) = seen.get(host) {
            problems.push(err(
                host_col,
                format!("host `{host}` is listed twice (first on line {first})"),
                Some("list each host once, with all its slots"),
            ));
            continue;
        }
        seen.insert(host.to_string(), line);
        entries.push(HostfileEntry { host: host.to_string(), slots, line, slots_column: slots_col });
    }
    if problems.is_empty() && entries.is_empty() {
        problems.push(ConfigError::new(origin, "the hostfile lists no hosts".to_string()).with_hint(format_hint));
    }
    match ConfigError::collect(problems) {
        Some(e) => Err(e),
        None => Ok(entries),
    }
}

/// Whitespace-separated tokens with their 1-based character columns.
fn tokens_with_columns(line: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start: Option<(usize, usize)> = None; // (byte, column)
    let mut column = 0;
    for (byte, ch) in line.char_indices() {
        column += 1;
        match (ch.is_whitespace(), start) {
            (true, Some((b, c))) => {
                out.push((c, &line[b..byte]));
                start = None;
            }
            (false, None) => start = Some((byte, column)),
            _ => {}
        }
    }
    if let Some((b, c)) = start {
        out.push((c, &line[b..]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(expr: &str) -> Vec<String> {
        match expand(expr) {
            Ok(v) => v,
            Err(e) => panic!("{expr}: {e}"),
        }
    }

    #[test]
    fn expands_the_documented_example() {
        assert_eq!(
            ok("node[01-04,07],gpu-a[1-2]-ib,login"),
            ["node01", "node02", "node03", "node04", "node07", "gpu-a1-ib", "gpu-a2-ib", "login"]
        );
    }

    #[test]
    fn keeps_the_width_of_the_first_bound() {
        assert_eq!(ok("n[08-11]"), ["n08", "n09", "n10", "n11"]);
        assert_eq!(ok("n[8-11]"), ["n8", "n9", "n10", "n11"]);
        assert_eq!(ok("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(ok("n[007]"), ["n007"]);
    }

    #[test]
    fn several_groups_expand_as_a_product_first_group_outermost() {
        assert_eq!(ok("r[1-2]n[01-03]"), ["r1n01", "r1n02", "r1n03", "r2n01", "r2n02", "r2n03"]);
        assert_eq!(ok("[1-2]x"), ["1x", "2x"]);
    }

    #[test]
    fn plain_names_and_whitespace_separators() {
        assert_eq!(ok("login"), ["login"]);
        assert_eq!(ok(" a, b  c "), ["a", "b", "c"]);
        assert_eq!(ok("a[1-2] b"), ["a1", "a2", "b"]);
    }

    #[test]
    fn reports_bracket_problems_with_columns() {
        assert_eq!(expand("node[1-2"), Err(HostlistError::UnclosedBracket { column: 5 }));
        assert_eq!(expand("node1-2]"), Err(HostlistError::UnopenedBracket { column: 8 }));
        assert_eq!(expand("n[1-[2]]"), Err(HostlistError::NestedBracket { column: 5 }));
        assert_eq!(expand("a[1-2]],b"), Err(HostlistError::UnopenedBracket { column: 7 }));
    }

    #[test]
    fn reports_bad_ranges() {
        let e = expand("node[1,5-3]").unwrap_err();
        assert_eq!(e.to_string(), "bad range `5-3` at column 8: the start (5) is greater than the end (3)");
        assert!(matches!(expand("n[a-c]"), Err(HostlistError::BadRange { column: 3, .. })));
        assert!(matches!(expand("n[1-]"), Err(HostlistError::BadRange { .. })));
        assert!(matches!(expand("n[]"), Err(HostlistError::BadRange { .. })));
        assert!(matches!(expand("n[1:2]"), Err(HostlistError::BadRange { .. })));
        assert!(matches!(expand("n[1-99999999999999999999]"), Err(HostlistError::BadRange { .. })));
    }

    #[test]
    fn reports_empty_names_and_lists() {
        assert_eq!(expand(""), Err(HostlistError::Empty));
        assert_eq!(expand("   "), Err(HostlistError::Empty));
        assert_eq!(expand("a,,b"), Err(HostlistError::EmptyName { column: 3 }));
        assert_eq!(expand(",a"), Err(HostlistError::EmptyName { column: 1 }));
        assert_eq!(expand("a,"), Err(HostlistError::EmptyName { column: 3 }));
    }

    #[test]
    fn many_groups_do_not_recurse() {
        let name = "[1]".repeat(50_000);
        assert_eq!(expand(&name).unwrap(), ["1".repeat(50_000)]);
    }

    #[test]
    fn refuses_huge_expansions_before_allocating() {
        assert!(matches!(expand("n[0-99999999]"), Err(HostlistError::BadRange { .. })));
        assert!(matches!(expand("a[0-999]b[0-999]"), Err(HostlistError::TooMany { .. })));
    }

    #[test]
    fn hostfile_parses_comments_blanks_and_slots() {
        let text = "# workers\nworker-1 slots=8\n\n  worker-2   slots=4  # half\n";
        let hosts = parse_hostfile(text, Path::new("h")).unwrap();
        assert_eq!(hosts, [("worker-1".to_string(), 8), ("worker-2".to_string(), 4)]);
        let entries = parse_hostfile_entries(text, Path::new("h")).unwrap();
        assert_eq!(entries[1].line, 4);
    }

    #[test]
    fn hostfile_reports_every_bad_line() {
        let text = "a slots=2\nb\nc slots=x\nd slots=1 extra\na slots=2\ne slot=3\nf slots=0\n";
        let e = parse_hostfile(text, Path::new("dir/hosts")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dir/hosts:2:2: host `b` has no `slots=N`\n  \
             hint: DeepSpeed hostfiles give every host its slot count: `HOST slots=N`\n\
             dir/hosts:3:3: slots must be a positive whole number, found `x`\n  \
             hint: each line is `HOST slots=N`, e.g. `worker-1 slots=8`; `#` starts a comment\n\
             dir/hosts:4:11: unexpected `extra` after `slots=1`\n  \
             hint: each line is `HOST slots=N`, e.g. `worker-1 slots=8`; `#` starts a comment\n\
             dir/hosts:5:1: host `a` is listed twice (first on line 1)\n  \
             hint: list each host once, with all its slots\n\
             dir/hosts:6:3: expected `slots=N` after the host name, found `slot=3`\n  \
             hint: each line is `HOST slots=N`, e.g. `worker-1 slots=8`; `#` starts a comment\n\
             dir/hosts:7:3: host `f` has slots=0\n  \
             hint: give at least one slot, or delete the line (or comment it out with `#`)"
        );
    }

    #[test]
    fn hostfile_skips_a_byte_order_mark() {
        let hosts = parse_hostfile("\u{feff}worker-1 slots=8\nworker-2\tslots=2\r\n", Path::new("h")).unwrap();
        assert_eq!(hosts, [("worker-1".to_string(), 8), ("worker-2".to_string(), 2)]);
    }

    #[test]
    fn hostfile_refuses_invisible_characters_by_code_point() {
        let text = "ok slots=1\nw\u{1b}[2J slots=1\nw\u{200b}2 slots=1\nw3 slots=1\u{202e}\n\u{feff}w4 slots=1\n";
        let e = parse_hostfile(text, Path::new("h")).unwrap_err();
        let shown = e.to_string();
        assert_eq!(
            e.problems()
                .map(|p| format!("{}:{}: {}", p.line.unwrap(), p.column.unwrap(), p.message))
                .collect::<Vec<_>>(),
            [
                "2:2: character 2 is U+001B, an escape character",
                "3:2: character 2 is U+200B, a zero-width character",
                "4:11: character 8 is U+202E, a bidirectional control character",
                "5:1: character 1 is U+FEFF, a zero-width character",
            ]
        );
        assert!(shown.contains("hint: host names, addresses and user names cannot hold"), "{shown}");
        for c in ['\u{1b}', '\u{200b}', '\u{202e}', '\u{feff}'] {
            assert!(!shown.contains(c), "the raw character reached the message: {shown:?}");
        }
    }

    #[test]
    fn empty_hostfile_is_an_error() {
        let e = parse_hostfile("# nothing\n\n", Path::new("h")).unwrap_err();
        assert_eq!(e.message, "the hostfile lists no hosts");
        assert_eq!(e.line, None);
    }

    proptest! {
        #[test]
        fn expansion_count_matches_the_generated_ranges(
            prefix in "[a-z][a-z0-9-]{0,6}",
            suffix in "(-[a-z]{1,3})?",
            ranges in proptest::collection::vec((0u64..500, 0u64..20, 1usize..5), 1..6),
        ) {
            let items: Vec<String> = ranges
                .iter()
                .map(|&(lo, len, width)| {
                    if len == 0 {
                        format!("{lo:0width$}")
                    } else {
                        format!("{lo:0width$}-{}", lo + len)
                    }
                })
                .collect();
            let expr = format!("{prefix}[{}]{suffix}", items.join(","));
            let hosts = expand(&expr).unwrap();
            let expected: u64 = ranges.iter().map(|&(_, len, _)| len + 1).sum();
            prop_assert_eq!(hosts.len() as u64, expected);
            let (lo, _, width) = ranges[0];
            prop_assert_eq!(&hosts[0], &format!("{prefix}{lo:0width$}{suffix}"));
            for h in &hosts {
                prop_assert!(h.starts_with(&prefix) && h.ends_with(&suffix));
            }
        }

        #[test]
        fn two_groups_multiply(a in 1u64..30, b in 1u64..30) {
            let hosts = expand(&format!("r[1-{a}]n[1-{b}],x")).unwrap();
            prop_assert_eq!(hosts.len() as u64, a * b + 1);
        }

        #[test]
        fn never_panics_on_arbitrary_input(s in "[a-z0-9\\[\\],\\- ]{0,40}", u in "\\PC{0,40}") {
            let _ = expand(&s);
            let _ = expand(&u);
        }

        #[test]
        fn hostfile_never_panics(s in "\\PC{0,80}") {
            let _ = parse_hostfile(&s, Path::new("h"));
        }
    }
}
