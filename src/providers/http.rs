//! `http://…` / `https://…`: a webhook. One POST per message; the body is the delivery record
//! exactly as `log:` writes it ([`Message::json`]), with `Content-Type: application/json` and
//! `Idempotency-Key: <the record's key>` — the same key on every attempt and every re-run, so
//! a receiver that honours it never shows a message twice.
//!
//! 2xx is delivered; 408, 429, 5xx, timeouts and connection failures are retried (after the
//! response's `Retry-After`, if any); 401/403 are our credentials and stop the run after a
//! few in a row (see [`super::dispatch`]); any other status is permanent.

use std::borrow::Cow;
use std::fmt;
use std::time::SystemTime;

use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{RequestBuilder, Response, Url};
use serde::Deserialize;

use super::rate::RateLimiter;
use super::remote::{self, Timeouts};
use super::{Attempt, Message, Outcome};
use crate::error::Result;

/// A webhook URL, parsed and checked.
#[derive(Clone, PartialEq)]
pub struct HttpSpec {
    url: Url,
    name: String,
}

impl fmt::Debug for HttpSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL's userinfo and query may hold a secret: show the name only.
        f.debug_tuple("HttpSpec").field(&self.name).finish()
    }
}

impl HttpSpec {
    /// Parses an `http://…` or `https://…` provider URL.
    pub fn parse(url: &str) -> std::result::Result<HttpSpec, String> {
        let url = Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("expected an http:// or https:// URL".into());
        }
        let Some(host) = url.host_str() else {
            return Err("the URL names no host".into());
        };
        // How errors and logs name it: no userinfo, no query (either may hold a secret).
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        let name = format!(
            "http provider {}://{host}{port}{}",
            url.scheme(),
            url.path()
        );
        Ok(HttpSpec { url, name })
    }

    /// How errors name it: `http provider URL`, without the URL's userinfo and query.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The webhook provider: a pooled client and the URL every message is POSTed to.
#[derive(Debug)]
pub struct HttpProvider {
    client: reqwest::Client,
    spec: HttpSpec,
}

/// The one field of a delivery record the request needs besides the record itself.
#[derive(Deserialize)]
struct Keyed<'a> {
    #[serde(borrow)]
    key: Cow<'a, str>,
}

impl HttpProvider {
    /// Builds the connection pool for `spec`.
    pub fn open(spec: HttpSpec, timeouts: &Timeouts) -> Result<HttpProvider> {
        Ok(HttpProvider {
            client: remote::client(timeouts)?,
            spec,
        })
    }

    /// How errors name it: `http provider URL`, without the URL's userinfo and query.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// POSTs each selected message, concurrently, one slot and one rate token each.
    pub async fn send_one(&self, m: &Message<'_>, rate: Option<&RateLimiter>) -> Attempt {
        remote::attempt(
            self.request(m),
            rate,
            |request: RequestBuilder| async move { self.outcome(request.send().await).await },
        )
        .await
    }

    /// The request for `m`, built without I/O.
    fn request(&self, m: &Message<'_>) -> std::result::Result<RequestBuilder, Outcome> {
        let bad =
            |what: &str| Outcome::Permanent(format!("{}: user {}: {what}", self.name(), m.user));
        let keyed: Keyed<'_> =
            serde_json::from_str(m.json).map_err(|_| bad("the delivery record has no key"))?;
        let key = HeaderValue::from_str(&keyed.key)
            .map_err(|_| bad("the key cannot be sent as a header"))?;
        Ok(self
            .client
            .post(self.spec.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("idempotency-key", key)
            .body(m.json.to_owned()))
    }

    /// What a response (or its absence) means.
    async fn outcome(&self, response: reqwest::Result<Response>) -> Option<Outcome> {
        let response = match response {
            Ok(r) => r,
            Err(e) => return Some(remote::transport_failure(self.name(), &e)),
        };
        let status = response.status();
        let after = remote::retry_after(response.headers(), SystemTime::now());
        // Read to the end either way, so the connection goes back to the pool.
        let body = response.bytes().await;
        if status.is_success() {
            return None;
        }
        let snippet = body.map(|b| remote::snippet(&b)).unwrap_or_default();
        let error = match snippet.is_empty() {
            true => format!("{}: HTTP {status}", self.name()),
            false => format!("{}: HTTP {status}: {snippet}", self.name()),
        };
        remote::by_status(status, after, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_named_without_secrets() {
        let spec =
            HttpSpec::parse("https://user:pw@push.example.com:8443/v1/send?sig=abc").unwrap();
        assert_eq!(
            spec.name(),
            "http provider https://push.example.com:8443/v1/send"
        );
        assert_eq!(
            HttpSpec::parse("http://127.0.0.1:9/").unwrap().name(),
            "http provider http://127.0.0.1:9/"
        );
        assert!(!format!("{spec:?}").contains("pw"));
        assert!(HttpSpec::parse("http://").is_err());
        assert!(HttpSpec::parse("http://exa mple.com/").is_err());
    }

    #[test]
    fn requests_carry_the_record_and_its_key() {
        let spec = HttpSpec::parse("http://127.0.0.1:9/hook").unwrap();
        let p = HttpProvider::open(spec, &Timeouts::default()).unwrap();
        let json = r#"{"campaign":"c","user":7,"title":"t","body":"b","key":"c:7"}"#;
        let m = Message {
            user: 7,
            json,
            token: None,
        };
        let req = p.request(&m).unwrap().build().unwrap();
        assert_eq!(req.method(), reqwest::Method::POST);
        assert_eq!(req.url().as_str(), "http://127.0.0.1:9/hook");
        assert_eq!(req.headers()["content-type"], "application/json");
        assert_eq!(req.headers()["idempotency-key"], "c:7");
        assert_eq!(req.body().and_then(|b| b.as_bytes()), Some(json.as_bytes()));
        let keyless = Message {
            user: 8,
            json: r#"{"user":8}"#,
            token: None,
        };
        assert!(matches!(p.request(&keyless), Err(Outcome::Permanent(e)) if e.contains("user 8")));
    }
}
