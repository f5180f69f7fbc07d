//! Reading one HTTP/1.1 response off a keep-alive connection: the head parsed by `httparse`,
//! the body framed as RFC 9112 §6.3 says (no body, `Content-Length`, chunked, or up to the
//! close), and whether the connection may carry the next request.

use httparse::Status;
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A response read to its end.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers of a non-2xx answer (`Retry-After`); a 2xx answer's are not kept.
    pub headers: HeaderMap,
    /// The first [`KEPT_BODY_BYTES`] of a non-2xx answer's body, for its error message (a
    /// 2xx one's is read and dropped).
    pub body: Bytes,
}

/// Bytes of an answer's body kept for an error message, at most.
pub const KEPT_BODY_BYTES: usize = 4096;
/// Bytes of an answer's body read, at most: past this, the rest is not read and the
/// connection is not reused (an endpoint cannot make us buffer or drain without limit).
pub const MAX_READ_BYTES: usize = 1 << 20;
/// Bytes of a response head (or of a chunk-size line, or of trailers), at most.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header fields of a response head, at most.
const MAX_HEADERS: usize = 64;
/// Room made in the read buffer before each read.
const READ_ROOM: usize = 8 * 1024;

/// How a response's body ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// It has none (1xx, 204, 304).
    Empty,
    /// After this many bytes.
    Length(u64),
    /// With a zero-size chunk and the trailers.
    Chunked,
    /// When the server closes the connection.
    Close,
}

/// A response head, parsed.
struct Head {
    status: StatusCode,
    framing: Framing,
    /// The server will close the connection after this response.
    close: bool,
    /// Kept for a non-2xx status only.
    headers: HeaderMap,
}

/// Reads one response from `io` into `buf` (bytes already in `buf` come first; the buffer
/// is reused from response to response). Returns the answer and whether the connection may
/// carry another request: its body was read to the end, the server did not say it closes,
/// and nothing came after it. The error says what went wrong.
pub async fn read<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(Answer, bool), String> {
    let head = loop {
        let head = read_head(io, buf).await?;
        // An interim answer (100 Continue, 103 Early Hints) comes before the real one.
        if !head.status.is_informational() {
            break head;
        }
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err("the server switched protocols".into());
        }
    };
    let mut body = Body {
        keep: !head.status.is_success(),
        kept: Vec::new(),
        read: 0,
    };
    let whole = match head.framing {
        Framing::Empty => true,
        Framing::Length(n) => read_exactly(io, buf, n, &mut body).await?,
        Framing::Chunked => read_chunked(io, buf, &mut body).await?,
        Framing::Close => {
            read_to_close(io, buf, &mut body).await?;
            false
        }
    };
    let reusable = whole && !head.close && buf.is_empty();
    let answer = Answer {
        status: head.status,
        headers: head.headers,
        body: Bytes::from(body.kept),
    };
    Ok((answer, reusable))
}

/// What is read of a body: its first bytes if `keep`, and how many were read.
struct Body {
    keep: bool,
    kept: Vec<u8>,
    read: usize,
}

impl Body {
    /// Takes `data`; false once more than [`MAX_READ_BYTES`] were read.
    fn take(&mut self, data: &[u8]) -> bool {
        self.read += data.len();
        if self.keep && self.kept.len() < KEPT_BODY_BYTES {
            let room = KEPT_BODY_BYTES - self.kept.len();
            self.kept.extend_from_slice(&data[..data.len().min(room)]);
        }
        self.read <= MAX_READ_BYTES
    }
}

/// Reads more into `buf`; how many bytes (0: the server closed the connection).
async fn fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Vec<u8>) -> Result<usize, String> {
    buf.reserve(READ_ROOM);
    io.read_buf(buf).await.map_err(|e| e.to_string())
}

/// Reads more into `buf`, failing with `what` if the server closed the connection.
async fn more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<(), String> {
    match fill(io, buf).await? {
        0 => Err(format!("the connection closed before {what}")),
        _ => Ok(()),
    }
}

