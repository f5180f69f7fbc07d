//! A line reader that never holds more than one bounded line in memory.
//!
//! `BufRead::lines` would buffer a 20 MB line whole before anyone could refuse it. This reader
//! takes at most [`MAX_LINE`] bytes of a line (plus its ending) and discards the rest of a
//! longer one, so one bad line costs neither memory nor the lines after it.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};

use crate::error::{Error, InputError, Result};

/// The longest line accepted, in bytes, not counting its `\n` or `\r\n` ending (SPEC: 1 MiB).
pub const MAX_LINE: usize = 1 << 20;

/// The UTF-8 byte order mark some editors put at the start of a file.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One line as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// A line of valid UTF-8, its `\n` or `\r\n` ending removed.
    Text(&'a str),
    /// A line longer than [`MAX_LINE`]; the rest of it has been skipped.
    TooLong,
    /// A line that is not valid UTF-8.
    BadUtf8 {
        /// How many leading bytes were valid.
        valid_up_to: usize,
    },
}

impl<'a> Line<'a> {
    /// The text of a good line, or what is wrong with a bad one (for an [`InputError`]).
    pub fn text(self) -> Result<&'a str, String> {
        match self {
            Line::Text(text) => Ok(text),
            Line::TooLong => Err(format!("line longer than 1 MiB ({MAX_LINE} bytes)")),
            Line::BadUtf8 { valid_up_to } => Err(format!(
                "not valid UTF-8 (bad byte after {valid_up_to} good ones)"
            )),
        }
    }
}

