//! `fcm:project=ID[,endpoint=URL]`: Firebase Cloud Messaging, HTTP v1 API.
//!
//! One `POST {endpoint}/v1/projects/{ID}/messages:send` per message, with
//! `Authorization: Bearer $FANOUT_FCM_TOKEN` (an OAuth 2.0 access token). The token is kept in
//! a header marked sensitive and in no `Debug` output, and is cut out of any error text.
//! Users without a push token are unreachable (counted, not sent); a payload over FCM's limit
//! is dead-lettered before sending ([`message`]); responses map as [`errors`] lays out.
//!
//! The endpoint defaults to `https://fcm.googleapis.com`; tests point it at a local server.

pub mod errors;
pub mod message;

use std::fmt;
use std::time::SystemTime;

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{RequestBuilder, Response, Url};

use super::remote::{self, Timeouts};
use super::{Attempt, Gate, Message, Outcome, Push};
use crate::error::{Error, Result};
use futures::future::BoxFuture;
use message::{request_body, Unsendable, MAX_PAYLOAD_BYTES};

/// Where FCM lives unless `endpoint=` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://fcm.googleapis.com";
/// The environment variable holding the OAuth 2.0 access token.
pub const TOKEN_VAR: &str = "FANOUT_FCM_TOKEN";

/// An `fcm:` provider as the job names it.
#[derive(Debug, Clone, PartialEq)]
pub struct FcmSpec {
    /// The Firebase project id.
    pub project: String,
    /// `{endpoint}/v1/projects/{project}/messages:send`.
    pub send_url: Url,
}

impl FcmSpec {
    /// Parses `project=ID[,endpoint=URL]`.
    pub fn parse(params: &str) -> std::result::Result<FcmSpec, String> {
        let (mut project, mut endpoint) = (None, None);
        for kv in params.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {kv:?}"))?;
            match k.trim() {
                "project" => project = Some(v.trim().to_owned()),
                "endpoint" => endpoint = Some(v.trim().to_owned()),
                other => {
                    return Err(format!(
                        "unknown fcm parameter {other:?} (project, endpoint)"
                    ))
                }
            }
        }
        let project = project.ok_or("fcm: needs project=ID")?;
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if project.is_empty() || project.len() > 128 || !project.chars().all(valid) {
            return Err(format!(
                "project {project:?}: expected a Firebase project id (letters, digits, - _ .)"
            ));
        }
        let endpoint = endpoint.unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let base = Url::parse(&endpoint).map_err(|e| format!("endpoint {endpoint:?}: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(format!(
                "endpoint {endpoint:?}: expected http(s)://host[:port]"
            ));
        }
        let url = format!(
            "{}/v1/projects/{project}/messages:send",
            endpoint.trim_end_matches('/')
        );
        let send_url = Url::parse(&url).map_err(|e| format!("endpoint {endpoint:?}: {e}"))?;
        Ok(FcmSpec { project, send_url })
    }
}

/// The FCM provider: a pooled client, the send URL and the bearer credential.
pub struct FcmProvider {
    client: reqwest::Client,
    spec: FcmSpec,
    name: String,
    /// `Bearer …`, marked sensitive.
    authorization: HeaderValue,
    /// The access token itself, only to cut it out of error text.
    secret: String,
}

impl fmt::Debug for FcmProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmProvider")
            .field("project", &self.spec.project)
            .field("send_url", &self.spec.send_url.as_str())
            .finish_non_exhaustive()
    }
}

