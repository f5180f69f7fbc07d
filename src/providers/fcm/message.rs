//! The FCM HTTP v1 request body of one message, and the payload limit checked before sending.
//!
//! ```json
//! {"message": {"token": "<device token>",
//!              "notification": {"title": "…", "body": "…"},
//!              "data": {"campaign": "…", "key": "…"}}}
//! ```
//! `data` values are strings, as FCM requires.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// FCM refuses a message whose payload (notification and data) is over this many bytes.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// The fields of a delivery record FCM needs.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    campaign: Cow<'a, str>,
    #[serde(borrow)]
    title: Cow<'a, str>,
    #[serde(borrow)]
    body: Cow<'a, str>,
    #[serde(borrow)]
    key: Cow<'a, str>,
}

#[derive(Serialize)]
struct Notification<'a> {
    title: &'a str,
    body: &'a str,
}

#[derive(Serialize)]
struct Data<'a> {
    campaign: &'a str,
    key: &'a str,
}

/// What reaches the device: the part the payload limit is about.
#[derive(Serialize)]
struct Payload<'a> {
    notification: Notification<'a>,
    data: Data<'a>,
}

#[derive(Serialize)]
struct FcmMessage<'a> {
    token: &'a str,
    #[serde(flatten)]
    payload: &'a Payload<'a>,
}

#[derive(Serialize)]
struct SendRequest<'a> {
    message: FcmMessage<'a>,
}

/// Why a message cannot be sent to FCM at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsendable {
    /// The delivery record is not what the renderer writes (a bug, not the user's input).
    BadRecord(String),
    /// The payload, in bytes, is over [`MAX_PAYLOAD_BYTES`].
    TooBig(usize),
}

/// The request body for the delivery record `record` (one line of JSON) to device `token`.
pub fn request_body(record: &[u8], token: &str) -> Result<Vec<u8>, Unsendable> {
    let r: Record<'_> =
        serde_json::from_slice(record).map_err(|e| Unsendable::BadRecord(e.to_string()))?;
    let payload = Payload {
        notification: Notification {
            title: &r.title,
            body: &r.body,
        },
        data: Data {
            campaign: &r.campaign,
            key: &r.key,
        },
    };
    let size = serde_json::to_vec(&payload)
        .map_err(|e| Unsendable::BadRecord(e.to_string()))?
        .len();
    if size > MAX_PAYLOAD_BYTES {
        return Err(Unsendable::TooBig(size));
    }
    serde_json::to_vec(&SendRequest {
        message: FcmMessage {
            token,
            payload: &payload,
        },
    })
    .map_err(|e| Unsendable::BadRecord(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn the_body_is_fcm_v1_field_for_field() {
        let record = r#"{"campaign":"hot-1","occurrence":"2026-03-02T10:00:00Z","user":42,"title":"Sale \"now\"","body":"Hi 42 ✓","key":"hot-1:2026-03-02T10:00:00Z:42"}"#;
        let body = request_body(record.as_bytes(), "tok/42:abc").unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"message": {
                "token": "tok/42:abc",
                "notification": {"title": "Sale \"now\"", "body": "Hi 42 ✓"},
                "data": {"campaign": "hot-1", "key": "hot-1:2026-03-02T10:00:00Z:42"}
            }})
        );
    }

    #[test]
    fn payloads_over_the_limit_are_refused() {
        let record = |body: &str| {
            serde_json::to_string(&json!({
                "campaign": "c", "user": 1, "title": "t", "body": body, "key": "c:1"
            }))
            .unwrap()
        };
        // {"notification":{"title":"t","body":"…"},"data":{"campaign":"c","key":"c:1"}}
        let overhead = 76;
        let fits = "x".repeat(MAX_PAYLOAD_BYTES - overhead);
        assert!(request_body(record(&fits).as_bytes(), "t").is_ok());
        let over = "x".repeat(MAX_PAYLOAD_BYTES - overhead + 1);
        assert_eq!(
            request_body(record(&over).as_bytes(), "t"),
            Err(Unsendable::TooBig(MAX_PAYLOAD_BYTES + 1))
        );
        // The token does not count: it is not delivered to the device.
        assert!(request_body(record(&fits).as_bytes(), &"k".repeat(5000)).is_ok());
        assert!(matches!(
            request_body(b"{}", "t"),
            Err(Unsendable::BadRecord(_))
        ));
    }
}
