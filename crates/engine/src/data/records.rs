//! InternVL chat records: JSONL files (one record a line) and the meta JSON that lists several
//! of them (`{name: {root, annotation, data_augment, repeat_time, length}}`).
//!
//! A record: `{"image": str | [str], "conversations": [{"from", "value"}]}`, or `"video": str`,
//! or neither (text only). A line that does not parse is not fatal: it becomes a
//! [`BadLine`] naming file and line, counted against `--max-bad-fraction` by the loader.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// Not a `#[source]`: the message holds it already, so `{:#}` does not print it twice.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: key {key}: {reason}")]
    Meta { path: PathBuf, key: String, reason: String },
    #[error("{path}: no records (the file is empty or every line is broken)")]
    Empty { path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

/// One training record, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub images: Vec<String>,
    pub video: Option<String>,
    pub conversations: Vec<Turn>,
    /// Folder that image and video paths are relative to.
    pub root: PathBuf,
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: usize,
}

/// A line that is not a usable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for BadLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.reason)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTurn {
    from: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct RawRecord {
    #[serde(default)]
    image: Option<OneOrMany>,
    #[serde(default)]
    video: Option<String>,
    conversations: Vec<RawTurn>,
}

/// Parses one JSONL line.
pub fn parse_line(text: &str, root: &Path, file: &Path, line: usize) -> Result<Record, BadLine> {
    let bad = |reason: String| BadLine { file: file.to_path_buf(), line, reason };
    let raw: RawRecord = serde_json::from_str(text).map_err(|e| bad(format!("not a chat record: {e}")))?;
    let images = match raw.image {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if !images.is_empty() && raw.video.is_some() {
        return Err(bad("has both \"image\" and \"video\"; expected one of them".into()));
    }
    if raw.conversations.is_empty() {
        return Err(bad("key conversations: empty".into()));
    }
    for (i, t) in raw.conversations.iter().enumerate() {
        if !matches!(t.from.as_str(), "human" | "gpt" | "system") {
            return Err(bad(format!(
                "key conversations[{i}].from: {:?}, expected \"human\", \"gpt\" or \"system\"",
                t.from
            )));
        }
        if t.from == "system" && i != 0 {
            return Err(bad(format!("key conversations[{i}].from: a system turn is only allowed first")));
        }
    }
    Ok(Record {
        images,
        video: raw.video,
        conversations: raw.conversations.into_iter().map(|t| Turn { from: t.from, value: t.value }).collect(),
        root: root.to_path_buf(),
        file: file.to_path_buf(),
        line,
    })
}

/// Reads a JSONL file: the good records and the bad lines (blank lines are neither).
pub fn read_jsonl(path: &Path, root: &Path) -> Result<(Vec<Record>, Vec<BadLine>), RecordsError> {
    let text = std::fs::read_to_string(path).map_err(|error| RecordsError::Io { path: path.to_path_buf(), error })?;
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line, root, path, i + 1) {
            Ok(r) => good.push(r),
            Err(b) => bad.push(b),
        }
    }
    Ok((good, bad))
}

/// Everything a data path names: records in dataset order, and the bad lines.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<Record>,
    pub bad: Vec<BadLine>,
}

