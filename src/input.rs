//! Input hygiene shared by every file the launcher reads (cluster files, recipes, hostfiles):
//! a leading UTF-8 byte order mark, characters that must never reach a host name, address or
//! user name, and a cheap bound on YAML nesting checked before the parser sees the text.
//!
//! Pure functions over text; they return positions, and the loaders turn them into located
//! [`ConfigError`](crate::diag::ConfigError)s.
//!
//! Pitfall: the nesting scan is a guard, not a parser. It must never count less than the
//! parser would nest (that is what it protects against: libyaml takes about a minute on
//! 100,000 levels of `[`), so wherever the text is ambiguous to it, it counts more.

/// The deepest nesting of YAML collections accepted. Cluster files and recipes use about five
/// levels; serde_yaml_ng gives up at 128 too, but only after the whole text has been parsed.
pub const MAX_YAML_DEPTH: usize = 128;

/// The text without a leading UTF-8 byte order mark (Windows editors write one).
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Why a character is refused in host names, addresses and user names.
pub fn unsafe_char_kind(c: char) -> Option<&'static str> {
    match c {
        '\u{1b}' => Some("an escape character"),
        c if c.is_control() => Some("a control character"), // C0, DEL and C1
        '\u{200b}'..='\u{200d}' | '\u{2060}' | '\u{feff}' => Some("a zero-width character"),
        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{61c}' => {
            Some("a bidirectional control character")
        }
        // Invisible (default-ignorable) characters and line/paragraph separators.
        '\u{ad}' | '\u{180e}' | '\u{2061}'..='\u{2064}' | '\u{fe00}'..='\u{fe0f}' | '\u{e0000}'..='\u{e007f}' => {
            Some("an invisible character")
        }
        '\u{2028}' | '\u{2029}' => Some("a line or paragraph separator"),
        _ => None,
    }
}

/// The first refused character of `value`: its 1-based character index, and a description
/// that names it by code point (`U+001B, an escape character`), never by the character itself.
pub fn find_unsafe_char(value: &str) -> Option<(usize, String)> {
    value
        .chars()
        .enumerate()
        .find_map(|(i, c)| unsafe_char_kind(c).map(|kind| (i + 1, format!("U+{:04X}, {kind}", c as u32))))
}

/// The hint for a refused character.
pub const UNSAFE_CHAR_HINT: &str = "host names, addresses and user names cannot hold control, zero-width or \
     bidirectional-control characters (they hide in text pasted from web pages and chats): retype the value";

/// `character N is U+XXXX, a …` for the first refused character of `value`.
pub fn unsafe_char_message(value: &str) -> Option<(usize, String)> {
    find_unsafe_char(value).map(|(index, what)| (index, format!("character {index} is {what}")))
}

/// Where the text first nests collections deeper than `limit` (1-based line and column), or
/// None. Counts flow collections (`[`, `{`) outside quoted scalars and comments, plus block
/// levels: the indentation levels open above a line and its compact `- ` / `? ` entries.
pub fn yaml_depth_exceeded(text: &str, limit: usize) -> Option<(usize, usize)> {
    let mut scan = DepthScan::default();
    scan.run(text, limit).or_else(|| raw_nesting_exceeded(text, RAW_NESTING_LIMIT))
}

/// The backstop's bound: far above any real file, far below what makes the parser slow.
pub const RAW_NESTING_LIMIT: usize = 1024;

/// A backstop no parsing mistake of [`DepthScan`] can hide: the running depth of `[`/`{` minus
/// `]`/`}` over the raw text (quotes and comments included, so it may only count more), and the
/// `- ` entries on one line (`- - - x` nests without brackets). Any of `\n`, `\r`, U+0085,
/// U+2028, U+2029 ends a line, as for libyaml.
fn raw_nesting_exceeded(text: &str, limit: usize) -> Option<(usize, usize)> {
    let (mut depth, mut dashes, mut line, mut column) = (0usize, 0usize, 1usize, 0usize);
    let mut prev = ' ';
    for c in text.chars() {
        column += 1;
        match c {
            '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => {
                line += 1;
                column = 0;
                dashes = 0;
            }
            '[' | '{' => depth += 1,
            ']' | '}' => depth = depth.saturating_sub(1),
            ' ' | '\t' if prev == '-' => dashes += 1,
            _ => {}
        }
        if depth > limit || dashes > limit {
            return Some((line, column));
        }
        prev = c;
    }
    None
}

