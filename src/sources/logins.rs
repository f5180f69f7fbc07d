//! The `logins` input: `{"user": 42, "ts": "2026-03-02T10:00:00Z"}` per line.

use chrono::DateTime;
use serde::{Deserialize, Serialize};

use crate::error::{InputError, Result};
use crate::sources::lines::for_each_line;

/// One login event: the user and when, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Login {
    /// Who logged in.
    pub user: u32,
    /// When, ms since 1970-01-01T00:00:00Z.
    pub ts_ms: i64,
}

#[derive(Deserialize)]
struct Raw {
    user: Option<serde_json::Value>,
    ts: Option<serde_json::Value>,
}

/// Parses one login line; errors name the field.
pub fn parse_login(line: &str) -> Result<Login, (String, String)> {
    let raw: Raw = serde_json::from_str(line)
        .map_err(|e| (String::new(), format!("expected a JSON object: {e}")))?;
    login_from(raw.user, raw.ts)
}

/// Checks a login's two fields (JSON values, as a line or a stream entry gives them); errors
/// name the field.
pub fn login_from(
    user: Option<serde_json::Value>,
    ts: Option<serde_json::Value>,
) -> Result<Login, (String, String)> {
    let raw = Raw { user, ts };
    let user = match raw.user.as_ref().and_then(serde_json::Value::as_u64) {
        Some(u) if (1..=u64::from(u32::MAX)).contains(&u) => u as u32,
        Some(u) => {
            return Err((
                "user".into(),
                format!("expected an id 1..=4294967295, got {u}"),
            ))
        }
        None => return Err(("user".into(), "missing or not a positive integer".into())),
    };
    let ts = match raw.ts {
        Some(serde_json::Value::String(s)) => DateTime::parse_from_rfc3339(&s).map_err(|e| {
            (
                "ts".to_string(),
                format!("expected an RFC 3339 time, got {s:?} ({e})"),
            )
        })?,
        Some(other) => {
            return Err((
                "ts".into(),
                format!("expected an RFC 3339 string, got {other}"),
            ))
        }
        None => return Err(("ts".into(), "missing".into())),
    };
    Ok(Login {
        user,
        ts_ms: ts.timestamp_millis(),
    })
}

/// Reads the login events at `path`, in file order; bad lines stop the load, or are skipped
/// if `skip_bad`. Returns the events and how many lines were skipped.
pub fn load(path: &str, skip_bad: bool) -> Result<(Vec<Login>, u64)> {
    let mut logins = Vec::new();
    let skipped = for_each_line(path, skip_bad, |line_no, line| {
        let login = parse_login(line)
            .map_err(|(field, msg)| InputError::new(path, Some(line_no), field, msg))?;
        logins.push(login);
        Ok(())
    })?;
    Ok((logins, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_fields() {
        let l = parse_login(r#"{"user": 42, "ts": "2026-03-02T10:00:00+08:00", "device": "x"}"#)
            .unwrap();
        assert_eq!(l.user, 42);
        assert_eq!(l.ts_ms, 1_772_416_800_000);
        for (line, field) in [
            (r#"{"ts": "2026-03-02T10:00:00Z"}"#, "user"),
            (r#"{"user": 0, "ts": "2026-03-02T10:00:00Z"}"#, "user"),
            (r#"{"user": "42", "ts": "2026-03-02T10:00:00Z"}"#, "user"),
            (r#"{"user": 42, "ts": "yesterday"}"#, "ts"),
            (r#"{"user": 42, "ts": 1700000000}"#, "ts"),
            (r#"{"user": 42}"#, "ts"),
            ("not json", ""),
        ] {
            assert_eq!(parse_login(line).unwrap_err().0, field, "{line}");
        }
    }
}
