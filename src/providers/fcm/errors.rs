//! What an FCM HTTP v1 response means: by HTTP status, refined by the body's `error.status`
//! and `error.details[].errorCode` (or `reason`, the shape Google's API front end uses).
//!
//! | code (status) | meaning | outcome |
//! |---|---|---|
//! | `UNAUTHENTICATED` (401), `THIRD_PARTY_AUTH_ERROR`, `SENDER_ID_MISMATCH`, `PERMISSION_DENIED` (403) | our credentials or project | [`Outcome::Unauthorized`]: never dead-lettered |
//! | `QUOTA_EXCEEDED`, `RESOURCE_EXHAUSTED`, `RATE_LIMIT_EXCEEDED` (429), `UNAVAILABLE` (503), `INTERNAL` (500) | try again, after `Retry-After` | [`Outcome::Retry`] |
//! | `UNREGISTERED` (404), `INVALID_ARGUMENT` (400) | the device token is bad | [`Outcome::InvalidToken`] |
//! | anything else | as for every provider ([`by_status`]) | |

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

use crate::providers::remote::{by_status, snippet};
use crate::providers::Outcome;

const OURS: &[&str] = &[
    "UNAUTHENTICATED",
    "THIRD_PARTY_AUTH_ERROR",
    "SENDER_ID_MISMATCH",
    "PERMISSION_DENIED",
];
const RETRY: &[&str] = &[
    "QUOTA_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "RATE_LIMIT_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
];
const BAD_TOKEN: &[&str] = &["UNREGISTERED", "INVALID_ARGUMENT"];

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    error: ErrorInfo,
}

#[derive(Deserialize, Default)]
struct ErrorInfo {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Detail>,
}

#[derive(Deserialize, Default)]
struct Detail {
    #[serde(default, rename = "errorCode")]
    error_code: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// The outcome of one send: `None` if FCM accepted it. `name` prefixes the error text.
pub fn outcome(
    name: &str,
    status: StatusCode,
    body: &[u8],
    after: Option<Duration>,
) -> Option<Outcome> {
    if status.is_success() {
        return None;
    }
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let info = parsed.error;
    // The most specific code first: a detail's errorCode, then the canonical status.
    let mut codes: Vec<&str> = info
        .details
        .iter()
        .filter_map(|d| d.error_code.as_deref().or(d.reason.as_deref()))
        .collect();
    if !info.status.is_empty() {
        codes.push(&info.status);
    }
    let label = codes.first().map(|c| format!(" {c}")).unwrap_or_default();
    let detail = match info.message.is_empty() {
        true => snippet(body),
        false => snippet(info.message.as_bytes()),
    };
    let error = match detail.is_empty() {
        true => format!("{name}: HTTP {}{label}", status.as_u16()),
        false => format!("{name}: HTTP {}{label}: {detail}", status.as_u16()),
    };
    let any = |set: &[&str]| codes.iter().any(|c| set.contains(c));
    let code = status.as_u16();
    if code == 401 || code == 403 || any(OURS) {
        Some(Outcome::Unauthorized(error))
    } else if any(RETRY) {
        Some(Outcome::Retry { error, after })
    } else if any(BAD_TOKEN) && code < 500 {
        Some(Outcome::InvalidToken(error))
    } else {
        by_status(status, after, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fcm_error(code: u16, status: &str, detail: Option<(&str, &str)>) -> Vec<u8> {
        let details: Vec<_> = detail
            .map(|(field, value)| {
                json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", field: value})
            })
            .into_iter()
            .collect();
        serde_json::to_vec(&json!({"error": {
            "code": code, "message": "something", "status": status, "details": details
        }}))
        .unwrap()
    }

    fn of(code: u16, body: &[u8]) -> Option<Outcome> {
        outcome(
            "fcm project p",
            StatusCode::from_u16(code).unwrap(),
            body,
            Some(Duration::from_secs(7)),
        )
    }

    #[test]
    fn responses_map_as_documented() {
        assert_eq!(of(200, br#"{"name":"projects/p/messages/1"}"#), None);
        let retry = |o: Option<Outcome>| matches!(o, Some(Outcome::Retry { after: Some(a), .. }) if a == Duration::from_secs(7));
        let bad_token = |o: Option<Outcome>| matches!(o, Some(Outcome::InvalidToken(_)));
        let ours = |o: Option<Outcome>| matches!(o, Some(Outcome::Unauthorized(_)));
        let cases = [
            (
                404,
                fcm_error(404, "NOT_FOUND", Some(("errorCode", "UNREGISTERED"))),
            ),
            (
                400,
                fcm_error(
                    400,
                    "INVALID_ARGUMENT",
                    Some(("errorCode", "INVALID_ARGUMENT")),
                ),
            ),
            (400, fcm_error(400, "INVALID_ARGUMENT", None)),
        ];
        for (code, body) in &cases {
            assert!(bad_token(of(*code, body)), "{code}");
        }
        let cases = [
            (
                429,
                fcm_error(
                    429,
                    "RESOURCE_EXHAUSTED",
                    Some(("errorCode", "QUOTA_EXCEEDED")),
                ),
            ),
            (
                429,
                fcm_error(
                    429,
                    "RESOURCE_EXHAUSTED",
                    Some(("reason", "RATE_LIMIT_EXCEEDED")),
                ),
            ),
            (429, fcm_error(429, "RESOURCE_EXHAUSTED", None)),
            (
                503,
                fcm_error(503, "UNAVAILABLE", Some(("errorCode", "UNAVAILABLE"))),
            ),
            (
                500,
                fcm_error(500, "INTERNAL", Some(("errorCode", "INTERNAL"))),
            ),
            (502, b"<html>Bad Gateway</html>".to_vec()),
            (429, Vec::new()),
        ];
        for (code, body) in &cases {
            assert!(
                retry(of(*code, body)),
                "{code} {}",
                String::from_utf8_lossy(body)
            );
        }
        let cases = [
            (401, fcm_error(401, "UNAUTHENTICATED", None)),
            (
                401,
                fcm_error(
                    401,
                    "UNAUTHENTICATED",
                    Some(("errorCode", "THIRD_PARTY_AUTH_ERROR")),
                ),
            ),
            (
                403,
                fcm_error(
                    403,
                    "PERMISSION_DENIED",
                    Some(("errorCode", "SENDER_ID_MISMATCH")),
                ),
            ),
            (403, b"forbidden".to_vec()),
        ];
        for (code, body) in &cases {
            assert!(ours(of(*code, body)), "{code}");
        }
        assert!(matches!(
            of(404, b"no such path"),
            Some(Outcome::Permanent(_))
        ));
    }

    #[test]
    fn errors_name_the_provider_and_the_code() {
        let body = fcm_error(404, "NOT_FOUND", Some(("errorCode", "UNREGISTERED")));
        let Some(Outcome::InvalidToken(e)) = of(404, &body) else {
            panic!("expected an invalid token")
        };
        assert_eq!(e, "fcm project p: HTTP 404 UNREGISTERED: something");
        let Some(Outcome::Retry { error, .. }) = of(503, b"") else {
            panic!("expected a retry")
        };
        assert_eq!(error, "fcm project p: HTTP 503");
    }
}
