//! A real HTTP/1.1 server on 127.0.0.1:0, on its own tokio runtime inside the test process,
//! for the `http` and `fcm` provider tests: it records every request and answers what the
//! test's handler says — a status (with `Retry-After`), a dropped connection, a response
//! slower than the client's timeout, or no response at all while the server lives. It also judges one thing itself: a retry that comes
//! before the `Retry-After` it was given is counted as early.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// One request as the handler sees it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// `Retry-After` as seconds or as an HTTP-date this far ahead.
#[derive(Debug, Clone, Copy)]
pub enum RetryAfter {
    Secs(u64),
    DateIn(Duration),
}

/// What the server does with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer `status` with `body` (JSON), maybe with `Retry-After`.
    Status {
        status: u16,
        body: String,
        retry_after: Option<RetryAfter>,
    },
    /// Close the connection without answering.
    Drop,
    /// Answer 503 only after `delay` (past the client's timeout).
    Slow(Duration),
    /// Answer 200 after `delay`: a provider with latency.
    OkAfter(Duration),
    /// Never answer: the connection is held open until the server is dropped, so the client's
    /// timeout fires however slow the machine is.
    Hold,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::status(200, "{}")
    }

    pub fn status(status: u16, body: &str) -> Reply {
        Reply::Status {
            status,
            body: body.to_owned(),
            retry_after: None,
        }
    }

    pub fn after(self, retry_after: RetryAfter) -> Reply {
        match self {
            Reply::Status { status, body, .. } => Reply::Status {
                status,
                body,
                retry_after: Some(retry_after),
            },
            other => other,
        }
    }
}

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    Dropped,
    Slow,
    Held,
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Hit {
    pub at: Instant,
    /// The idempotency key the test's `key_of` read from it ("" if none).
    pub key: String,
    /// 1 for the first request with this key, 2 for the second, …
    pub attempt: u32,
    pub answer: Answer,
    pub req: Req,
}

type Handler = dyn Fn(&Req, &str, u32) -> Reply + Send + Sync;

struct State {
    key_of: fn(&Req) -> Option<String>,
    handler: Box<Handler>,
    hits: Mutex<Vec<Hit>>,
    attempts: Mutex<HashMap<String, u32>>,
    /// Per key: no retry before this instant (the last `Retry-After`).
    not_before: Mutex<HashMap<String, Instant>>,
    early: Mutex<Vec<String>>,
}

/// The running server; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    /// Starts a server whose `handler(request, key, attempt)` decides every answer; `key_of`
    /// reads a request's idempotency key.
    pub fn start(
        key_of: fn(&Req) -> Option<String>,
        handler: impl Fn(&Req, &str, u32) -> Reply + Send + Sync + 'static,
    ) -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("test-server")
            .build()
            .unwrap();
        let state = Arc::new(State {
            key_of,
            handler: Box::new(handler),
            hits: Mutex::new(Vec::new()),
            attempts: Mutex::new(HashMap::new()),
            not_before: Mutex::new(HashMap::new()),
            early: Mutex::new(Vec::new()),
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let accept_state = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = accept_state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    // A dropped connection ends here with an error, as intended.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer {
            addr,
            state,
            runtime: Some(runtime),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// Keys retried before their `Retry-After` was up.
    pub fn early_retries(&self) -> Vec<String> {
        self.state.early.lock().unwrap().clone()
    }

    /// How many 2xx answers each key got.
    pub fn ok_counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for h in self.hits() {
            if matches!(h.answer, Answer::Status(200..=299)) {
                *out.entry(h.key).or_default() += 1;
            }
        }
        out
    }

    /// How many requests arrived, and the time from the first arrival to the last.
    pub fn arrivals(&self) -> (usize, Duration) {
        let hits = self.hits();
        let first = hits.iter().map(|h| h.at).min();
        let last = hits.iter().map(|h| h.at).max();
        let span = first.zip(last).map_or(Duration::ZERO, |(f, l)| l - f);
        (hits.len(), span)
    }

    /// The most requests that arrived within any one-second window.
    pub fn busiest_second(&self) -> usize {
        let mut at: Vec<Instant> = self.hits().iter().map(|h| h.at).collect();
        at.sort_unstable();
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..at.len() {
            while at[hi] - at[lo] >= Duration::from_secs(1) {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Returned by the service to make hyper close the connection without a response.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dropped on purpose")
    }
}

impl std::error::Error for DropConnection {}

async fn handle(
    state: Arc<State>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, DropConnection> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| DropConnection)?.to_bytes();
    let req = Req {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
    };
    let at = Instant::now();
    let key = (state.key_of)(&req).unwrap_or_default();
    let attempt = {
        let mut attempts = state.attempts.lock().unwrap();
        let n = attempts.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    if let Some(deadline) = state.not_before.lock().unwrap().remove(&key) {
        if at < deadline {
            state.early.lock().unwrap().push(key.clone());
        }
    }
    let reply = (state.handler)(&req, &key, attempt);
    let answer = match &reply {
        Reply::Status { status, .. } => Answer::Status(*status),
        Reply::Drop => Answer::Dropped,
        Reply::Slow(_) => Answer::Slow,
        Reply::OkAfter(_) => Answer::Status(200),
        Reply::Hold => Answer::Held,
    };
    state.hits.lock().unwrap().push(Hit {
        at,
        key: key.clone(),
        attempt,
        answer,
        req,
    });
    match reply {
        Reply::Drop => Err(DropConnection),
        Reply::Hold => std::future::pending().await,
        Reply::Slow(delay) => {
            tokio::time::sleep(delay).await;
            Ok(response(503, "{}".into(), None))
        }
        Reply::OkAfter(delay) => {
            tokio::time::sleep(delay).await;
            Ok(response(200, "{}".into(), None))
        }
        Reply::Status {
            status,
            body,
            retry_after,
        } => {
            let header = retry_after.map(|r| {
                let (wait, value) = match r {
                    RetryAfter::Secs(s) => (Duration::from_secs(s), s.to_string()),
                    RetryAfter::DateIn(d) => {
                        // HTTP-dates have whole seconds: round up so the date is never early.
                        let when = SystemTime::now() + d + Duration::from_secs(1);
                        let shown = httpdate::fmt_http_date(when);
                        let shown_at = httpdate::parse_http_date(&shown).unwrap();
                        let wait = shown_at
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        (wait, shown)
                    }
                };
                state
                    .not_before
                    .lock()
                    .unwrap()
                    .insert(key.clone(), Instant::now() + wait);
                value
            });
            Ok(response(status, body, header))
        }
    }
}

fn response(
    status: u16,
    body: String,
    retry_after: Option<String>,
) -> hyper::Response<Full<Bytes>> {
    let mut b = hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(v) = retry_after {
        b = b.header("retry-after", v);
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

/// FNV-1a of a key: the fault a key gets is a pure function of it.
pub fn fault_bucket(key: &str, buckets: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % buckets
}

/// Runs the real `fanout` binary in `dir` with extra environment variables.
pub fn fanout(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
    cmd.args(args).current_dir(dir).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run fanout")
}

/// stderr of an `Output`, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Tests of one binary that time requests (rate windows, timeouts) run one at a time, so
/// they do not share the two cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The dead letters file as JSON values (missing file: none).
pub fn dead_letters(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .map(|l| serde_json::from_str(l).expect("dead letter is JSON"))
                .collect()
        })
        .unwrap_or_default()
}