async fn read_head<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Vec<u8>) -> Result<Head, String> {
    loop {
        if let Some((len, head)) = parse_head(buf)? {
            buf.drain(..len);
            return Ok(head);
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(format!("a response head over {MAX_HEAD_BYTES} bytes"));
        }
        more(io, buf, "the response").await?;
    }
}

/// The head at the start of `buf` and its length, or `None` if it has not all come yet.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("a malformed response head: {e}")),
    };
    let code = response.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| format!("a bad status {code}"))?;
    // HTTP/1.0 closes unless it says keep-alive; HTTP/1.1 keeps unless it says close.
    let mut close = response.version == Some(0);
    let (mut length, mut encoded, mut chunked) = (None, false, false);
    for field in response.headers.iter() {
        let name = field.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = content_length(field.value)?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Length values".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked is the last coding applied when it is there at all.
            encoded = true;
            chunked = tokens(field.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in tokens(field.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && response.version == Some(0) {
                    close = false;
                }
            }
        }
    }
    let framing = match code {
        100..=199 | 204 | 304 => Framing::Empty,
        _ if encoded && chunked => Framing::Chunked,
        _ if encoded => Framing::Close,
        _ => length.map_or(Framing::Close, Framing::Length),
    };
    let mut headers = HeaderMap::new();
    if !status.is_success() {
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes());
            let value = HeaderValue::from_bytes(field.value);
            if let (Ok(name), Ok(value)) = (name, value) {
                headers.append(name, value);
            }
        }
    }
    let head = Head {
        status,
        framing,
        close,
        headers,
    };
    Ok(Some((len, head)))
}

fn content_length(value: &[u8]) -> Result<u64, String> {
    let bad = || "a bad Content-Length".to_owned();
    let text = std::str::from_utf8(value).map_err(|_| bad())?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Reads `n` body bytes; false if it stopped at [`MAX_READ_BYTES`].
async fn read_exactly<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    n: u64,
    body: &mut Body,
) -> Result<bool, String> {
    let mut left = n;
    loop {
        let here = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        let within = body.take(&buf[..here]);
        buf.drain(..here);
        left -= here as u64;
        if left == 0 {
            return Ok(within);
        }
        if !within {
            return Ok(false);
        }
        more(io, buf, "the response's end").await?;
    }
}

/// Reads a chunked body and its trailers; false if it stopped at [`MAX_READ_BYTES`].
async fn read_chunked<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    body: &mut Body,
) -> Result<bool, String> {
    loop {
        let size = match httparse::parse_chunk_size(buf) {
            Ok(Status::Complete((len, size))) => {
                buf.drain(..len);
                size
            }
            Ok(Status::Partial) if buf.len() <= MAX_HEAD_BYTES => {
                more(io, buf, "the response's end").await?;
                continue;
            }
            Ok(Status::Partial) | Err(_) => return Err("a malformed chunk size".into()),
        };
        if size == 0 {
            read_trailers(io, buf).await?;
            return Ok(true);
        }
        if !read_exactly(io, buf, size, body).await? {
            return Ok(false);
        }
        while buf.len() < 2 {
            more(io, buf, "the response's end").await?;
        }
        if buf[..2] != *b"\r\n" {
            return Err("a chunk not followed by CRLF".into());
        }
        buf.drain(..2);
    }
}

