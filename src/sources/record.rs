//! Field checks shared by the JSON Lines and CSV readers, so both formats say the same thing.

use crate::error::InputError;

/// What an `id` must be.
pub(crate) const ID: &str = "an integer 1..=4294967295";
/// What a `level` must be.
pub(crate) const LEVEL: &str = "an integer 0..=255";
/// What `points` must be.
pub(crate) const POINTS: &str = "a non-negative integer (at most 18446744073709551615)";

/// A bad line or field, before the file and line number are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bad {
    /// The field at fault; empty when the whole line is.
    pub field: String,
    /// What was expected, in words.
    pub msg: String,
}

impl Bad {
    /// The whole line is at fault.
    pub fn line(msg: impl Into<String>) -> Self {
        Bad::field("", msg)
    }

    /// One field is at fault.
    pub fn field(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Bad {
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// A required field is absent.
    pub fn missing(field: &str, expected: &str) -> Self {
        Bad::field(field, format!("missing; expected {expected}"))
    }

    /// This error at `file:line`.
    pub fn at(self, file: &str, line: u64) -> InputError {
        InputError::new(file, Some(line), self.field, self.msg)
    }
}

/// `text` cut to a length fit for an error message.
pub(crate) fn shorten(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Checks a user id; `n` is the value if it is a non-negative integer, `got` shows it otherwise.
pub(crate) fn check_id(n: Option<u64>, got: impl FnOnce() -> String) -> Result<u32, Bad> {
    n.filter(|&v| v >= 1)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| expected("id", ID, got))
}

/// Checks a member level, like [`check_id`].
pub(crate) fn check_level(n: Option<u64>, got: impl FnOnce() -> String) -> Result<u8, Bad> {
    n.and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| expected("level", LEVEL, got))
}

/// Checks loyalty points, like [`check_id`].
pub(crate) fn check_points(n: Option<u64>, got: impl FnOnce() -> String) -> Result<u64, Bad> {
    n.ok_or_else(|| expected("points", POINTS, got))
}

/// Checks a user's time zone: an IANA zone name, or empty for none (as an empty token is).
/// Spaces around it are ignored.
pub(crate) fn check_tz(text: &str) -> Result<Option<chrono_tz::Tz>, Bad> {
    let name = text.trim();
    if name.is_empty() {
        return Ok(None);
    }
    crate::policy::parse_zone(name)
        .map(Some)
        .map_err(|msg| Bad::field("tz", msg))
}

fn expected(field: &str, what: &str, got: impl FnOnce() -> String) -> Bad {
    Bad::field(field, format!("expected {what}, got {}", got()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_enforced() {
        let got = || "x".to_owned();
        assert_eq!(check_id(Some(1), got), Ok(1));
        assert_eq!(check_id(Some(4_294_967_295), got), Ok(u32::MAX));
        assert_eq!(check_id(Some(0), got).unwrap_err().field, "id");
        assert!(check_id(Some(4_294_967_296), got).is_err());
        assert_eq!(check_level(Some(255), got), Ok(255));
        let e = check_level(Some(300), || "300".into()).unwrap_err();
        assert_eq!(e.msg, "expected an integer 0..=255, got 300");
        assert_eq!(check_points(Some(u64::MAX), got), Ok(u64::MAX));
        assert!(check_points(None, got).is_err());
    }

    #[test]
    fn zones_are_iana_names_and_empty_is_none() {
        use chrono_tz::Tz;
        assert_eq!(check_tz("Asia/Shanghai"), Ok(Some(Tz::Asia__Shanghai)));
        assert_eq!(check_tz(" UTC "), Ok(Some(Tz::UTC)));
        assert_eq!(
            check_tz("America/Argentina/Buenos_Aires"),
            Ok(Some(Tz::America__Argentina__Buenos_Aires))
        );
        assert_eq!(check_tz(""), Ok(None));
        assert_eq!(check_tz("  "), Ok(None));
        for bad in ["Mars/Base", "asia/shanghai", "+08:00", "Asia/Shanghai/x"] {
            let e = check_tz(bad).unwrap_err();
            assert_eq!(e.field, "tz", "{bad}");
            assert!(
                e.msg.starts_with(&format!("unknown time zone {bad:?}")),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn long_values_are_shortened_on_a_char_boundary() {
        assert_eq!(shorten("short"), "short");
        let long = "é".repeat(100);
        assert_eq!(shorten(&long), format!("{}…", "é".repeat(40)));
    }
}
