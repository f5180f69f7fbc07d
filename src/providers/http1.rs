//! Plain `http://` near the wire: HTTP/1.1 keep-alive connections for the webhook provider,
//! at most one per concurrency slot in use, each driven by the task that sends on it.
//!
//! A request is written whole into the connection's own buffer and goes out in one `write`;
//! the answer is read into the connection's read buffer and framed by [`response::read`]
//! (`httparse` parses the head). Nothing is allocated per request on the way (a non-2xx
//! answer keeps its headers and the start of its body). A general client spends several
//! times the syscalls' cost per request (measured: hyper's own connection API with a task
//! per connection cost twice this module's CPU per request against the same nginx, see
//! README): a request built as a header map, encoded, handed through a channel to the
//! connection's task and its answer back through another. `https://` and proxies stay with
//! reqwest (TLS, HTTP/2).

use std::io::ErrorKind;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::remote::POOL_IDLE_TIMEOUT;

mod response;
pub use response::Answer;

/// One keep-alive connection and its buffers, reused from request to request.
struct Conn {
    stream: TcpStream,
    /// The request being written.
    out: Vec<u8>,
    /// What was read and not yet taken.
    input: Vec<u8>,
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

    /// Sends the request `write` puts in a buffer (the whole request: head and body) and
    /// reads its response to the end; the error says why no response came. A pooled
    /// connection the server closed meanwhile is dropped and the request goes out on
    /// another, as it does when a reused connection takes none of the request; a request
    /// that may have reached the server is never sent twice here.
    pub async fn send(&self, write: impl Fn(&mut Vec<u8>)) -> Result<Answer, String> {
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            conn.out.clear();
            write(&mut conn.out);
            match write_all(&mut conn.stream, &conn.out).await {
                Ok(()) => {}
                Err((0, _)) if reused => continue,
                Err((_, e)) => return Err(format!("cannot send the request: {e}")),
            }
            let (answer, reusable) = response::read(&mut conn.stream, &mut conn.input).await?;
            if reusable {
                self.checkin(conn);
            }
            return Ok(answer);
        }
    }

    /// The most recently used idle connection still open; older ones idle past
    /// [`POOL_IDLE_TIMEOUT`], and those the server closed, are dropped on the way.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.idle_since.elapsed() < POOL_IDLE_TIMEOUT && quiet(&conn.stream) {
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
        Ok(Conn {
            stream,
            out: Vec::new(),
            input: Vec::new(),
            idle_since: Instant::now(),
        })
    }
}

/// Whether an idle connection has nothing to read: no close, no stray bytes. Costs no
/// syscall unless the socket was marked readable since its last answer was read (a read
/// that leaves room in the buffer clears the mark).
fn quiet(stream: &TcpStream) -> bool {
    matches!(stream.try_read(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

/// Writes all of `bytes`; on failure, how many went out before it.
async fn write_all(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), (usize, String)> {
    let mut sent = 0;
    while sent < bytes.len() {
        match stream.write(&bytes[sent..]).await {
            Ok(0) => return Err((sent, "the connection closed".into())),
            Ok(n) => sent += n,
            Err(e) => return Err((sent, e.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn post(out: &mut Vec<u8>) {
        out.extend_from_slice(b"POST /hook HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi");
    }

    /// A test server and what it counted.
    struct Server {
        addr: String,
        requests: Arc<AtomicUsize>,
        connections: Arc<AtomicUsize>,
    }

    /// A server that answers each request ([`post`]'s) with `answer` (or not at all); with
    /// `keep_alive` it goes on reading the connection, else it closes it after the first
    /// request without saying so first.
    async fn server(answer: Option<&'static str>, keep_alive: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (reqs, conns) = (requests.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                conns.fetch_add(1, SeqCst);
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        // The request's head and its 2-byte body.
                        while let Some(end) = got.windows(6).position(|w| w == b"\r\n\r\nhi") {
                            got.drain(..end + 6);
                            reqs.fetch_add(1, SeqCst);
                            if let Some(answer) = answer {
                                if socket.write_all(answer.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            if !keep_alive {
                                return;
                            }
                        }
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        Server {
            addr,
            requests,
            connections,
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn one_connection_carries_request_after_request() {
        let server = server(Some(OK), true).await;
        let pool = Pool::new(server.addr, Duration::from_secs(1));
        for _ in 0..20 {
            let answer = pool.send(post).await.unwrap();
            assert_eq!(answer.status, hyper::StatusCode::OK);
        }
        assert_eq!(server.connections.load(SeqCst), 1);
        // As many connections as requests in flight at once, and no more.
        let sends: Vec<_> = (0..8).map(|_| pool.send(post)).collect();
        for answer in futures::future::join_all(sends).await {
            assert_eq!(answer.unwrap().status, hyper::StatusCode::OK);
        }
        assert_eq!(server.connections.load(SeqCst), 8);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced() {
        let server = server(Some(OK), false).await;
        let pool = Pool::new(server.addr, Duration::from_secs(1));
        for _ in 0..5 {
            let answer = pool.send(post).await.unwrap();
            assert_eq!(answer.status, hyper::StatusCode::OK);
            assert!(answer.body.is_empty(), "a 2xx body is not kept");
            // Let the server's close arrive before the next checkout.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(server.requests.load(SeqCst), 5, "each request sent once");
    }

    #[tokio::test]
    async fn a_request_left_unanswered_is_not_sent_again() {
        let server = server(None, false).await;
        let pool = Pool::new(server.addr, Duration::from_secs(1));
        let e = pool.send(post).await.unwrap_err();
        assert!(!e.is_empty());
        assert_eq!(server.requests.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn error_answers_keep_their_body_and_headers() {
        let busy =
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 3\r\ncontent-length: 4\r\n\r\nbusy";
        let server = server(Some(busy), false).await;
        let answer = Pool::new(server.addr, Duration::from_secs(1))
            .send(post)
            .await
            .unwrap();
        assert_eq!(answer.status, hyper::StatusCode::SERVICE_UNAVAILABLE);
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
            .send(post)
            .await
            .unwrap();
        assert_eq!(answer.status, hyper::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.body.len(), response::KEPT_BODY_BYTES);
    }

    #[tokio::test]
    async fn a_refused_connection_says_where() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = Pool::new(addr.clone(), Duration::from_secs(1))
            .send(post)
            .await
            .unwrap_err();
        assert!(e.starts_with(&format!("cannot connect to {addr}")), "{e}");
    }
}
