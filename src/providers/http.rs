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
use std::time::{Duration, SystemTime};

use hyper::Uri;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT,
};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;

use super::http1;
use super::remote::{self, Timeouts};
use super::{Attempt, Gate, Message, Outcome, Push};
use crate::error::{Error, Result};
use futures::future::BoxFuture;

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

/// The webhook provider: the URL every message is POSTed to, and how requests get there.
#[derive(Debug)]
pub struct HttpProvider {
    transport: Transport,
    spec: HttpSpec,
}

/// How requests reach the server.
#[derive(Debug)]
enum Transport {
    /// Plain `http://` without a proxy: our own keep-alive connections ([`http1`]).
    Wire(Box<Wire>),
    /// `https://`, or through a proxy: reqwest's pooled client.
    Client(reqwest::Client),
}

/// What every plain request repeats, made once.
#[derive(Debug)]
struct Wire {
    pool: http1::Pool,
    /// The whole request, connecting included.
    timeout: Duration,
    /// Each request's head up to the fields of its message: the request line, `Host`,
    /// `Content-Type`, `User-Agent`, `Accept`, and `Authorization` (basic auth from the URL's
    /// userinfo, as reqwest sends it).
    head: Vec<u8>,
}

/// The one field of a delivery record the request needs besides the record itself.
#[derive(Deserialize)]
struct Keyed<'a> {
    #[serde(borrow)]
    key: Cow<'a, str>,
}

/// The key of a delivery record: read off its end, where the renderer puts it
/// (`…,"key":"…"}`, with nothing escaped in it), else parsed. A raw `"` occurs in JSON only
/// around strings, so a record ending so holds a member `key` with that string: parsing the
/// whole record for it cost ~2.5% of a webhook run's CPU.
fn record_key(json: &[u8]) -> Option<Cow<'_, str>> {
    const FIELD: &[u8] = b",\"key\":\"";
    let read_off = || {
        let rest = json.strip_suffix(b"\"}")?;
        // The key's opening quote: the last one (a key read off holds none).
        let open = rest.iter().rposition(|&b| b == b'"')?;
        let (head, key) = rest.split_at(open + 1);
        let plain = head.ends_with(FIELD) && !key.contains(&b'\\');
        plain.then(|| std::str::from_utf8(key).ok()).flatten()
    };
    match read_off() {
        Some(key) => Some(Cow::Borrowed(key)),
        None => serde_json::from_slice::<Keyed<'_>>(json)
            .ok()
            .map(|k| k.key),
    }
}

/// A name made once: a `&str` name is copied into every request that carries it.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const USER_AGENT_VALUE: &str = concat!("fanout/", env!("CARGO_PKG_VERSION"));

impl HttpProvider {
    /// Builds the connection pool for `spec`.
    pub fn open(spec: HttpSpec, timeouts: &Timeouts) -> Result<HttpProvider> {
        let client = remote::client(timeouts)?;
        let transport = match spec.url.scheme() == "http" && !proxied() {
            true => Transport::Wire(Box::new(Wire::new(&spec, &client, timeouts)?)),
            false => Transport::Client(client),
        };
        Ok(HttpProvider { transport, spec })
    }

    /// How errors name it: `http provider URL`, without the URL's userinfo and query.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// POSTs each selected message, concurrently, one slot and one rate token each.
    async fn post(&self, m: &Message<'_>, gate: Gate<'_>) -> Attempt {
        match &self.transport {
            Transport::Wire(wire) => {
                remote::attempt(self.wire_request(wire, m), gate, |write| async move {
                    self.wire_outcome(wire, write).await
                })
                .await
            }
            Transport::Client(client) => remote::attempt(
                self.request(client, m),
                gate,
                |request: RequestBuilder| async move { self.outcome(request.send().await).await },
            )
            .await,
        }
    }

