//! What the network providers (`http`, `fcm`) share: the pooled client and its timeouts, one
//! request per message under the concurrency slots and the rate limit, `Retry-After`, and the
//! reading of HTTP statuses and transport errors into [`Outcome`]s.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use super::{Attempt, Gate, Outcome};
use crate::error::{Error, Result};

/// The longest `Retry-After` obeyed: a bogus far-future date must not park a run for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// A keep-alive connection idle longer than this is closed rather than reused: a server or a
/// middlebox may have dropped it without a word.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Response bytes quoted in an error message, at most.
const SNIPPET_BYTES: usize = 200;

/// How long the network providers wait. Read from the environment, so a job file stays the
/// same across networks: `FANOUT_HTTP_CONNECT_TIMEOUT` (default 5 s) and `FANOUT_HTTP_TIMEOUT`
/// (the whole request, default 10 s), in humantime (`500ms`, `2s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Opening a connection (TCP and TLS).
    pub connect: Duration,
    /// One request, from sending to the end of the response.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(10),
        }
    }
}

impl Timeouts {
    /// The timeouts the environment sets, or the defaults.
    pub fn from_env() -> Result<Timeouts> {
        let read = |var: &str, default: Duration| -> Result<Duration> {
            match std::env::var(var) {
                Err(_) => Ok(default),
                Ok(v) => match humantime::parse_duration(v.trim()) {
                    Ok(d) if !d.is_zero() => Ok(d),
                    _ => Err(Error::Usage(format!(
                        "{var}={v:?}: expected a duration such as 500ms or 10s"
                    ))),
                },
            }
        };
        let default = Timeouts::default();
        Ok(Timeouts {
            connect: read("FANOUT_HTTP_CONNECT_TIMEOUT", default.connect)?,
            request: read("FANOUT_HTTP_TIMEOUT", default.request)?,
        })
    }
}

/// One keep-alive connection pool for a provider: rustls for `https` (HTTP/2 when the server
/// offers it through ALPN, HTTP/1.1 otherwise), no redirects (a POST must not turn into a GET
/// somewhere else).
pub fn client(timeouts: &Timeouts) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(timeouts.connect)
        .timeout(timeouts.request)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fanout/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::runtime(format!("cannot build the HTTP client: {}", chain(&e))))
}

/// One attempt at one message: `request` is the message's request built without I/O, or why
/// it is not sent at all (no token, too big: no rate token is taken then); otherwise `gate`
/// is passed right before `send` performs it, so the rate holds at the wire.
pub async fn attempt<R, S, F>(
    request: std::result::Result<R, Outcome>,
    gate: Gate<'_>,
    send: S,
) -> Attempt
where
    S: FnOnce(R) -> F,
    F: Future<Output = Option<Outcome>>,
{
    let request = match request {
        Ok(r) => r,
        Err(outcome) => return (Some(outcome), Duration::ZERO),
    };
    if !gate.pass(1).await {
        return (Some(Outcome::Held), Duration::ZERO);
    }
    let started = Instant::now();
    let outcome = send(request).await;
    (outcome, started.elapsed())
}

/// Bytes of a response's body read, at most: enough for any provider's error JSON.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A response's body, read to its end (so the connection goes back to the pool) unless it is
/// longer than [`MAX_BODY_BYTES`]: then only that much, and the connection is dropped. An
/// endpoint cannot make a push buffer without limit.
pub async fn body(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_BODY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() >= room {
            break;
        }
    }
    body
}

/// The wait a response's `Retry-After` asks for — delay-seconds or an HTTP-date, relative to
/// `now` — at most [`MAX_RETRY_AFTER`]. Absent or unreadable: `None`.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// What an HTTP status means for a push, the same for every provider: `None` for 2xx;
/// 401/403 are our credentials; 408, 429 and 5xx are worth retrying (after `after`); any
/// other status is permanent. `error` describes the failure.
pub fn by_status(status: StatusCode, after: Option<Duration>, error: String) -> Option<Outcome> {
    match status.as_u16() {
        200..=299 => None,
        401 | 403 => Some(Outcome::Unauthorized(error)),
        408 | 429 | 500..=599 => Some(Outcome::Retry { error, after }),
        _ => Some(Outcome::Permanent(error)),
    }
}

