//! A fast reader for the block-style YAML subset that `kubectl get -o yaml` prints (and that
//! typical hand-written manifests use), so that large dumps do not spend a second in the
//! general YAML parser.
//!
//! It reads one chunk of [`super::yaml_chunks`] into the same `serde_json::Value`s that
//! serde-saphyr produces with [`super::yaml_options`], or **declines** (`None`): then the
//! caller parses the chunk with serde-saphyr, so every error message and every YAML feature
//! stays exactly as before. It only accepts what it understands with certainty:
//!
//! - block mappings and sequences (including the compact `- key: v` form and sequences at
//!   the same indent as their key), comments, blank lines, one leading `---`, a `...` end;
//! - keys: plain (`[A-Za-z0-9][A-Za-z0-9._/:-]*`, no `: ` inside, that reads as a string)
//!   or quoted;
//! - values: `null`/`Null`/`NULL`/`~`/empty, `true`/`True`/`TRUE`/`false`/..., decimal
//!   integers that fit 64 bits (`-0` too), decimal spellings with a leading zero (strings, as
//!   `leading_zero_numbers_as_strings` makes them), plain strings of a safe character set that
//!   are no other form, single- and double-quoted strings on one line (the escapes serde-saphyr
//!   was checked for), `{}`, `[]`, and `|` / `|-` block scalars;
//! - everything else declines: floats, `0x`/`0o`/`+`/`_` numbers, `.inf`, anchors, aliases,
//!   tags, `?` keys, flow collections, multi-line plain or quoted scalars, `>`, tabs, `\r`,
//!   control characters, directives, duplicate keys (serde-saphyr refuses them), nesting
//!   deeper than [`MAX_DEPTH`].
//!
//! Bounded: one pass over the lines, recursion only per nesting level and at most
//! [`MAX_DEPTH`] deep, no panics (every index is checked). Tested differentially against
//! serde-saphyr (`tests` below and `palisade-fuzz`'s `manifests_fastyaml` target).

use serde_json::{Map, Value};

/// Deepest nesting of mappings and sequences read here (serde-saphyr's budget is 64; k8s
/// objects nest about 12 deep). Deeper chunks go to serde-saphyr and its budget.
pub(crate) const MAX_DEPTH: usize = 32;

/// Longest key read here (serde-saphyr refuses simple keys longer than 1024 bytes).
const MAX_KEY: usize = 256;

/// Reads one chunk (at most one document) or declines.
pub(crate) fn parse_chunk(chunk: &str) -> Option<Vec<Value>> {
    if !chunk_is_plain_text(chunk) {
        return None;
    }
    let mut lines: Vec<&str> = chunk.split('\n').collect();
    // The chunk ends with '\n' (checked), so the last piece is empty.
    lines.pop();
    let mut start = 0;
    // A leading `---` marker (comments and blank lines may precede it).
    while start < lines.len() && is_blank_or_comment(lines[start]) {
        start += 1;
    }
    if let Some(l) = lines.get(start) {
        if let Some(rest) = l.strip_prefix("---") {
            if !rest.trim_start_matches(' ').is_empty() {
                return None;
            }
            start += 1;
        }
    }
    // A `...` end marker: only comments and blank lines may follow it in this chunk.
    let mut end = lines.len();
    for (i, l) in lines.iter().enumerate().skip(start) {
        if l.starts_with("---") {
            return None;
        }
        if let Some(after) = l.strip_prefix("...") {
            if !after.trim_start_matches(' ').is_empty()
                || !lines[i + 1..].iter().all(|l| is_blank_or_comment(l))
            {
                return None;
            }
            end = i;
            break;
        }
    }
    let mut p = Reader {
        lines: &lines[..end],
        pos: start,
    };
    let Some((indent, _)) = p.peek() else {
        return Some(Vec::new());
    };
    let doc = p.node(indent, 0)?;
    if p.peek().is_some() {
        return None;
    }
    Some(vec![doc])
}

/// No control characters but `\n` (so no tabs, no `\r`), ends with a line break, no
/// characters outside ASCII that YAML does not print (C1 controls, U+FFFE, U+FFFF) or treats
/// specially (byte order mark, NEL, line and paragraph separators).
fn chunk_is_plain_text(chunk: &str) -> bool {
    if !chunk.ends_with('\n') || chunk.len() > 64 * 1024 * 1024 {
        return false;
    }
    let mut ascii = true;
    for &b in chunk.as_bytes() {
        if (b < 0x20 && b != b'\n') || b == 0x7f {
            return false;
        }
        ascii &= b.is_ascii();
    }
    ascii
        || !chunk.chars().any(|c| {
            matches!(
                c,
                '\u{80}'
                    ..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
            )
        })
}

fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim_start_matches(' ');
    t.is_empty() || t.starts_with('#')
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_seq_item(t: &str) -> bool {
    t == "-" || t.starts_with("- ")
}

struct Reader<'a, 'b> {
    lines: &'b [&'a str],
    pos: usize,
}

/// What the text of a mapping entry or sequence item starts with.
enum Entry<'a> {
    Key(String, &'a str),
    NotKey,
}

impl<'a> Reader<'a, '_> {
    /// The next line with content (skipping blank and comment lines): its indent and text.
    fn peek(&mut self) -> Option<(usize, &'a str)> {
        while let Some(&l) = self.lines.get(self.pos) {
            if !is_blank_or_comment(l) {
                let i = indent_of(l);
                return Some((i, &l[i..]));
            }
            self.pos += 1;
        }
        None
    }

    /// The block node whose first line (the current one) is at `indent`.
    fn node(&mut self, indent: usize, depth: usize) -> Option<Value> {
        if depth >= MAX_DEPTH {
            return None;
        }
        let (_, text) = self.peek()?;
        if is_seq_item(text) {
            self.seq(indent, depth)
        } else {
            self.pos += 1;
            self.map(indent, text, depth)
        }
    }

    /// A block mapping at column `col` whose first entry's text is `first` (already consumed).
    fn map(&mut self, col: usize, first: &'a str, depth: usize) -> Option<Value> {
        let mut m = Map::new();
        let mut text = first;
        loop {
            let Entry::Key(key, rest) = entry(text)? else {
                return None;
            };
            if m.contains_key(&key) {
                return None;
            }
            let value = self.value_after_key(col, rest, depth)?;
            m.insert(key, value);
            match self.peek() {
                Some((i, t)) if i == col && !is_seq_item(t) => {
                    self.pos += 1;
                    text = t;
                }
                Some((i, _)) if i >= col => return None,
                _ => break,
            }
        }
        Some(Value::Object(m))
    }

    /// A block sequence whose items start at column `col` (the current line is one).
    fn seq(&mut self, col: usize, depth: usize) -> Option<Value> {
        let mut items = Vec::new();
        loop {
            match self.peek() {
                Some((i, t)) if i == col && is_seq_item(t) => {
                    self.pos += 1;
                    let after = &t[1..];
                    let r = after.trim_start_matches(' ');
                    let item_col = col + 1 + (after.len() - r.len());
                    let item = if r.is_empty() || r.starts_with('#') {
                        match self.peek() {
                            Some((i2, _)) if i2 > col => self.node(i2, depth + 1)?,
                            _ => return None,
                        }
                    } else if is_seq_item(r) {
                        return None;
                    } else {
                        match entry(r)? {
                            Entry::Key(..) => self.map(item_col, r, depth + 1)?,
                            Entry::NotKey => {
                                let v = inline_scalar(r)?;
                                self.no_continuation(col)?;
                                v
                            }
                        }
                    };
                    items.push(item);
                }
                Some((i, _)) if i > col => return None,
                _ => break,
            }
        }
        Some(Value::Array(items))
    }

    /// The value of a mapping entry at column `col`, `rest` being the text after its `:`.
    fn value_after_key(&mut self, col: usize, rest: &'a str, depth: usize) -> Option<Value> {
        let r = rest.trim_start_matches(' ');
        if r.is_empty() || r.starts_with('#') {
            return match self.peek() {
                Some((i, _)) if i > col => self.node(i, depth + 1),
                Some((i, t)) if i == col && is_seq_item(t) => {
                    if depth + 1 >= MAX_DEPTH {
                        return None;
                    }
                    self.seq(col, depth + 1)
                }
                _ => Some(Value::Null),
            };
        }
        let r = r.trim_end_matches(' ');
        if r == "|" || r == "|-" {
            return self.block_scalar(col, r == "|-");
        }
        let v = inline_scalar(r)?;
        self.no_continuation(col)?;
        Some(v)
    }

    /// After a one-line scalar: a more indented line would continue it (multi-line plain
    /// scalar) or be an error; decline both.
    fn no_continuation(&mut self, col: usize) -> Option<()> {
        match self.peek() {
            Some((i, _)) if i > col => None,
            _ => Some(()),
        }
    }

    /// A `|` (clip) or `|-` (strip) literal block scalar of an entry at column `col`,
    /// starting at the current line. Declines leading empty lines, an empty scalar, lines
    /// of only spaces longer than the indent (content in YAML), and bad indentation.
    fn block_scalar(&mut self, col: usize, strip: bool) -> Option<Value> {
        let first = *self.lines.get(self.pos)?;
        let indent = indent_of(first);
        if indent <= col || indent == first.len() {
            return None;
        }
        let mut content: Vec<&str> = Vec::new();
        while let Some(&l) = self.lines.get(self.pos) {
            let i = indent_of(l);
            if i == l.len() {
                if i > indent {
                    return None;
                }
                content.push("");
            } else if i >= indent {
                content.push(&l[indent..]);
            } else if i > col {
                return None;
            } else {
                break;
            }
            self.pos += 1;
        }
        while content.last() == Some(&"") {
            content.pop();
        }
        let mut s = content.join("\n");
        if !strip {
            s.push('\n');
        }
        Some(Value::String(s))
    }
}