/// Reads the trailer fields after the last chunk, to the empty line that ends them.
async fn read_trailers<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Vec<u8>) -> Result<(), String> {
    loop {
        if buf.starts_with(b"\r\n") {
            buf.drain(..2);
            return Ok(());
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(buf, &mut fields) {
            Ok(Status::Complete((len, _))) => {
                buf.drain(..len);
                return Ok(());
            }
            Ok(Status::Partial) if buf.len() <= MAX_HEAD_BYTES => {
                more(io, buf, "the response's end").await?;
            }
            Ok(Status::Partial) | Err(_) => return Err("malformed trailers".into()),
        }
    }
}

/// Reads a body that ends when the server closes the connection.
async fn read_to_close<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    body: &mut Body,
) -> Result<(), String> {
    loop {
        let within = body.take(buf);
        buf.clear();
        if !within || fill(io, buf).await? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one response from `wire` given in pieces of `piece` bytes; the bytes left over.
    async fn read_all(wire: &[u8], piece: usize) -> (Result<(Answer, bool), String>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(64);
        let wire = wire.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in wire.chunks(piece.max(1)) {
                if server.write_all(part).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = Vec::new();
        let out = read(&mut client, &mut buf).await;
        drop(client);
        let _ = writer.await;
        (out, buf)
    }

    #[tokio::test]
    async fn bodies_end_where_their_framing_says_in_any_pieces() {
        let cases: [(&str, u16, &[u8], bool); 7] = [
            ("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 200, b"", true),
            ("HTTP/1.1 204 No Content\r\n\r\n", 204, b"", true),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nRetry-After: 3\r\nContent-Length: 4\r\n\r\nbusy",
                503,
                b"busy",
                true,
            ),
            (
                "HTTP/1.1 500 Oops\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
                500,
                b"abcde",
                true,
            ),
            ("HTTP/1.1 500 Oops\r\n\r\nuntil the end", 500, b"until the end", false),
            ("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", 200, b"", false),
            ("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", 200, b"", true),
        ];
        for (wire, status, kept, reusable) in cases {
            for piece in [1, 3, 1000] {
                let (out, left) = read_all(wire.as_bytes(), piece).await;
                let (answer, again) = out.unwrap_or_else(|e| panic!("{wire:?}: {e}"));
                assert_eq!(answer.status.as_u16(), status, "{wire:?}");
                assert_eq!(&answer.body[..], kept, "{wire:?}");
                assert_eq!(again, reusable, "{wire:?} in pieces of {piece}");
                assert!(left.is_empty(), "{wire:?}");
            }
        }
        let (out, _) = read_all(cases[2].0.as_bytes(), 7).await;
        assert_eq!(out.unwrap().0.headers["retry-after"], "3");
    }

    #[tokio::test]
    async fn a_2xx_answer_keeps_no_headers_nor_body_and_bytes_after_it_spoil_the_connection() {
        let wire = b"HTTP/1.1 200 OK\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\nokHTTP/1.1";
        let (out, left) = read_all(wire, 1000).await;
        let (answer, reusable) = out.unwrap();
        assert!(answer.headers.is_empty() && answer.body.is_empty());
        assert!(!reusable, "something came after the response");
        assert_eq!(left, b"HTTP/1.1");
    }

    #[tokio::test]
    async fn broken_responses_are_errors_that_say_what() {
        let cases = [
            ("", "closed before the response"),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",
                "closed before the response's end",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
                "two different",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                "bad Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
                "CRLF",
            ),
            ("HTTP/1.1 101 Switching\r\n\r\n", "switched protocols"),
            ("SMTP ready\r\n\r\n", "malformed response head"),
        ];
        for (wire, says) in cases {
            let (out, _) = read_all(wire.as_bytes(), 1000).await;
            let e = out.expect_err(wire);
            assert!(e.contains(says), "{wire:?}: {e}");
        }
    }

    /// An endpoint cannot make us buffer an error body without limit: 4 KiB of it are kept,
    /// and past 1 MiB the rest is not read (nor the connection reused).
    #[tokio::test]
    async fn an_endless_body_is_cut() {
        let mut wire = b"HTTP/1.1 500 Oops\r\nContent-Length: 99999999\r\n\r\n".to_vec();
        wire.extend(std::iter::repeat_n(b'x', MAX_READ_BYTES + 100_000));
        let (out, _) = read_all(&wire, 16 * 1024).await;
        let (answer, reusable) = out.unwrap();
        assert_eq!(answer.body.len(), KEPT_BODY_BYTES);
        assert!(!reusable);
    }
}
