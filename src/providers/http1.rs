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
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::remote::POOL_IDLE_TIMEOUT;

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
    /// When it was last put back idle.
    idle_since: Instant,
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
            let Conn { send, io, open, .. } = &mut conn;
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
            let (body, whole) = match drive(&mut conn.io, &mut conn.open, read(body, keep)).await {
                Some(Ok(read)) => read,
                Some(Err(e)) => return Err(causes(&e)),
                None => return Err("the connection closed before the response's end".into()),
            };
            if whole && conn.open && !conn.send.is_closed() {
                self.checkin(conn);
            }
            return Ok(Answer {
                status: head.status,
                headers: head.headers,
                body,
            });
        }
    }

    /// The most recently used idle connection; older ones idle past [`POOL_IDLE_TIMEOUT`]
    /// are closed on the way.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.idle_since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, mut conn: Conn) {
        conn.idle_since = Instant::now();
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
            idle_since: Instant::now(),
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

/// Bytes of an answer's body kept for an error message, at most.
const KEPT_BODY_BYTES: usize = 4096;
/// Bytes of an answer's body read, at most: past this, the rest is not read and the
/// connection is not reused (an endpoint cannot make us buffer or drain without limit).
const MAX_READ_BYTES: usize = 1 << 20;

/// Reads `body` to its end, so the connection can take the next request; keeps its first
/// [`KEPT_BODY_BYTES`] if `keep`. Returns them, and whether the body was read to its end
/// (false past [`MAX_READ_BYTES`]).
async fn read(mut body: Incoming, keep: bool) -> hyper::Result<(Bytes, bool)> {
    let mut kept = Vec::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        read += data.len();
        if keep && kept.len() < KEPT_BODY_BYTES {
            let room = KEPT_BODY_BYTES - kept.len();
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
        if read > MAX_READ_BYTES {
            return Ok((Bytes::from(kept), false));
        }
    }
    Ok((Bytes::from(kept), true))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server that reads one request per connection, answers it with `answer` (or not at
    /// all) and closes the connection without saying so first; counts the requests.
    async fn one_shot_server(answer: Option<&'static str>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1024];
                    // The request's head and its 2-byte body.
                    while !got.windows(6).any(|w| w == b"\r\n\r\nhi") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, SeqCst);
                    if let Some(answer) = answer {
                        let _ = socket.write_all(answer.as_bytes()).await;
                    }
                });
            }
        });
        (addr, seen)
    }

    fn post() -> Request<Body> {
        let mut request = Request::new(Body::new(Bytes::from_static(b"hi")));
        *request.method_mut() = hyper::Method::POST;
        *request.uri_mut() = "/hook".parse().unwrap();
        request
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced() {
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (addr, seen) = one_shot_server(Some(ok)).await;
        let pool = Pool::new(addr, Duration::from_secs(1));
        for _ in 0..5 {
            let answer = pool.send(post()).await.unwrap();
            assert_eq!(answer.status, StatusCode::OK);
            assert!(answer.body.is_empty(), "a 2xx body is not kept");
            // Let the server's close arrive before the next checkout.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(seen.load(SeqCst), 5, "each request sent once");
    }

    #[tokio::test]
    async fn a_request_left_unanswered_is_not_sent_again() {
        let (addr, seen) = one_shot_server(None).await;
        let pool = Pool::new(addr, Duration::from_secs(1));
        let e = pool.send(post()).await.unwrap_err();
        assert!(!e.is_empty());
        assert_eq!(seen.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn error_answers_keep_their_body_and_headers() {
        let busy =
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 3\r\ncontent-length: 4\r\n\r\nbusy";
        let (addr, _) = one_shot_server(Some(busy)).await;
        let answer = Pool::new(addr, Duration::from_secs(1))
            .send(post())
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers["retry-after"], "3");
        assert_eq!(&answer.body[..], b"busy");
    }

    /// An endpoint cannot make us buffer an error body without limit: 4 KiB of it are kept,
    /// and past 1 MiB the rest is not read (nor the connection reused).
    #[tokio::test]
    async fn an_endless_error_body_is_cut() {
        let addr = super::super::remote::tests::endless_error_server()
            .await
            .to_string();
        let answer = Pool::new(addr, Duration::from_secs(1))
            .send(post())
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.body.len(), KEPT_BODY_BYTES);
    }

    #[tokio::test]
    async fn a_refused_connection_says_where() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = Pool::new(addr.clone(), Duration::from_secs(1))
            .send(post())
            .await
            .unwrap_err();
        assert!(e.starts_with(&format!("cannot connect to {addr}")), "{e}");
    }
}
