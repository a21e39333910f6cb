//! Located diagnostics for YAML config files (cluster files, recipes, hostfiles): the error
//! type ([`ConfigError`]: one or more [`Diagnostic`]s), key paths (`hosts[1].ssh_port`), and
//! the mapping of serde's first error (syntax, unknown key, missing key, bad type or value) to
//! a message at the file's line and column, with mm-spec's "did you mean".
//!
//! Pitfall: serde_yaml_ng knows line and column only while deserializing. Problems found later
//! (duplicate hosts, devices out of range, …) are located by walking the YAML a second time to
//! the offending key ([`Locator`]), which reuses the parser's own marks instead of scanning text.

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};

use mm_spec::suggest::did_you_mean;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::input::{self, MAX_YAML_DEPTH};

// ───────────────────────────── errors ─────────────────────────────

/// One problem in a cluster file (or a hostfile it names): where it is and how to fix it.
///
/// Displays as `<file>:<line>:<col>: <key.path>: <message>` and, when there is a hint,
/// `  hint: <hint>` on the next line. Line, column and key path are left out when unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as it was given (a hostfile's path is resolved against the cluster file's).
    pub file: PathBuf,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based, in characters.
    pub column: Option<usize>,
    /// e.g. `hosts[1].ssh_port`; empty for the whole file.
    pub key_path: String,
    /// What was found and what was expected.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.key_path.is_empty() {
            write!(f, "{}: ", self.key_path)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Why a cluster file was refused: one or more [`Diagnostic`]s, in file order.
///
/// Serde stops at the first problem; the checks after parsing report all of theirs at once.
/// Derefs to the first problem, so `err.line`, `err.key_path`, `err.message` read it directly;
/// [`problems`](Self::problems) yields all of them. Display prints every problem, one after
/// another. (Boxed: the error stays one pointer wide on the `Ok` path.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    first: Box<Diagnostic>,
    more: Vec<Diagnostic>,
}

impl ConfigError {
    pub fn new(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            line: None,
            column: None,
            key_path: String::new(),
            message: message.into(),
            hint: None,
        }
        .into()
    }

    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.first.line = Some(line);
        self.first.column = Some(column);
        self
    }

    pub fn at_opt(self, position: Option<(usize, usize)>) -> Self {
        match position {
            Some((line, column)) => self.at(line, column),
            None => self,
        }
    }

    pub fn with_key(mut self, key_path: impl Into<String>) -> Self {
        self.first.key_path = key_path.into();
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.first.hint = Some(hint.into());
        self
    }

    pub(crate) fn with_hint_opt(mut self, hint: Option<String>) -> Self {
        self.first.hint = hint;
        self
    }

    /// One error holding every problem of `errors` (None when there are none).
    pub fn collect(errors: Vec<ConfigError>) -> Option<ConfigError> {
        let mut all = errors.into_iter().flat_map(ConfigError::into_problems);
        let first = all.next()?;
        Some(ConfigError { first: Box::new(first), more: all.collect() })
    }

    /// Every problem, the first one first.
    pub fn problems(&self) -> impl Iterator<Item = &Diagnostic> {
        std::iter::once(&*self.first).chain(self.more.iter())
    }

    pub fn into_problems(self) -> Vec<Diagnostic> {
        let mut all = vec![*self.first];
        all.extend(self.more);
        all
    }
}

impl From<Diagnostic> for ConfigError {
    fn from(d: Diagnostic) -> Self {
        ConfigError { first: Box::new(d), more: Vec::new() }
    }
}

