//! Users from JSON Lines:
//! `{"id": 42, "level": 3, "points": 1200, "tags": ["sports"], "token": "t-42", "tz": "Asia/Shanghai"}`.
//!
//! Each field is read as a raw JSON value first, so a wrong type names the field it is in
//! rather than surfacing as serde's "invalid type at column 17".

use serde::Deserialize;
use serde_json::Value;

use super::record::{
    check_id, check_level, check_points, check_tz, shorten, Bad, ID, LEVEL, POINTS,
};
use crate::model::User;

/// One line's fields, unchecked. Keys not named here are ignored; `null` reads as absent.
#[derive(Deserialize)]
struct RawUser {
    id: Option<Value>,
    level: Option<Value>,
    points: Option<Value>,
    tags: Option<Value>,
    token: Option<Value>,
    tz: Option<Value>,
}

/// Parses one non-blank line into a user.
///
/// An empty `token` or `tz` string counts as none, as an empty CSV cell does.
pub(crate) fn parse_line(text: &str) -> Result<User, Bad> {
    let trimmed = text.trim();
    // serde would also read a JSON array into a struct, field by position.
    if !trimmed.starts_with('{') {
        return Err(Bad::line(format!(
            "expected a JSON object, got {}",
            shorten(trimmed)
        )));
    }
    let raw: RawUser =
        serde_json::from_str(trimmed).map_err(|e| Bad::line(format!("not valid JSON: {e}")))?;
    let id = match &raw.id {
        None => return Err(Bad::missing("id", ID)),
        Some(v) => check_id(v.as_u64(), || show(v))?,
    };
    let level = match &raw.level {
        None => return Err(Bad::missing("level", LEVEL)),
        Some(v) => check_level(v.as_u64(), || show(v))?,
    };
    let points = match &raw.points {
        None => return Err(Bad::missing("points", POINTS)),
        Some(v) => check_points(v.as_u64(), || show(v))?,
    };
    let tags = match raw.tags {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                other => Err(Bad::field(
                    format!("tags[{i}]"),
                    format!("expected a string, got {}", show(&other)),
                )),
            })
            .collect::<Result<Vec<String>, Bad>>()?,
        Some(other) => {
            return Err(Bad::field(
                "tags",
                format!("expected an array of strings, got {}", show(&other)),
            ))
        }
    };
    let token = match raw.token {
        None => None,
        Some(Value::String(s)) => Some(s).filter(|s| !s.is_empty()),
        Some(other) => {
            return Err(Bad::field(
                "token",
                format!("expected a string or null, got {}", show(&other)),
            ))
        }
    };
    let tz = match raw.tz {
        None => None,
        Some(Value::String(s)) => check_tz(&s)?,
        Some(other) => {
            return Err(Bad::field(
                "tz",
                format!("expected a time zone name or null, got {}", show(&other)),
            ))
        }
    };
    Ok(User {
        id,
        level,
        points,
        tags,
        token,
        tz,
    })
}

