//! Plain `http://` near the wire: HTTP/1.1 keep-alive connections for the webhook provider,
//! at most one per concurrency slot in use, each driven by the task that sends on it.
//!
//! A general client (reqwest over hyper-util's pool) spends several times the syscalls' cost
//! per request: the URL is re-parsed and re-rendered, default headers merged, the request
//! cloned for redirects, the pool locked and keyed, and every request crosses from the
//! sending task to a connection task and back through channels. Here a request takes an idle
//! connection (or opens one), polls the connection's I/O inline beside its own response until
//! the body has been read, and puts the connection back: one task, no hop. `https://` stays
//! with reqwest (TLS, HTTP/2).

use std::error::Error as StdError;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What a request carries: the whole record, already in memory.
pub type Body = Full<Bytes>;

/// A response read to its end.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers (`Retry-After`).
    pub headers: HeaderMap,
    /// The body of a non-2xx answer, for its error message (a 2xx one's is read and
    /// dropped).
    pub body: Bytes,
}

/// One keep-alive connection: the handle requests go in by, and its I/O, which whoever holds
/// the connection polls.
struct Conn {
    send: SendRequest<Body>,
    io: Io,
    /// Whether `io` may still be polled (it has not ended).
    open: bool,
}

/// Connections to one `host:port`, idle ones kept for the next request.
pub struct Pool {
    /// Where to connect, `host:port`.
    addr: String,
    connect_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

impl Pool {
    /// A pool for `addr` (`host:port`); connects lazily.
    pub fn new(addr: String, connect_timeout: Duration) -> Pool {
        Pool {
            addr,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `request` and reads its response to the end; the error says why no response
    /// came. A pooled connection the server closed meanwhile is dropped and the request goes
    /// out on another, as it does when a reused connection closes before taking the request;
    /// a request that may have reached the server is never sent twice here.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Answer, String> {
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            let Conn { send, io, open } = &mut conn;
            let ready = drive(io, open, poll_fn(|cx| send.poll_ready(cx))).await;
            if ready.is_none_or(|ready| ready.is_err()) {
                if reused {
                    continue;
                }
                return Err("the connection closed before the request was sent".into());
            }
            let sent = conn.send.try_send_request(request);
            let response = match drive(&mut conn.io, &mut conn.open, sent).await {
                Some(Ok(response)) => response,
                Some(Err(mut e)) => match e.take_message() {
                    Some(back) if reused => {
                        request = back;
                        continue;
                    }
                    _ => return Err(causes(e.error())),
                },
                None => return Err("the connection closed before the response".into()),
            };
            let (head, body) = response.into_parts();
            let keep = !head.status.is_success();
            let body = match drive(&mut conn.io, &mut conn.open, read(body, keep)).await {
                Some(Ok(body)) => body,
                Some(Err(e)) => return Err(causes(&e)),
                None => return Err("the connection closed before the response's end".into()),
            };
            if conn.open && !conn.send.is_closed() {
                self.checkin(conn);
            }
            return Ok(Answer {
                status: head.status,
                headers: head.headers,
                body,
            });
        }
    }

    fn checkout(&self) -> Option<Conn> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn checkin(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    async fn connect(&self) -> Result<Conn, String> {
        let cannot = |why: String| format!("cannot connect to {}: {why}", self.addr);
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| cannot(format!("timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| cannot(e.to_string()))?;
        stream
            .set_nodelay(true)
            .map_err(|e| cannot(e.to_string()))?;
        let (send, io) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| cannot(causes(&e)))?;
        Ok(Conn {
            send,
            io: Box::pin(io),
            open: true,
        })
    }
}

/// A connection's I/O, polled by whoever holds the connection.
type Io = Pin<Box<Connection<TokioIo<TcpStream>, Body>>>;

/// Polls `fut` to its end while polling a connection's I/O in the same task; `None` if the
/// connection ended (closed or failed: `open` turns false) and left `fut` unfinished.
async fn drive<F: Future>(io: &mut Io, open: &mut bool, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        // The I/O first: what it reads or writes is what `fut` waits for.
        if *open && io.as_mut().poll(cx).is_ready() {
            *open = false;
        }
        match fut.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending if !*open => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Reads `body` to its end (so the connection can take the next request); returns it if
/// `keep`.
async fn read(mut body: Incoming, keep: bool) -> hyper::Result<Bytes> {
    if keep {
        return Ok(body.collect().await?.to_bytes());
    }
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(Bytes::new())
}

/// An error and its causes, `a: b: c`.
fn causes(e: &(dyn StdError + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !text.is_empty() && !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = err.source();
    }
    out
}