impl std::ops::Deref for ConfigError {
    type Target = Diagnostic;
    fn deref(&self) -> &Diagnostic {
        &self.first
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Parses any YAML document (a recipe file, say) into a JSON value; syntax errors carry
/// their line and column. A leading byte order mark is skipped; see [`yaml_input`].
pub fn yaml_to_value(text: &str, origin: &Path) -> Result<serde_json::Value, ConfigError> {
    let text = yaml_input(text, origin)?;
    serde_yaml_ng::from_str::<serde_json::Value>(text).map_err(|e| syntax_error(origin, text, &e))
}

/// What every YAML loader does before parsing: skips a leading UTF-8 byte order mark, and
/// refuses nesting deeper than [`MAX_YAML_DEPTH`] at once (the parser would take minutes on
/// a hostile file before its own limit fired). Positions in the returned text are the file's.
pub fn yaml_input<'t>(text: &'t str, origin: &Path) -> Result<&'t str, ConfigError> {
    let text = input::strip_bom(text);
    match input::yaml_depth_exceeded(text, MAX_YAML_DEPTH) {
        None => Ok(text),
        Some((line, column)) => Err(ConfigError::new(
            origin,
            format!("invalid YAML: collections nest more than {MAX_YAML_DEPTH} levels deep here"),
        )
        .at(line, column)
        .with_hint(format!(
            "launch reads at most {MAX_YAML_DEPTH} levels of lists and maps (`[`, `{{`, indentation, `- `), \
             checked before parsing; a cluster file or recipe needs about five"
        ))),
    }
}

/// Line and column of the map key at `path` (e.g. `["train", "lr"]`) in a YAML text.
pub fn locate_key(text: &str, path: &[String]) -> Option<(usize, usize)> {
    let segs: Vec<Seg> = path.iter().map(|k| Seg::Key(k.clone())).collect();
    Locator { text }.key(&segs, 0)
}

pub(crate) fn syntax_error(origin: &Path, text: &str, err: &serde_yaml_ng::Error) -> ConfigError {
    let position = err.location().map(|l| (l.line(), l.column()));
    let mut message = err.to_string();
    if let Some((line, column)) = position {
        message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    }
    let mut hint = None;
    if message.contains("more than one document") {
        message = "the file holds more than one YAML document (`---`)".into();
        hint = Some("keep one cluster per file".to_string());
    } else if let Some((line, _)) = position {
        let has_tab = text.lines().nth(line.saturating_sub(1)).is_some_and(|l| l.contains('\t'));
        if has_tab {
            hint = Some("indent with spaces: YAML does not allow tabs for indentation".into());
        }
    }
    ConfigError::new(origin, format!("invalid YAML: {message}")).at_opt(position).with_hint_opt(hint)
}

/// Separates a hint from the message in errors raised by our own visitors (serde errors carry
/// one string only).
pub(crate) const HINT_MARK: char = '\u{1f}';

/// What a file format adds to serde's messages: help for a missing key, and for a bad value by
/// the key that holds it.
pub(crate) struct ShapeHints {
    pub required: fn(&str) -> Option<&'static str>,
    pub leaf: fn(&[Seg]) -> Option<&'static str>,
}

/// Serde's first error (through serde_path_to_error, for the key path) as a located ConfigError.
pub(crate) fn shape_error(
    origin: &Path,
    locator: &Locator,
    err: serde_path_to_error::Error<serde_yaml_ng::Error>,
    hints: &ShapeHints,
) -> ConfigError {
    use serde_path_to_error::Segment;
    let mut path: Vec<Seg> = err
        .path()
        .iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect();
    let inner = err.into_inner();
    let mut position = inner.location().map(|l| (l.line(), l.column()));
    let mut text = inner.to_string();
    if let Some((line, column)) = position {
        if let Some(t) = text.strip_suffix(&format!(" at line {line} column {column}")) {
            text = t.to_string();
        }
    }
    // serde_yaml_ng prefixes its own path ("ssh: ..."); ours is shown separately.
    for k in (1..=path.len()).rev() {
        if let Some(t) = text.strip_prefix(&format!("{}: ", KeyPath(&path[..k]))) {
            text = t.to_string();
            break;
        }
    }
    let (mut message, mut hint) = match text.split_once(HINT_MARK) {
        Some((m, h)) => (m.to_string(), Some(h.to_string())),
        None => (text, None),
    };

    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let field = field.to_string();
        let allowed = backticked(tail);
        if matches!(path.last(), Some(Seg::Key(k)) if *k == field) {
            path.pop();
        }
        message = format!("unknown key `{field}`");
        if let Some(s) = did_you_mean(&field, &allowed) {
            message.push_str(&format!(", did you mean `{s}`?"));
        }
        hint = Some(if allowed.is_empty() {
            "this map takes no keys".to_string()
        } else {
            format!("allowed keys here: {}", allowed.join(", "))
        });
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest).to_string();
        message = format!("missing key `{field}`");
        hint = (hints.required)(&field).map(str::to_string);
    } else if let Some(rest) = message.strip_prefix("duplicate field `") {
        let field = rest.split('`').next().unwrap_or(rest).to_string();
        message = format!("`{field}` is set twice");
        hint = Some("keep one of them".to_string());
        let mut key_path = path.clone();
        key_path.push(Seg::Key(field));
        position = locator.key(&key_path, 1).or(position);
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (value, tail) = rest.split_once('`').unwrap_or((rest, ""));
        let (value, tail) = (value.to_string(), tail.to_string());
        let allowed = backticked(&tail);
        message = if value.is_empty() {
            format!("no value given,{}", tail.trim_start_matches(','))
        } else {
            format!("unknown value `{value}`{tail}")
        };
        if let Some(s) = did_you_mean(&value, &allowed) {
            message.push_str(&format!("; did you mean `{s}`?"));
        }
        hint = hint.or_else(|| (hints.leaf)(&path).map(str::to_string));
    } else {
        message = plain_types(&message);
        hint = hint.or_else(|| (hints.leaf)(&path).map(str::to_string));
    }
    ConfigError::new(origin, message).at_opt(position).with_key(KeyPath(&path).to_string()).with_hint_opt(hint)
}