/// A JSON value as it would be written, shortened.
fn show(v: &Value) -> String {
    shorten(&v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(line: &str) -> Bad {
        parse_line(line).unwrap_err()
    }

    /// The field and message of a bad line.
    fn fault(line: &str) -> (String, String) {
        let b = bad(line);
        (b.field, b.msg)
    }

    #[test]
    fn reads_a_full_record_and_ignores_other_keys() {
        let u = parse_line(
            r#"{"id": 42, "level": 3, "points": 1200, "tags": ["sports", "运动"], "token": "t-42", "x": [1]}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            User {
                id: 42,
                level: 3,
                points: 1200,
                tags: vec!["sports".into(), "运动".into()],
                token: Some("t-42".into()),
                tz: None,
            }
        );
    }

    #[test]
    fn tz_is_an_optional_iana_zone_name() {
        let u = parse_line(r#"{"id":1,"level":0,"points":0,"tz":"Asia/Shanghai"}"#).unwrap();
        assert_eq!(u.tz, Some(chrono_tz::Tz::Asia__Shanghai));
        for line in [
            r#"{"id":1,"level":0,"points":0}"#,
            r#"{"id":1,"level":0,"points":0,"tz":null}"#,
            r#"{"id":1,"level":0,"points":0,"tz":""}"#,
        ] {
            assert_eq!(parse_line(line).unwrap().tz, None, "{line}");
        }
        let (field, msg) = fault(r#"{"id":1,"level":0,"points":0,"tz":"Mars/Base"}"#);
        assert_eq!(field, "tz");
        assert!(msg.starts_with("unknown time zone \"Mars/Base\""), "{msg}");
        assert_eq!(
            fault(r#"{"id":1,"level":0,"points":0,"tz":8}"#),
            (
                "tz".into(),
                "expected a time zone name or null, got 8".into()
            )
        );
    }

    #[test]
    fn tags_and_token_are_optional_and_null_or_empty_token_is_none() {
        for line in [
            r#"{"id":1,"level":0,"points":0}"#,
            r#"{"id":1,"level":0,"points":0,"tags":null,"token":null}"#,
            r#"{"id":1,"level":0,"points":0,"tags":[],"token":""}"#,
        ] {
            let u = parse_line(line).unwrap();
            assert!(u.tags.is_empty(), "{line}");
            assert_eq!(u.token, None, "{line}");
        }
    }

    #[test]
    fn extreme_values_are_accepted() {
        let u =
            parse_line(r#"{"id":4294967295,"level":255,"points":18446744073709551615}"#).unwrap();
        assert_eq!((u.id, u.level, u.points), (u32::MAX, 255, u64::MAX));
    }

    #[test]
    fn id_must_be_present_and_an_integer_in_range() {
        let missing = fault(r#"{"level":1,"points":1}"#);
        assert_eq!(missing.0, "id");
        assert!(missing.1.starts_with("missing"), "{}", missing.1);
        assert_eq!(fault(r#"{"id":null,"level":1,"points":1}"#).0, "id");
        assert_eq!(
            fault(r#"{"id":0,"level":1,"points":1}"#),
            (
                "id".into(),
                "expected an integer 1..=4294967295, got 0".into()
            )
        );
        assert_eq!(fault(r#"{"id":4294967296,"level":1,"points":1}"#).0, "id");
        assert_eq!(fault(r#"{"id":-3,"level":1,"points":1}"#).0, "id");
        assert_eq!(
            fault(r#"{"id":1.5,"level":1,"points":1}"#),
            (
                "id".into(),
                "expected an integer 1..=4294967295, got 1.5".into()
            )
        );
        assert_eq!(fault(r#"{"id":1.0,"level":1,"points":1}"#).0, "id");
        assert_eq!(
            fault(r#"{"id":"42","level":1,"points":1}"#),
            (
                "id".into(),
                "expected an integer 1..=4294967295, got \"42\"".into()
            )
        );
    }

    #[test]
    fn level_and_points_are_checked() {
        assert_eq!(
            fault(r#"{"id":1,"level":300,"points":1}"#),
            (
                "level".into(),
                "expected an integer 0..=255, got 300".into()
            )
        );
        assert_eq!(fault(r#"{"id":1,"level":"3","points":1}"#).0, "level");
        assert_eq!(fault(r#"{"id":1,"points":1}"#).0, "level");
        let (field, msg) = fault(r#"{"id":1,"level":1,"points":-5}"#);
        assert_eq!(field, "points");
        assert!(msg.ends_with("got -5"), "{msg}");
        assert_eq!(fault(r#"{"id":1,"level":1,"points":1e30}"#).0, "points");
        assert_eq!(fault(r#"{"id":1,"level":1}"#).0, "points");
    }

    #[test]
    fn tags_must_be_an_array_of_strings_and_token_a_string() {
        assert_eq!(
            fault(r#"{"id":1,"level":1,"points":1,"tags":"sports"}"#),
            (
                "tags".into(),
                "expected an array of strings, got \"sports\"".into()
            )
        );
        assert_eq!(
            fault(r#"{"id":1,"level":1,"points":1,"tags":["a",5]}"#),
            ("tags[1]".into(), "expected a string, got 5".into())
        );
        assert_eq!(
            fault(r#"{"id":1,"level":1,"points":1,"token":7}"#),
            ("token".into(), "expected a string or null, got 7".into())
        );
    }

    #[test]
    fn non_json_and_non_objects_fault_the_whole_line() {
        for line in [
            "not json",
            "[1, 2, 3]",
            "42",
            "\"id\"",
            r#"{"id": 1, "level": 1"#,
            r#"{"id":1,"level":1,"points":1} trailing"#,
        ] {
            let b = bad(line);
            assert_eq!(b.field, "", "{line}");
        }
        assert!(bad("[1,2,3]").msg.contains("JSON object"));
        assert!(bad("{oops}").msg.starts_with("not valid JSON"));
    }
}