    /// The record's key, as a header carries it (visible ASCII, spaces, tabs), or why `m`
    /// cannot be sent.
    fn key<'m>(&self, m: &Message<'m>) -> std::result::Result<Cow<'m, str>, Outcome> {
        let bad =
            |what: &str| Outcome::Unsendable(format!("{}: user {}: {what}", self.name(), m.user));
        let key = record_key(m.json).ok_or_else(|| bad("the delivery record has no key"))?;
        let sendable = |b: u8| b == b'\t' || (b' '..=b'~').contains(&b);
        match key.bytes().all(sendable) {
            true => Ok(key),
            false => Err(bad("the key cannot be sent as a header")),
        }
    }

    /// What writes the plain request for `m` (the head, its key and length, the record),
    /// built without I/O: the headers reqwest would send.
    fn wire_request<'m>(
        &self,
        wire: &'m Wire,
        m: &Message<'m>,
    ) -> std::result::Result<impl Fn(&mut Vec<u8>) + 'm, Outcome> {
        let key = self.key(m)?;
        let body = m.json;
        Ok(move |out: &mut Vec<u8>| {
            out.extend_from_slice(&wire.head);
            out.extend_from_slice(b"idempotency-key: ");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\r\ncontent-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(body);
        })
    }

    /// Sends a plain request within the request timeout; what its answer (or none) means.
    async fn wire_outcome(&self, wire: &Wire, write: impl Fn(&mut Vec<u8>)) -> Option<Outcome> {
        let answer = match tokio::time::timeout(wire.timeout, wire.pool.send(write)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Some(self.no_answer(&e)),
            Err(_) => {
                let e = format!("no answer within {:?} (timed out)", wire.timeout);
                return Some(self.no_answer(&e));
            }
        };
        self.judge(answer.status, &answer.headers, &answer.body)
    }

    /// A request that got no answer: worth another attempt.
    fn no_answer(&self, error: &str) -> Outcome {
        Outcome::Retry {
            error: format!("{}: {error}", self.name()),
            after: None,
        }
    }

    /// The reqwest request for `m`, built without I/O.
    fn request(
        &self,
        client: &reqwest::Client,
        m: &Message<'_>,
    ) -> std::result::Result<RequestBuilder, Outcome> {
        // `key` holds only what a header value may (checked there), so reqwest takes it as is.
        let key = self.key(m)?;
        Ok(client
            .post(self.spec.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(IDEMPOTENCY_KEY, key.as_ref())
            .body(m.json.to_vec()))
    }

    /// What a reqwest response (or its absence) means.
    async fn outcome(&self, response: reqwest::Result<Response>) -> Option<Outcome> {
        let mut response = match response {
            Ok(r) => r,
            Err(e) => return Some(remote::transport_failure(self.name(), &e)),
        };
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let body = remote::body(response).await;
        self.judge(status, &headers, &body)
    }

    /// What an answer means: `None` for 2xx, else the outcome, its error quoting the body.
    fn judge(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<Outcome> {
        if status.is_success() {
            return None;
        }
        let after = remote::retry_after(headers, SystemTime::now());
        let snippet = remote::snippet(body);
        let error = match snippet.is_empty() {
            true => format!("{}: HTTP {status}", self.name()),
            false => format!("{}: HTTP {status}: {snippet}", self.name()),
        };
        remote::by_status(status, after, error)
    }
}

impl Wire {
    fn new(spec: &HttpSpec, client: &reqwest::Client, timeouts: &Timeouts) -> Result<Wire> {
        let url = &spec.url;
        let bad = |what: &str| Error::Usage(format!("{}: {what}", spec.name));
        let host = url.host_str().ok_or_else(|| bad("the URL names no host"))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| bad("the URL names no port"))?;
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        // reqwest turns the URL's userinfo into basic auth: ask it for the header once.
        let authorization = client
            .post(url.clone())
            .build()
            .map_err(|e| bad(&remote::chain(&e)))?
            .headers()
            .get(AUTHORIZATION)
            .cloned();
        let target: Uri = target
            .parse()
            .map_err(|_| bad("the URL's path cannot be sent"))?;
        let host_header = HeaderValue::from_str(&host_header)
            .map_err(|_| bad("the URL's host cannot be sent"))?;
        let mut head = format!("POST {target} HTTP/1.1\r\n").into_bytes();
        let mut field = |name: &HeaderName, value: &HeaderValue| {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        };
        field(&HOST, &host_header);
        field(&CONTENT_TYPE, &HeaderValue::from_static("application/json"));
        field(&USER_AGENT, &HeaderValue::from_static(USER_AGENT_VALUE));
        field(&ACCEPT, &HeaderValue::from_static("*/*"));
        if let Some(auth) = &authorization {
            field(&AUTHORIZATION, auth);
        }
        Ok(Wire {
            pool: http1::Pool::new(format!("{host}:{port}"), timeouts.connect),
            timeout: timeouts.request,
            head,
        })
    }
}

/// Whether the environment sends plain HTTP through a proxy (reqwest honours it; the wire
/// transport does not know how, so it steps aside).
fn proxied() -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

impl Push for HttpProvider {
    fn name(&self) -> String {
        self.spec.name.clone()
    }

    fn sends_each(&self) -> bool {
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

    fn message(json: &str) -> Message<'_> {
        Message {
            user: 7,
            json: json.as_bytes(),
            token: None,
        }
    }

    const RECORD: &str = r#"{"campaign":"c","user":7,"title":"t","body":"b","key":"c:7"}"#;

    /// A request parsed back: method, path, headers by lower-case name, body.
    type Parsed = (String, String, Vec<(String, String)>, Vec<u8>);