/// Serde's type error in the words of the file's author: Rust's type names (`expected usize`,
/// `expected struct Train`, `unit value`) become what to write.
pub(crate) fn plain_types(message: &str) -> String {
    let mut message = message.replace("invalid type: unit value", "invalid type: empty value");
    if let Some(i) = message.find("expected struct ") {
        message.truncate(i);
        message.push_str("expected a map of keys");
    }
    for (rust, plain) in [
        ("usize", "a whole number, 0 or more"),
        ("u64", "a whole number, 0 or more"),
        ("u32", "a whole number, 0 or more"),
        ("u16", "a whole number from 0 to 65535"),
        ("u8", "a whole number from 0 to 255"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
        ("f64", "a number"),
        ("f32", "a number"),
    ] {
        if let Some(head) = message.strip_suffix(&format!("expected {rust}")) {
            return format!("{head}expected {plain}");
        }
    }
    message
}

/// The `x` in every `` `x` `` of serde's "expected one of `a`, `b`" lists.
fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// A custom serde error carrying a hint, which [`shape_error`] splits off again.
pub(crate) fn hinted(message: impl fmt::Display, hint: impl fmt::Display) -> String {
    format!("{message}{HINT_MARK}{hint}")
}

// ───────────────────────────── key paths and the locator ─────────────────────────────

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Displays `hosts[1].ssh_port`.
pub(crate) struct KeyPath<'a>(pub &'a [Seg]);

impl fmt::Display for KeyPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Finds where a key or value sits in the YAML by deserializing again with a seed that walks
/// `path` and raises an error at the target node: serde_yaml_ng then attaches that node's mark.
pub(crate) struct Locator<'t> {
    pub text: &'t str,
}

const LOCATE_MARK: &str = "\u{1}locate";

impl Locator<'_> {
    /// Line and column of the value at `path`.
    pub(crate) fn value(&self, path: &[Seg]) -> Option<(usize, usize)> {
        self.run(Walk { path, want_key: false, occurrence: 0 })
    }

    /// Line and column of the key that ends `path`; `occurrence` 1 is its second appearance.
    pub(crate) fn key(&self, path: &[Seg], occurrence: usize) -> Option<(usize, usize)> {
        if !matches!(path.last(), Some(Seg::Key(_))) {
            return None;
        }
        self.run(Walk { path, want_key: true, occurrence })
    }

    fn run(&self, walk: Walk) -> Option<(usize, usize)> {
        let de = serde_yaml_ng::Deserializer::from_str(self.text);
        match walk.deserialize(de) {
            Err(e) if e.to_string().contains(LOCATE_MARK) => e.location().map(|l| (l.line(), l.column())),
            _ => None,
        }
    }
}

struct Walk<'p> {
    path: &'p [Seg],
    want_key: bool,
    occurrence: usize,
}