#[derive(Default)]
struct DepthScan {
    /// Open flow collections.
    flow: usize,
    /// Indentation of the open block levels, outermost first.
    indents: Vec<usize>,
    /// Inside a quoted scalar: its quote character.
    quote: Option<char>,
    /// The previous line ended inside a block plain scalar, which the next line may continue.
    plain_open: bool,
    /// Indentation of the line that opened a block scalar (`|`, `>`): deeper lines are text.
    block_scalar: Option<usize>,
}

impl DepthScan {
    fn run(&mut self, text: &str, limit: usize) -> Option<(usize, usize)> {
        for (index, line) in text.split('\n').enumerate() {
            if let Some(column) = self.line(line, limit) {
                return Some((index + 1, column));
            }
        }
        None
    }

    /// Scans one line; Some(column) where the depth first passes `limit`.
    fn line(&mut self, line: &str, limit: usize) -> Option<usize> {
        let chars: Vec<char> = line.trim_end_matches('\r').chars().collect();
        let indent = chars.iter().take_while(|c| **c == ' ').count();
        let blank = chars[indent..].iter().all(|c| c.is_whitespace()) || chars.get(indent) == Some(&'#');
        if let Some(parent) = self.block_scalar {
            if self.quote.is_none() && (blank || indent > parent) {
                return None; // text of a `|` or `>` scalar
            }
            self.block_scalar = None;
        }
        let in_block = self.flow == 0 && self.quote.is_none();
        // A block line: its level is the number of open indentation levels above it.
        let mut block = 0;
        if in_block && !blank {
            while self.indents.last().is_some_and(|&i| i >= indent) {
                self.indents.pop();
            }
            self.indents.push(indent);
            block = self.indents.len();
            if block > limit {
                return Some(indent + 1);
            }
        }
        // At the start of a node a quote opens a quoted scalar and `[`/`{` a flow collection;
        // anywhere else in a block plain scalar they are text. A line that may continue the
        // previous line's plain scalar does not start a node (counting its brackets is safe:
        // only skipping text as quoted could hide real nesting).
        let mut node_start = in_block && (blank || !self.plain_open);
        let mut after_quote = false;
        let mut i = indent;
        let mut prev_space = true;
        // `--- [..]`: a document marker, and the document's node after it.
        let marker = chars.len() >= indent + 3 && chars[indent..indent + 3].iter().all(|c| *c == '-');
        if in_block && indent == 0 && marker && chars.get(3).is_none_or(|c| *c == ' ' || *c == '\t') {
            i = 3;
            node_start = true;
        }
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            let next_blank = next.is_none_or(|n| n == ' ' || n == '\t');
            if let Some(q) = self.quote {
                match (q, c) {
                    ('"', '\\') => i += 1,
                    ('\'', '\'') if next == Some('\'') => i += 1,
                    _ if c == q => {
                        self.quote = None;
                        after_quote = true;
                        node_start = false;
                    }
                    _ => {}
                }
                i += 1;
                prev_space = false;
                continue;
            }
            let in_flow = self.flow > 0;
            match c {
                ' ' | '\t' => {
                    prev_space = true;
                    i += 1;
                    continue;
                }
                '#' if prev_space => break, // a comment
                '"' | '\'' if node_start => self.quote = Some(c),
                '[' | '{' if node_start || in_flow => {
                    self.flow += 1;
                    if block + self.flow > limit {
                        return Some(i + 1);
                    }
                    node_start = true;
                }
                ']' | '}' if in_flow => {
                    self.flow -= 1;
                    node_start = false;
                    after_quote = true; // `{a: [x]: y}`-style `:` may follow directly
                }
                ',' if in_flow => node_start = true,
                '-' | '?' if node_start && !in_flow && next_blank => {
                    block += 1;
                    if block + self.flow > limit {
                        return Some(i + 1);
                    }
                }
                '?' if node_start && next_blank => {}
                ':' if next_blank || (in_flow && after_quote) => node_start = true,
                '&' | '!' if node_start => {
                    // An anchor or a tag: the node itself follows it.
                    while i + 1 < chars.len() && !matches!(chars[i + 1], ' ' | '\t' | ',' | '[' | ']' | '{' | '}') {
                        i += 1;
                    }
                }
                '|' | '>' if node_start && !in_flow => {
                    // A block scalar header: indicators, then blanks, then the end or a comment
                    // (checked in place: copying the rest of the line made long lines quadratic).
                    let mut j = i + 1;
                    while j < chars.len() && matches!(chars[j], '+' | '-' | '1'..='9') {
                        j += 1;
                    }
                    while j < chars.len() && matches!(chars[j], ' ' | '\t') {
                        j += 1;
                    }
                    if j == chars.len() || (chars[j] == '#' && j > i + 1 && matches!(chars[j - 1], ' ' | '\t')) {
                        self.block_scalar = Some(indent);
                        self.plain_open = false;
                        return None;
                    }
                    node_start = false;
                }
                _ => {
                    node_start = false;
                    after_quote = false;
                }
            }
            prev_space = false;
            i += 1;
        }
        if self.flow == 0 && self.quote.is_none() {
            // The line ended in a value that a deeper line may continue (a plain scalar), or
            // in `key:` / `-` whose value follows on the next lines.
            self.plain_open = !node_start && !blank;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the review found past the line scan: the raw backstop refuses each (limit 1024).
    #[test]
    fn the_backstop_catches_what_the_line_scan_misses() {
        let deep = "[".repeat(2000);
        for text in [
            format!("hosts:\n  - a\n  - {deep}"),
            format!("- \"a\"\n- {deep}"),
            format!("a: foo\n\n  'bar\nb: {deep}"),
            format!("a: !<tag:yaml.org,2002:seq> {deep}"),
            format!("a: |\t# c\n  x:\n  '\nb: {deep}"),
            format!("hosts:\r  - a\r  - {deep}"),
            format!("{}x", "- ".repeat(2000)),
        ] {
            assert!(yaml_depth_exceeded(&text, MAX_YAML_DEPTH).is_some(), "{:?}", &text[..40.min(text.len())]);
        }
        // Long but shallow files pass: 5,000 list items, brackets balanced line by line.
        let items: String = (0..5000).map(|i| format!("- [{i}, {{a: b}}]\n")).collect();
        assert!(yaml_depth_exceeded(&items, MAX_YAML_DEPTH).is_none());
        // Block scalar headers are checked in place: 40,000 `|x: ` on one line stays fast.
        let line = format!("a: {}", "|x: ".repeat(40_000));
        let t = std::time::Instant::now();
        let _ = yaml_depth_exceeded(&line, MAX_YAML_DEPTH);
        eprintln!("40,000 `|` on one line scanned in {:?}", t.elapsed());
    }

    #[test]
    fn invisible_and_bidi_marks_and_separators_are_refused() {
        for c in
            ['\u{200e}', '\u{200f}', '\u{61c}', '\u{ad}', '\u{180e}', '\u{2062}', '\u{fe0f}', '\u{e0041}', '\u{2028}']
        {
            let value = format!("node{c}1");
            let (index, what) = find_unsafe_char(&value).unwrap_or_else(|| panic!("U+{:04X} accepted", c as u32));
            assert_eq!(index, 5);
            assert!(what.starts_with(&format!("U+{:04X}", c as u32)), "{what}");
        }
        assert!(find_unsafe_char("fe80::1%eth0").is_none() && find_unsafe_char("node-01.example").is_none());
    }

    fn depth_ok(text: &str) -> bool {
        yaml_depth_exceeded(text, 3).is_none()
    }

    #[test]
    fn bom_is_stripped_once_and_only_at_the_start() {
        assert_eq!(strip_bom("\u{feff}a: 1"), "a: 1");
        assert_eq!(strip_bom("a\u{feff}"), "a\u{feff}");
        assert_eq!(strip_bom("\u{feff}\u{feff}a"), "\u{feff}a");
    }

    #[test]
    fn unsafe_characters_are_named_by_code_point() {
        assert_eq!(find_unsafe_char("node1"), None);
        assert_eq!(find_unsafe_char("nodé-1.example"), None);
        assert_eq!(find_unsafe_char("ab\u{1b}[31m").unwrap(), (3, "U+001B, an escape character".into()));
        assert_eq!(find_unsafe_char("a\u{7f}").unwrap().1, "U+007F, a control character");
        assert_eq!(find_unsafe_char("a\u{85}").unwrap().1, "U+0085, a control character");
        assert_eq!(find_unsafe_char("\tx").unwrap(), (1, "U+0009, a control character".into()));
        for c in ['\u{200b}', '\u{200c}', '\u{200d}', '\u{2060}', '\u{feff}'] {
            let (i, what) = find_unsafe_char(&format!("n{c}1")).unwrap();
            assert_eq!((i, what), (2, format!("U+{:04X}, a zero-width character", c as u32)));
        }
        for c in ['\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}', '\u{2066}', '\u{2069}'] {
            assert!(find_unsafe_char(&c.to_string()).unwrap().1.ends_with("a bidirectional control character"));
        }
    }

    #[test]
    fn depth_counts_flow_and_block_levels() {
        assert_eq!(yaml_depth_exceeded("a: [[[[x]]]]\n", 3), Some((1, 6)));
        assert_eq!(yaml_depth_exceeded("a:\n  b:\n    c:\n      d: 1\n", 3), Some((4, 7)));
        assert_eq!(yaml_depth_exceeded("- - - - x\n", 3), Some((1, 5)));
        assert_eq!(yaml_depth_exceeded("--- [[[x]]]\n", 3), Some((1, 7)));
        assert_eq!(yaml_depth_exceeded("a: &x !!seq [[[x]]]\n", 3), Some((1, 15)));
        assert!(depth_ok("a: [[x]]\nb: [[y]]\nc: {d: [1, 2]}\n"));
        assert!(depth_ok("a:\n  b: 1\nc:\n  d: 1\n"));
    }

    #[test]
    fn brackets_in_text_are_not_nesting() {
        // Quoted scalars, comments, plain scalars and block scalars hold text, not collections.
        assert!(depth_ok("a: '[[[[['\nb: \"[[[[\\\"[[\"\nc: x[[[[[\n# [[[[[\nd: [1] # [[[[[\n"));
        assert!(depth_ok("setup: |\n  [[[[[ -f x ]]]]]\n  '\nnext: ok\n"));
        assert!(depth_ok("a: ['it''s [[[[', \"]]]]\"]\n"));
    }

    #[test]
    fn ambiguous_text_counts_more_never_less() {
        // An apostrophe inside a plain scalar does not hide the nesting after it.
        assert!(!depth_ok("a: don't\nb: [[[[x]]]]\n"));
        assert!(!depth_ok("a: foo\n  'bar\nb: [[[[x]]]]\n"));
        assert!(!depth_ok("a: x, 'y\nb: [[[[x]]]]\n"));
        // A quoted scalar in a flow collection may span lines: its brackets are text.
        assert!(depth_ok("a: [x, 'y\n[[[['\n]\n"));
    }

    #[test]
    fn a_hundred_thousand_levels_are_found_at_once() {
        let n = 100_000;
        let text = format!("hosts: {}{}\n", "[".repeat(n), "]".repeat(n));
        assert_eq!(yaml_depth_exceeded(&text, MAX_YAML_DEPTH), Some((1, 8 + MAX_YAML_DEPTH - 1)));
    }
}