/// Splits the text of a mapping entry into its key and the text after `: `, says it is no
/// key (a sequence item's scalar), or declines (`None`).
fn entry(text: &str) -> Option<Entry<'_>> {
    let b = text.as_bytes();
    if let Some(&q) = b.first().filter(|&&q| q == b'"' || q == b'\'') {
        let (key, after) = if q == b'"' {
            double_quoted(text)?
        } else {
            single_quoted(text)?
        };
        return match after.strip_prefix(':') {
            Some(rest) if rest.is_empty() || rest.starts_with(' ') => {
                (key.len() <= MAX_KEY).then_some(Entry::Key(key, rest))
            }
            Some(_) => None,
            None => Some(Entry::NotKey),
        };
    }
    // Key characters; a `:` not followed by a space is part of the key (managedFields'
    // `f:metadata`).
    let key_byte = |i: usize| {
        let c = b[i];
        c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'/')
            || (c == b':' && b.get(i + 1).is_some_and(|&d| d != b' '))
    };
    let n = (0..b.len()).find(|&i| !key_byte(i)).unwrap_or(b.len());
    let is_key = n > 0
        && n <= MAX_KEY
        && b[0].is_ascii_alphanumeric()
        && b.get(n) == Some(&b':')
        && matches!(b.get(n + 1), None | Some(b' '));
    if is_key {
        let key = &text[..n];
        // `1:`, `true:` or `null:` would be typed keys; leave them to serde-saphyr.
        return match plain(key)? {
            Value::String(_) => Some(Entry::Key(key.to_string(), &text[n + 1..])),
            _ => None,
        };
    }
    if text.contains(": ") || text.ends_with(':') {
        None
    } else {
        Some(Entry::NotKey)
    }
}

/// A scalar that is the rest of its line (after `key: ` or `- `): quoted, `{}`, `[]` or
/// plain, with an optional trailing comment.
fn inline_scalar(r: &str) -> Option<Value> {
    let quoted = match r.as_bytes().first()? {
        b'"' => Some(double_quoted(r)?),
        b'\'' => Some(single_quoted(r)?),
        _ => None,
    };
    if let Some((s, after)) = quoted {
        let t = after.trim_start_matches(' ');
        let ok =
            after.is_empty() || (after.starts_with(' ') && (t.is_empty() || t.starts_with('#')));
        return ok.then_some(Value::String(s));
    }
    let p = match r.find(" #") {
        Some(i) => &r[..i],
        None => r,
    }
    .trim_end_matches(' ');
    match p {
        "{}" => return Some(Value::Object(Map::new())),
        "[]" => return Some(Value::Array(Vec::new())),
        "~" => return Some(Value::Null),
        _ => {}
    }
    let safe = p.bytes().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                b' ' | b'-' | b'.' | b'_' | b'/' | b':' | b'=' | b'+' | b'(' | b')' | b',' | b'@'
            )
    });
    if !safe || p.contains(": ") || p.ends_with(':') {
        return None;
    }
    plain(p)
}