/// A request that got no response: a timeout, a refused or dropped connection, a TLS failure.
/// All are worth retrying, except a request that could not even be built.
pub fn transport_failure(name: &str, e: &reqwest::Error) -> Outcome {
    let error = format!("{name}: {}", chain(e));
    if e.is_builder() {
        Outcome::Unsendable(error)
    } else {
        Outcome::Retry { error, after: None }
    }
}

/// An error and its causes, `a: b: c`, without the request URL (it may carry userinfo).
pub fn chain(e: &reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let mut out = String::new();
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let text = match err.downcast_ref::<reqwest::Error>() {
            Some(re) => strip_url(re),
            None => err.to_string(),
        };
        if !text.is_empty() && !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = err.source();
    }
    if timeout && !out.contains("timed out") {
        out.push_str(" (timed out)");
    }
    out
}

fn strip_url(e: &reqwest::Error) -> String {
    // reqwest renders "… for url (…)"; its kind alone is what we want.
    let text = e.to_string();
    match text.find(" for url (") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The start of a response body for an error message: one line of printable text.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(SNIPPET_BYTES)]);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if body.len() > SNIPPET_BYTES {
        out.push('…');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on loopback whose first connection is answered 500 with a chunked body that
    /// never ends (64 MiB, then the socket is dropped): for the body limits' tests.
    pub(crate) async fn endless_error_server() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let head = "HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n";
            let _ = socket.write_all(head.as_bytes()).await;
            let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
            for _ in 0..1024 {
                if socket.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        addr
    }

    /// An endless error body is read to [`MAX_BODY_BYTES`], no further.
    #[tokio::test]
    async fn a_body_is_read_to_the_limit_only() {
        let addr = endless_error_server().await;
        let response = reqwest::get(format!("http://{addr}/")).await.unwrap();
        assert_eq!(body(response).await.len(), MAX_BODY_BYTES);
    }

    fn with_retry_after(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 1994-11-06 08:49:37
        let get = |v: &str| retry_after(&with_retry_after(v), now);
        assert_eq!(get("3"), Some(Duration::from_secs(3)));
        assert_eq!(get(" 0 "), Some(Duration::ZERO));
        assert_eq!(get("99999999999999999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            get("Sun, 06 Nov 1994 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        // The obsolete forms HTTP still allows.
        assert_eq!(
            get("Sunday, 06-Nov-94 08:49:42 GMT"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            get("Sun Nov  6 08:49:39 1994"),
            Some(Duration::from_secs(2))
        );
        // A date in the past means now; one far ahead is capped.
        assert_eq!(get("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(get("Fri, 01 Jan 2100 00:00:00 GMT"), Some(MAX_RETRY_AFTER));
        assert_eq!(get("soon"), None);
        assert_eq!(get("-1"), None);
        assert_eq!(get("1.5"), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let of = |code: u16| by_status(StatusCode::from_u16(code).unwrap(), None, "e".into());
        for ok in [200, 201, 202, 204] {
            assert_eq!(of(ok), None);
        }
        for retry in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(of(retry), Some(Outcome::Retry { .. })), "{retry}");
        }
        for ours in [401, 403] {
            assert!(matches!(of(ours), Some(Outcome::Unauthorized(_))), "{ours}");
        }
        for perm in [301, 400, 404, 410, 413, 422] {
            assert!(matches!(of(perm), Some(Outcome::Permanent(_))), "{perm}");
        }
        let after = Some(Duration::from_secs(2));
        assert_eq!(
            by_status(StatusCode::TOO_MANY_REQUESTS, after, "e".into()),
            Some(Outcome::Retry {
                error: "e".into(),
                after
            })
        );
    }

    #[test]
    fn snippets_are_one_short_line() {
        assert_eq!(snippet(b"  not\nfound \r\n"), "not found");
        let long = vec![b'x'; 1000];
        assert_eq!(snippet(&long).chars().count(), SNIPPET_BYTES + 1);
        assert_eq!(snippet(&[0xff, b'a']), "\u{fffd}a");
    }
}