/// `path` is a JSONL file (images relative to `folder`, else to the file's folder) or a meta
/// JSON. Meta entries: `annotation` (required), `root` (default: the meta file's folder),
/// `repeat_time` (default 1: < 1 keeps the first fraction, > 1 repeats whole), and the
/// informational `data_augment`, `length`.
pub fn load(path: &Path, folder: Option<&Path>) -> Result<Loaded, RecordsError> {
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let is_meta = path.extension().is_some_and(|e| e == "json");
    let mut out = Loaded::default();
    if !is_meta {
        let root = folder.map(Path::to_path_buf).unwrap_or(parent);
        let (good, bad) = read_jsonl(path, &root)?;
        out.records = good;
        out.bad = bad;
    } else {
        let text =
            std::fs::read_to_string(path).map_err(|error| RecordsError::Io { path: path.to_path_buf(), error })?;
        let meta = |key: &str, reason: String| RecordsError::Meta { path: path.to_path_buf(), key: key.into(), reason };
        let v: Value = serde_json::from_str(&text).map_err(|e| meta("(file)", format!("not JSON: {e}")))?;
        let Value::Object(map) = v else {
            return Err(meta("(file)", "expected an object of {name: {root, annotation, repeat_time}}".into()));
        };
        for (name, entry) in &map {
            let s = |k: &str| entry.get(k).and_then(Value::as_str);
            let resolve = |p: &str| {
                let p = PathBuf::from(p);
                if p.is_absolute() || p.exists() {
                    p
                } else {
                    parent.join(p)
                }
            };
            let annotation = s("annotation")
                .map(resolve)
                .ok_or_else(|| meta(&format!("{name}.annotation"), "missing or not a string".into()))?;
            let root = match (s("root"), folder) {
                (Some(r), _) => resolve(r),
                (None, Some(f)) => f.to_path_buf(),
                (None, None) => parent.clone(),
            };
            let repeat = match entry.get("repeat_time") {
                None | Some(Value::Null) => 1.0,
                Some(x) => x
                    .as_f64()
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| meta(&format!("{name}.repeat_time"), "expected a number above 0".into()))?,
            };
            if repeat > 1.0 && repeat.fract() != 0.0 {
                return Err(meta(
                    &format!("{name}.repeat_time"),
                    format!("{repeat}: above 1 it must be a whole number"),
                ));
            }
            let (mut good, bad) = read_jsonl(&annotation, &root)?;
            if repeat < 1.0 {
                good.truncate((good.len() as f64 * repeat) as usize);
            } else if repeat > 1.0 {
                let once = good.clone();
                for _ in 1..repeat as usize {
                    good.extend(once.iter().cloned());
                }
            }
            out.records.extend(good);
            out.bad.extend(bad);
        }
    }
    if out.records.is_empty() {
        return Err(RecordsError::Empty { path: path.to_path_buf() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_kinds() {
        let root = Path::new("/data");
        let f = Path::new("t.jsonl");
        let r = parse_line(
            r#"{"image":"a.png","conversations":[{"from":"human","value":"<image>\nhi"},{"from":"gpt","value":"yo"}]}"#,
            root,
            f,
            3,
        )
        .unwrap();
        assert_eq!(r.images, ["a.png"]);
        assert_eq!(r.line, 3);
        let r = parse_line(r#"{"image":["a.png","b.jpg"],"conversations":[{"from":"human","value":"x"}]}"#, root, f, 1)
            .unwrap();
        assert_eq!(r.images.len(), 2);
        let r = parse_line(r#"{"video":"v.mp4","conversations":[{"from":"human","value":"x"}]}"#, root, f, 1).unwrap();
        assert_eq!(r.video.as_deref(), Some("v.mp4"));
        let r = parse_line(
            r#"{"id":7,"conversations":[{"from":"system","value":"s"},{"from":"human","value":"x"}]}"#,
            root,
            f,
            1,
        )
        .unwrap();
        assert!(r.images.is_empty() && r.video.is_none());
    }

    #[test]
    fn bad_lines_name_file_line_and_key() {
        let root = Path::new("/data");
        let f = Path::new("t.jsonl");
        let e = parse_line("{not json", root, f, 9).unwrap_err();
        assert!(e.to_string().starts_with("t.jsonl:9: not a chat record"), "{e}");
        let e = parse_line(r#"{"conversations":[{"from":"bot","value":"x"}]}"#, root, f, 2).unwrap_err();
        assert!(e.to_string().contains("conversations[0].from"), "{e}");
        let e = parse_line(r#"{"conversations":[]}"#, root, f, 2).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = parse_line(r#"{"image":"a","video":"b","conversations":[{"from":"human","value":"x"}]}"#, root, f, 2)
            .unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
    }

    #[test]
    fn meta_json_repeat_and_fraction() {
        let dir = tempfile::tempdir().unwrap();
        let line = |i: usize| {
            format!(r#"{{"conversations":[{{"from":"human","value":"q{i}"}},{{"from":"gpt","value":"a"}}]}}"#)
        };
        let a: Vec<String> = (0..4).map(line).collect();
        std::fs::write(dir.path().join("a.jsonl"), a.join("\n") + "\nbroken\n").unwrap();
        std::fs::write(dir.path().join("b.jsonl"), line(9)).unwrap();
        std::fs::write(
            dir.path().join("meta.json"),
            r#"{"a": {"root": "imgs", "annotation": "a.jsonl", "repeat_time": 0.5, "data_augment": false, "length": 4},
                "b": {"annotation": "b.jsonl", "repeat_time": 3}}"#,
        )
        .unwrap();
        let l = load(&dir.path().join("meta.json"), None).unwrap();
        assert_eq!(l.records.len(), 2 + 3);
        assert_eq!(l.bad.len(), 1);
        assert_eq!(l.bad[0].line, 5);
        assert_eq!(l.records[0].root, dir.path().join("imgs"));
        assert_eq!(l.records[4].conversations[0].value, "q9");
        std::fs::write(dir.path().join("m2.json"), r#"{"a": {"root": "x"}}"#).unwrap();
        let e = load(&dir.path().join("m2.json"), None).unwrap_err().to_string();
        assert!(e.contains("key a.annotation"), "{e}");
        std::fs::write(dir.path().join("m3.json"), r#"{"a": {"annotation": "a.jsonl", "repeat_time": 1.5}}"#).unwrap();
        let e = load(&dir.path().join("m3.json"), None).unwrap_err().to_string();
        assert!(e.contains("a.repeat_time"), "{e}");
    }
}