/// The type serde-saphyr gives a plain scalar `p` (safe characters, trimmed), or `None`
/// where it is not this reader's to say. Names, words and decimal integers are typed here;
/// other spellings that start with a digit (versions, uids, `0x1f`, `1e3`, `1_000`) and the
/// words a float parser knows (`inf`, `nan`) are typed by serde-saphyr itself, one scalar
/// at a time, so they can never differ.
fn plain(p: &str) -> Option<Value> {
    match p {
        "null" | "Null" | "NULL" | "~" => return Some(Value::Null),
        "true" | "True" | "TRUE" => return Some(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Some(Value::Bool(false)),
        _ => {}
    }
    let b = p.as_bytes();
    let first = *b.first()?;
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    if first.is_ascii_alphabetic() || first == b'/' {
        let special = ["inf", "infinity", "nan"]
            .iter()
            .any(|s| p.eq_ignore_ascii_case(s));
        return if special {
            typed_by_general_parser(p)
        } else {
            Some(Value::String(p.to_string()))
        };
    }
    let (negative, unsigned) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    if !digits(unsigned) {
        return if first.is_ascii_digit() {
            dotted_quad_or_general(p)
        } else {
            None
        };
    }
    if unsigned.len() > 1 && unsigned[0] == b'0' {
        // `leading_zero_numbers_as_strings`: `007`, `-01`.
        return Some(Value::String(p.to_string()));
    }
    if negative {
        p.parse::<i64>().ok().map(Value::from)
    } else {
        p.parse::<u64>().ok().map(Value::from)
    }
}

/// Dotted digits such as `10.244.1.5` (no number has two dots; unquoted pod and node IPs
/// are common in dumps) are strings; other digit-first spellings go to serde-saphyr.
fn dotted_quad_or_general(p: &str) -> Option<Value> {
    let b = p.as_bytes();
    let dotted = b.iter().all(|c| c.is_ascii_digit() || *c == b'.')
        && b.iter().filter(|&&c| c == b'.').count() >= 2
        && !p.contains("..")
        && !p.ends_with('.');
    if dotted {
        Some(Value::String(p.to_string()))
    } else {
        typed_by_general_parser(p)
    }
}

/// serde-saphyr's own reading of one plain scalar (with the options of every chunk).
fn typed_by_general_parser(p: &str) -> Option<Value> {
    let mut text = String::with_capacity(p.len() + 1);
    text.push_str(p);
    text.push('\n');
    let mut docs = super::yaml_general(&text).ok()?;
    match (docs.pop(), docs.is_empty()) {
        (Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null)), true) => {
            Some(v)
        }
        _ => None,
    }
}

/// A single-quoted scalar closed on this line: its value and the text after it.
fn single_quoted(r: &str) -> Option<(String, &str)> {
    let body = r.strip_prefix('\'')?;
    let mut out = String::new();
    let mut rest = body;
    loop {
        let i = rest.find('\'')?;
        out.push_str(&rest[..i]);
        if rest[i + 1..].starts_with('\'') {
            out.push('\'');
            rest = &rest[i + 2..];
        } else {
            return Some((out, &rest[i + 1..]));
        }
    }
}

/// A double-quoted scalar closed on this line, with the escapes checked against
/// serde-saphyr (`\\ \" \/ \n \t \r \0 \a \b \e \f \v`, `\xXX` below 0x80, `\uXXXX`,
/// `\UXXXXXXXX`); others (`\N \_ \L \P`, `\ `, a line-end `\`) decline.
fn double_quoted(r: &str) -> Option<(String, &str)> {
    let body = r.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &body[i + 1..])),
            '\\' => {
                let (_, e) = chars.next()?;
                let simple = match e {
                    '\\' => Some('\\'),
                    '"' => Some('"'),
                    '/' => Some('/'),
                    'n' => Some('\n'),
                    't' => Some('\t'),
                    'r' => Some('\r'),
                    '0' => Some('\0'),
                    'a' => Some('\u{7}'),
                    'b' => Some('\u{8}'),
                    'e' => Some('\u{1b}'),
                    'f' => Some('\u{c}'),
                    'v' => Some('\u{b}'),
                    _ => None,
                };
                if let Some(s) = simple {
                    out.push(s);
                    continue;
                }
                let len = match e {
                    'x' => 2,
                    'u' => 4,
                    'U' => 8,
                    _ => return None,
                };
                let mut code = 0u32;
                for _ in 0..len {
                    let (_, h) = chars.next()?;
                    code = code * 16 + h.to_digit(16)?;
                }
                if e == 'x' && code >= 0x80 {
                    return None;
                }
                out.push(char::from_u32(code)?);
            }
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests;