    /// The bytes a plain request for `m` goes out as, parsed back by httparse.
    fn written(p: &HttpProvider, m: &Message<'_>) -> Result<Parsed, Outcome> {
        let Transport::Wire(wire) = &p.transport else {
            panic!("plain http goes on the wire")
        };
        let mut out = Vec::new();
        (p.wire_request(wire, m)?)(&mut out);
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut fields);
        let httparse::Status::Complete(len) = req.parse(&out).unwrap() else {
            panic!("a whole head")
        };
        let headers: Vec<(String, String)> = (req.headers.iter())
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        let method = req.method.unwrap().to_owned();
        let path = req.path.unwrap().to_owned();
        Ok((method, path, headers, out[len..].to_vec()))
    }

    fn field<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
        let mut values = headers.iter().filter(|(n, _)| n == name);
        let value = values.next().map(|(_, v)| v.as_str());
        assert!(values.next().is_none(), "{name} once at most");
        value
    }

    /// The key read off a record's end is the one serde parses out of it, escapes, look-alikes
    /// inside strings and records not ending with their key included.
    #[test]
    fn a_records_key_is_what_serde_reads() {
        let records = [
            r#"{"campaign":"c","user":1,"title":"t","body":"b","key":"c:1"}"#,
            r#"{"campaign":"c","user":1,"title":"a,\"key\":\"x","body":"b","key":"c:1"}"#,
            r#"{"campaign":"c","user":1,"title":"t","body":"b","key":"c\u003a1"}"#,
            r#"{"campaign":"c","user":1,"title":"t","body":"b","key":"c\"1"}"#,
            r#"{"campaign":"c","user":1,"title":"t","body":"b","key":"ü:1"}"#,
            r#"{"campaign":"c","key":"c:1","user":1,"title":"t","body":"b"}"#,
            r#"{"campaign":"c","user":1,"title":"t","body":",\"key\":\"x\"}"}"#,
            r#"{"campaign":"c","user":1,"body":"b","key":"#,
        ];
        for r in records {
            let serde = serde_json::from_slice::<Keyed<'_>>(r.as_bytes())
                .ok()
                .map(|k| k.key);
            assert_eq!(record_key(r.as_bytes()), serde, "{r}");
        }
    }

    #[test]
    fn plain_requests_carry_the_record_and_its_key() {
        let spec = HttpSpec::parse("http://u:p@127.0.0.1:9/hook?sig=1").unwrap();
        let p = HttpProvider::open(spec, &Timeouts::default()).unwrap();
        let (method, path, headers, body) = written(&p, &message(RECORD)).unwrap();
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/hook?sig=1"));
        assert_eq!(field(&headers, "host"), Some("127.0.0.1:9"));
        assert_eq!(field(&headers, "content-type"), Some("application/json"));
        assert_eq!(field(&headers, "idempotency-key"), Some("c:7"));
        assert_eq!(field(&headers, "authorization"), Some("Basic dTpw"));
        assert_eq!(
            field(&headers, "content-length"),
            Some(RECORD.len().to_string().as_str())
        );
        assert_eq!(body, RECORD.as_bytes());
        let keyless = Message {
            user: 8,
            ..message(r#"{"user":8}"#)
        };
        assert!(
            matches!(written(&p, &keyless), Err(Outcome::Unsendable(e)) if e.contains("user 8"))
        );
        let split = message(r#"{"user":7,"key":"c:7\r\nx-evil: 1"}"#);
        assert!(matches!(written(&p, &split), Err(Outcome::Unsendable(e)) if e.contains("header")));
        let default_port = HttpSpec::parse("http://example.com/").unwrap();
        let p = HttpProvider::open(default_port, &Timeouts::default()).unwrap();
        let (_, path, headers, _) = written(&p, &message(RECORD)).unwrap();
        assert_eq!(path, "/");
        assert_eq!(field(&headers, "host"), Some("example.com"));
        assert_eq!(field(&headers, "authorization"), None);
    }

    #[test]
    fn tls_requests_carry_the_record_and_its_key() {
        let spec = HttpSpec::parse("https://127.0.0.1:9/hook").unwrap();
        let p = HttpProvider::open(spec, &Timeouts::default()).unwrap();
        let Transport::Client(client) = &p.transport else {
            panic!("https goes through reqwest")
        };
        let req = p
            .request(client, &message(RECORD))
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(req.method(), reqwest::Method::POST);
        assert_eq!(req.url().as_str(), "https://127.0.0.1:9/hook");
        assert_eq!(req.headers()["content-type"], "application/json");
        assert_eq!(req.headers()["idempotency-key"], "c:7");
        assert_eq!(
            req.body().and_then(|b| b.as_bytes()),
            Some(RECORD.as_bytes())
        );
    }
}