impl Walk<'_> {
    fn here<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(LOCATE_MARK))
        } else {
            Ok(()) // a scalar where the path goes deeper: not found
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

struct KeySeed<'a> {
    target: &'a str,
    stop: bool,
    seen: &'a Cell<usize>,
    occurrence: usize,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        // The check runs inside the visitor: errors raised there get the key's own mark,
        // errors raised after deserialization returns would get the enclosing map's.
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        if key == self.target {
            let n = self.seen.get();
            self.seen.set(n + 1);
            if self.stop && n == self.occurrence {
                return Err(E::custom(LOCATE_MARK));
            }
        }
        Ok(key.to_string())
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some(first) = self.path.first() else {
            return Err(de::Error::custom(LOCATE_MARK));
        };
        let Seg::Key(target) = first else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let stop = self.path.len() == 1 && self.want_key;
        let seen = Cell::new(0);
        let mut descended = false;
        while let Some(key) = map.next_key_seed(KeySeed { target, stop, seen: &seen, occurrence: self.occurrence })? {
            // When looking for the key itself, never descend: the value would match an empty
            // remaining path and report its own position.
            if key == *target && !descended && !stop {
                descended = true;
                map.next_value_seed(Walk {
                    path: &self.path[1..],
                    want_key: self.want_key,
                    occurrence: self.occurrence,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some(first) = self.path.first() else {
            return Err(de::Error::custom(LOCATE_MARK));
        };
        let Seg::Index(target) = first else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut index = 0;
        loop {
            let more = if index == *target {
                seq.next_element_seed(Walk {
                    path: &self.path[1..],
                    want_key: self.want_key,
                    occurrence: self.occurrence,
                })?
                .is_some()
            } else {
                seq.next_element::<IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.here()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.here()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.here()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.here()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.here()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.here()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_is_conservative() {
        let keys: Vec<String> = ["hosts", "hostfile", "npu", "gpu"].iter().map(|s| s.to_string()).collect();
        assert_eq!(did_you_mean("hots", &keys), Some("hosts"));
        assert_eq!(did_you_mean("hostfiel", &keys), Some("hostfile"));
        assert_eq!(did_you_mean("GPU", &keys), Some("gpu"));
        assert_eq!(did_you_mean("tpu", &keys), None);
        assert_eq!(did_you_mean("nup", &keys), Some("npu"));
        assert_eq!(did_you_mean("hst", &keys), None);
        assert_eq!(did_you_mean("zzzzzz", &keys), None);
    }

    #[test]
    fn config_error_display_forms() {
        let bare = ConfigError::new(Path::new("f.yaml"), "no hosts");
        assert_eq!(bare.to_string(), "f.yaml: no hosts");
        let full = ConfigError::new(Path::new("f.yaml"), "bad").at(3, 7).with_key("ssh.port").with_hint("fix it");
        assert_eq!(full.to_string(), "f.yaml:3:7: ssh.port: bad\n  hint: fix it");
        let both = ConfigError::collect(vec![bare.clone(), full.clone()]).unwrap();
        assert_eq!(both.problems().count(), 2);
        assert_eq!(both.to_string(), format!("{bare}\n{full}"));
        assert!(ConfigError::collect(Vec::new()).is_none());
    }

    #[test]
    fn locator_finds_keys_values_and_repeats() {
        let text = "a: 1\nhosts:\n  - x\n  - address: y\n    devices: [0, 1]\na: 2\n";
        let l = Locator { text };
        let k = |s: &str| Seg::Key(s.into());
        assert_eq!(l.key(&[k("a")], 0), Some((1, 1)));
        assert_eq!(l.key(&[k("a")], 1), Some((6, 1)));
        assert_eq!(l.key(&[k("a")], 2), None);
        assert_eq!(l.value(&[k("a")]), Some((1, 4)));
        assert_eq!(l.value(&[k("hosts"), Seg::Index(0)]), Some((3, 5)));
        assert_eq!(l.key(&[k("hosts"), Seg::Index(1), k("devices")], 0), Some((5, 5)));
        assert_eq!(l.value(&[k("hosts"), Seg::Index(1), k("devices"), Seg::Index(1)]), Some((5, 18)));
        assert_eq!(l.value(&[k("hosts"), Seg::Index(7)]), None);
        assert_eq!(l.value(&[k("nope")]), None);
        assert_eq!(l.key(&[k("hosts"), Seg::Index(0)], 0), None);
    }
}