/// Calls `f(line_number, text)` for every non-blank line of the file at `path`, read with a
/// [`LineReader`]. A line `f` refuses, or one too long or not UTF-8, stops the reading with
/// [`Error::BadInput`], or is skipped if `skip_bad`. Returns how many lines were skipped.
///
/// For the simple JSON Lines inputs (logins, granted); the user files have their own loop.
pub fn for_each_line<F>(path: &str, skip_bad: bool, mut f: F) -> Result<u64>
where
    F: FnMut(u64, &str) -> Result<(), InputError>,
{
    let file = File::open(path)
        .map_err(|e| InputError::new(path, None, "", format!("cannot open: {e}")))?;
    let mut lines = LineReader::new(BufReader::with_capacity(1 << 16, file));
    let mut skipped = 0;
    while let Some((no, line)) = lines
        .next_line()
        .map_err(|e| Error::runtime(format!("cannot read {path}: {e}")))?
    {
        let outcome = match line.text() {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => f(no, text),
            Err(msg) => Err(InputError::new(path, Some(no), "", msg)),
        };
        match outcome {
            Ok(()) => {}
            Err(_) if skip_bad => skipped += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(skipped)
}

/// Reads lines of at most [`MAX_LINE`] bytes, numbering them from 1.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    line: u64,
}

impl<R: BufRead> LineReader<R> {
    /// A reader over `inner`, before its first line.
    pub fn new(inner: R) -> Self {
        LineReader {
            inner,
            buf: Vec::new(),
            line: 0,
        }
    }

    /// The next line and its 1-based number, or `None` at the end of the input.
    ///
    /// A UTF-8 byte order mark at the start of line 1 is dropped.
    pub fn next_line(&mut self) -> io::Result<Option<(u64, Line<'_>)>> {
        self.buf.clear();
        // Room for a full-length line and a `\r\n` ending; anything longer is cut here.
        let limit = MAX_LINE as u64 + 2;
        let n = (&mut self.inner)
            .take(limit)
            .read_until(b'\n', &mut self.buf)?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        } else if n as u64 == limit {
            self.skip_rest_of_line()?;
            return Ok(Some((self.line, Line::TooLong)));
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        let mut bytes = self.buf.as_slice();
        if self.line == 1 {
            bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
        }
        let line = if bytes.len() > MAX_LINE {
            Line::TooLong
        } else {
            match std::str::from_utf8(bytes) {
                Ok(text) => Line::Text(text),
                Err(e) => Line::BadUtf8 {
                    valid_up_to: e.valid_up_to(),
                },
            }
        };
        Ok(Some((self.line, line)))
    }

    /// Discards input up to and including the next `\n`, a buffer at a time.
    fn skip_rest_of_line(&mut self) -> io::Result<()> {
        loop {
            let (found, used) = {
                let available = match self.inner.fill_buf() {
                    Ok(b) => b,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if available.is_empty() {
                    return Ok(());
                }
                match available.iter().position(|&b| b == b'\n') {
                    Some(i) => (true, i + 1),
                    None => (false, available.len()),
                }
            };
            self.inner.consume(used);
            if found {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of `input`, as owned values, read through a small buffer.
    fn read_all(input: &[u8]) -> Vec<(u64, Result<String, &'static str>)> {
        let mut r = LineReader::new(io::BufReader::with_capacity(64, input));
        let mut out = Vec::new();
        while let Some((no, line)) = r.next_line().unwrap() {
            out.push((
                no,
                match line {
                    Line::Text(t) => Ok(t.to_owned()),
                    Line::TooLong => Err("long"),
                    Line::BadUtf8 { .. } => Err("utf8"),
                },
            ));
        }
        out
    }

    #[test]
    fn splits_lf_and_crlf_and_keeps_a_last_line_without_ending() {
        let got = read_all(b"a\r\nb\n\n  \nc");
        let want: Vec<(u64, Result<String, &str>)> = vec![
            (1, Ok("a".into())),
            (2, Ok("b".into())),
            (3, Ok("".into())),
            (4, Ok("  ".into())),
            (5, Ok("c".into())),
        ];
        assert_eq!(got, want);
        assert!(read_all(b"").is_empty());
    }

    #[test]
    fn refuses_a_line_over_one_mib_and_reads_on_after_it() {
        let mut input = vec![b'x'; MAX_LINE];
        input.extend_from_slice(b"\r\n");
        input.extend(vec![b'y'; MAX_LINE + 1]);
        input.push(b'\n');
        input.extend(vec![b'z'; 3 * MAX_LINE]);
        input.extend_from_slice(b"\nok\n");
        input.extend(vec![b'w'; MAX_LINE + 1]);
        let got = read_all(&input);
        assert_eq!(got.len(), 5);
        assert_eq!(got[0].1.as_ref().map(String::len), Ok(MAX_LINE));
        assert_eq!(got[1], (2, Err("long")));
        assert_eq!(got[2], (3, Err("long")));
        assert_eq!(got[3], (4, Ok("ok".into())));
        assert_eq!(got[4], (5, Err("long")));
    }

    #[test]
    fn for_each_line_skips_blanks_and_stops_or_skips_at_bad_lines() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        io::Write::write_all(&mut f, b"a\r\n\n  \nbad\n\xFF\nb").unwrap();
        let path = f.path().to_str().unwrap();
        let refuse_bad = |no: u64, text: &str| match text {
            "bad" => Err(InputError::new("f", Some(no), "x", "bad")),
            _ => Ok(()),
        };
        let mut seen = Vec::new();
        let skipped = for_each_line(path, true, |no, text| {
            seen.push((no, text.to_owned()));
            refuse_bad(no, text)
        })
        .unwrap();
        assert_eq!(skipped, 2);
        let want = [(1, "a"), (4, "bad"), (6, "b")].map(|(n, t)| (n, t.to_owned()));
        assert_eq!(seen, want);
        match for_each_line(path, false, refuse_bad) {
            Err(Error::BadInput(e)) => assert_eq!((e.line, e.field.as_str()), (Some(4), "x")),
            other => panic!("expected bad input, got {other:?}"),
        }
        match for_each_line(path, false, |no, text| match text {
            "bad" => Ok(()),
            _ => refuse_bad(no, text),
        }) {
            Err(Error::BadInput(e)) => {
                assert_eq!(e.line, Some(5));
                assert!(e.msg.starts_with("not valid UTF-8"));
            }
            other => panic!("expected bad input, got {other:?}"),
        }
        match for_each_line("/no/such/file", false, refuse_bad) {
            Err(Error::BadInput(e)) => {
                assert_eq!((e.file.as_str(), e.line), ("/no/such/file", None))
            }
            other => panic!("expected bad input, got {other:?}"),
        }
    }

    #[test]
    fn flags_invalid_utf8_and_drops_a_bom() {
        let got = read_all(b"\xEF\xBB\xBFid\nab\xFFc\n\xEF\xBB\xBFx\n");
        assert_eq!(got[0], (1, Ok("id".into())));
        assert_eq!(got[1], (2, Err("utf8")));
        // Only the file's first line may carry a byte order mark.
        assert_eq!(got[2], (3, Ok("\u{feff}x".into())));
    }
}