impl FcmProvider {
    /// Reads the access token from `FANOUT_FCM_TOKEN` and builds the connection pool.
    pub fn open(spec: FcmSpec, timeouts: &Timeouts) -> Result<FcmProvider> {
        let secret = std::env::var(TOKEN_VAR).unwrap_or_default();
        let secret = secret.trim().to_owned();
        if secret.is_empty() {
            return Err(Error::Usage(format!(
                "the fcm provider needs an OAuth 2.0 access token in {TOKEN_VAR}"
            )));
        }
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {secret}")).map_err(|_| {
                Error::Usage(format!(
                    "{TOKEN_VAR} holds characters a header cannot carry"
                ))
            })?;
        authorization.set_sensitive(true);
        Ok(FcmProvider {
            client: remote::client(timeouts)?,
            name: format!("fcm project {}", spec.project),
            spec,
            authorization,
            secret,
        })
    }

    /// How errors name it: `fcm project ID`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends each selected message that has a token and fits, concurrently, one slot and one
    /// rate token each.
    async fn post(&self, m: &Message<'_>, gate: Gate<'_>) -> Attempt {
        remote::attempt(
            self.request(m),
            gate,
            |request: RequestBuilder| async move {
                let outcome = self.outcome(request.send().await).await;
                outcome.map(|o| self.redact(o))
            },
        )
        .await
    }

    /// The request for `m`, built without I/O; or why it is not sent.
    fn request(&self, m: &Message<'_>) -> std::result::Result<RequestBuilder, Outcome> {
        let Some(token) = m.token else {
            return Err(Outcome::Unreachable);
        };
        let body = request_body(m.json, token).map_err(|why| {
            Outcome::Unsendable(match why {
                Unsendable::TooBig(size) => format!(
                    "{}: user {}: payload of {size} bytes is over FCM's {MAX_PAYLOAD_BYTES}-byte limit",
                    self.name, m.user
                ),
                Unsendable::BadRecord(e) => {
                    format!("{}: user {}: unreadable delivery record: {e}", self.name, m.user)
                }
            })
        })?;
        Ok(self
            .client
            .post(self.spec.send_url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body))
    }

    /// What a response (or its absence) means.
    async fn outcome(&self, response: reqwest::Result<Response>) -> Option<Outcome> {
        let response = match response {
            Ok(r) => r,
            Err(e) => return Some(remote::transport_failure(&self.name, &e)),
        };
        let status = response.status();
        let after = remote::retry_after(response.headers(), SystemTime::now());
        let body = remote::body(response).await;
        errors::outcome(&self.name, status, &body, after)
    }

    /// `o` with the access token cut out of its text, should a server ever echo it.
    fn redact(&self, o: Outcome) -> Outcome {
        let cut = |s: String| match s.contains(&self.secret) {
            true => s.replace(&self.secret, "[redacted]"),
            false => s,
        };
        match o {
            Outcome::Retry { error, after } => Outcome::Retry {
                error: cut(error),
                after,
            },
            Outcome::Permanent(e) => Outcome::Permanent(cut(e)),
            Outcome::Unsendable(e) => Outcome::Unsendable(cut(e)),
            Outcome::InvalidToken(e) => Outcome::InvalidToken(cut(e)),
            Outcome::Unauthorized(e) => Outcome::Unauthorized(cut(e)),
            Outcome::Unreachable => Outcome::Unreachable,
            Outcome::Held => Outcome::Held,
            Outcome::Fatal(e) => Outcome::Fatal(cut(e)),
        }
    }
}

impl Push for FcmProvider {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn sends_each(&self) -> bool {
        true
    }

    fn needs_token(&self) -> bool {
        true
    }

    fn send_one<'a>(
        &'a self,
        message: Message<'a>,
        _attempt: u32,
        gate: Gate<'a>,
    ) -> BoxFuture<'a, Attempt> {
        Box::pin(async move { self.post(&message, gate).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_project_and_endpoint() {
        let s = FcmSpec::parse("project=my-app-123").unwrap();
        assert_eq!(s.project, "my-app-123");
        assert_eq!(
            s.send_url.as_str(),
            "https://fcm.googleapis.com/v1/projects/my-app-123/messages:send"
        );
        let s = FcmSpec::parse("project=p, endpoint=http://127.0.0.1:8080/").unwrap();
        assert_eq!(
            s.send_url.as_str(),
            "http://127.0.0.1:8080/v1/projects/p/messages:send"
        );
        for bad in [
            "",
            "endpoint=http://x",
            "project=",
            "project=a/b",
            "project=p,endpoint=ftp://x",
            "project=p,endpoint=nope",
            "project=p,colour=red",
            "project",
        ] {
            assert!(FcmSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_credential_stays_out_of_debug_and_errors() {
        let provider = FcmProvider {
            client: remote::client(&Timeouts::default()).unwrap(),
            spec: FcmSpec::parse("project=p").unwrap(),
            name: "fcm project p".into(),
            authorization: {
                let mut v = HeaderValue::from_static("Bearer s3cr3t-token");
                v.set_sensitive(true);
                v
            },
            secret: "s3cr3t-token".into(),
        };
        assert!(!format!("{provider:?}").contains("s3cr3t"));
        let echoed = Outcome::Unauthorized("bad credential s3cr3t-token".into());
        assert_eq!(
            provider.redact(echoed),
            Outcome::Unauthorized("bad credential [redacted]".into())
        );
        let m = Message {
            user: 3,
            json: br#"{"campaign":"c","user":3,"title":"t","body":"b","key":"c:3"}"#,
            token: Some("device-3"),
        };
        let req = provider.request(&m).unwrap().build().unwrap();
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer s3cr3t-token");
        assert!(req.headers()[AUTHORIZATION].is_sensitive());
        assert!(!format!("{:?}", req.headers()).contains("s3cr3t"));
        let no_token = Message { token: None, ..m };
        assert!(matches!(
            provider.request(&no_token),
            Err(Outcome::Unreachable)
        ));
    }
}
