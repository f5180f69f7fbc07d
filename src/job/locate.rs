//! From byte offsets in a TOML text to what a user needs to find the mistake: a line number and
//! a dotted field name (`engine.bucket_size`, `campaign "spring".audience.min_level`).
//!
//! serde and toml report a byte span and a message but not the key path, so the path is
//! recovered from the text: the table header above the offset and the keys on its line.

use serde::de::DeserializeOwned;

use crate::error::{Error, InputError, Result};

/// How the text is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// A job file: `[inputs]`, `[engine]`, …, `[[campaign]]` tables.
    Job,
    /// The inside of one campaign table: `id = …` at the top, `[audience]`, `[coupon]`, ….
    Bare,
}

/// A TOML text being read, with the name errors give it.
pub(super) struct Doc<'a> {
    /// The file (or stream entry) as the user knows it.
    pub label: &'a str,
    text: &'a str,
    shape: Shape,
}

impl<'a> Doc<'a> {
    /// A text named `label`, laid out as `shape`.
    pub fn new(label: &'a str, text: &'a str, shape: Shape) -> Self {
        Doc { label, text, shape }
    }

    /// The 1-based line holding byte `offset`.
    pub fn line(&self, offset: usize) -> u64 {
        line_of(self.text, offset)
    }

    /// A bad value at byte `offset` in `field`.
    pub fn error(&self, offset: usize, field: impl Into<String>, msg: impl Into<String>) -> Error {
        InputError::new(self.label, Some(self.line(offset)), field, msg).into()
    }

    /// Deserializes the whole text; a toml or serde error names its line and field.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T> {
        toml::from_str(self.text).map_err(|e| {
            // toml's messages may run over lines (syntax errors list what was expected).
            let msg = e.message().trim().replace('\n', "; ");
            match e.span() {
                Some(span) => self.error(span.start, self.field_at(span.start, &msg), msg),
                None => InputError::new(self.label, None, "", msg).into(),
            }
        })
    }

    /// The dotted path of the value at `offset`, as well as the text tells it.
    fn field_at(&self, offset: usize, msg: &str) -> String {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[line_start..]
            .find('\n')
            .map_or(self.text.len(), |i| line_start + i);
        // The table header in force at `offset` and, inside campaigns, which one.
        let (mut table, mut index) = match self.shape {
            Shape::Job => (Vec::new(), None),
            Shape::Bare => (Vec::new(), Some(0)),
        };
        for line in self.text[..line_end].lines() {
            if let Some((name, array)) = header(line) {
                table = split_keys(name);
                if array && table == ["campaign"] {
                    index = Some(index.map_or(0, |i| i + 1));
                }
            }
        }
        if self.shape == Shape::Bare {
            table.insert(0, "campaign".to_owned());
        }
        let mut path = table;
        if path.first().map(String::as_str) == Some("campaign") {
            if let Some(i) = index {
                path[0] = campaign_label(self.campaign_id(i).as_deref(), i);
            }
        }
        // A header line itself names a table, not a key in it.
        if header(&self.text[line_start..line_end]).is_none() {
            path.extend(keys_on_line(&before[line_start..]));
        }
        if let Some(key) = named_key(msg) {
            path.push(key.to_owned());
        }
        path.join(".")
    }

    /// The id of campaign `i` if the text parses as TOML and the id is a valid one.
    fn campaign_id(&self, i: usize) -> Option<String> {
        let table: toml::Table = toml::from_str(self.text).ok()?;
        let campaign = match self.shape {
            Shape::Job => table.get("campaign")?.as_array()?.get(i)?.as_table()?,
            Shape::Bare => &table,
        };
        let id = campaign.get("id")?.as_str()?;
        is_valid_id(id).then(|| id.to_owned())
    }
}

/// The 1-based line holding byte `offset` of `text`.
pub(super) fn line_of(text: &str, offset: usize) -> u64 {
    let end = offset.min(text.len());
    let newlines = text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    newlines as u64 + 1
}

/// Whether `id` is a campaign id: `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// How errors name campaign `i`: by its id when it has a valid one, else by position.
pub(super) fn campaign_label(id: Option<&str>, i: usize) -> String {
    match id {
        Some(id) => format!("campaign \"{id}\""),
        None => format!("campaign[{i}]"),
    }
}

/// `[name]` or `[[name]]` (then `true`), with nothing but a comment after it.
fn header(line: &str) -> Option<(&str, bool)> {
    let t = line.trim();
    let (inner, array) = match t.strip_prefix("[[") {
        Some(rest) => (rest.split_once("]]")?, true),
        None => (t.strip_prefix('[')?.split_once(']')?, false),
    };
    let rest = inner.1.trim();
    (rest.is_empty() || rest.starts_with('#')).then_some((inner.0, array))
}

/// `a . "b"` → `["a", "b"]`.
fn split_keys(dotted: &str) -> Vec<String> {
    dotted
        .split('.')
        .map(|k| k.trim().trim_matches(|c| c == '"' || c == '\'').to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

/// The keys leading to the end of `prefix`, a line cut at the offset: `a = { b = [1, ` → a.b.
fn keys_on_line(prefix: &str) -> Vec<String> {
    let mut open: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut seg = 0;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in prefix.char_indices() {
        if let Some(q) = quote {
            match c {
                '\\' if q == '"' && !escaped => escaped = true,
                c if c == q && !escaped => quote = None,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '#' => break,
            '=' => current = split_keys(&prefix[seg..i]),
            '{' | '[' => open.push(std::mem::take(&mut current)),
            '}' | ']' => current = open.pop().unwrap_or_default(),
            ',' => current.clear(),
            _ => {}
        }
        if matches!(c, '=' | '{' | '[' | '}' | ']' | ',') {
            seg = i + 1;
        }
    }
    open.into_iter().flatten().chain(current).collect()
}

/// The key a serde or toml message names: ``unknown field `x` `` → `x`.
fn named_key(msg: &str) -> Option<&str> {
    ["unknown field `", "missing field `", "duplicate key `"]
        .iter()
        .find_map(|p| msg.strip_prefix(p))
        .and_then(|rest| rest.split('`').next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_on_a_line() {
        assert_eq!(keys_on_line("bucket_size = "), ["bucket_size"]);
        assert_eq!(
            keys_on_line("audience = { min_level = "),
            ["audience", "min_level"]
        );
        assert_eq!(keys_on_line("tags_any = [\"a,=\", "), ["tags_any"]);
        assert_eq!(keys_on_line("a = { b = 1, c = "), ["a", "c"]);
        assert!(keys_on_line("").is_empty());
    }

    #[test]
    fn headers() {
        assert_eq!(header("[[campaign]]  # x"), Some(("campaign", true)));
        assert_eq!(
            header(" [campaign.audience]"),
            Some(("campaign.audience", false))
        );
        assert_eq!(header("  [1, 2],"), None);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb", 99), 2);
    }
}
