//! `log:PATH` and `log:-`: each delivered message becomes one JSON line (SPEC "deliveries").
//!
//! A list of messages is written with one `write` on an append-mode file, before the engine
//! marks any of them done, so a killed process never has a message marked done that is not in
//! the file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::{Gate, Messages, Outcome, Push};
use crate::error::{Error, Result};
use futures::future::BoxFuture;

/// Where the records go.
#[derive(Debug)]
enum Sink {
    /// A file; `durable` when it is a regular file, the only kind fsync means anything for
    /// (a device such as `/dev/null` answers EINVAL).
    File {
        file: File,
        durable: bool,
    },
    Stdout,
}

/// The `log:` provider.
#[derive(Debug)]
pub struct LogProvider {
    path: String,
    sink: Mutex<Sink>,
}

impl LogProvider {
    /// Opens `path` for appending (`-` is stdout).
    pub fn open(path: &str) -> Result<Self> {
        let sink = if path == "-" {
            Sink::Stdout
        } else {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open delivery log {path}"))?;
            let durable = file
                .metadata()
                .with_context(|| format!("cannot stat delivery log {path}"))?
                .is_file();
            Sink::File { file, durable }
        };
        Ok(LogProvider {
            path: path.to_owned(),
            sink: Mutex::new(sink),
        })
    }

    /// The path as the job names it (`-` for stdout).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Writes the selected messages as one append; see [`Push::send_all`].
    async fn write_all(
        &self,
        batch: Messages<'_>,
        which: &[usize],
        gate: Gate<'_>,
    ) -> (Vec<(usize, Outcome)>, Duration) {
        if !gate.pass(which.len()).await {
            return (super::held(which), Duration::ZERO);
        }
        let started = Instant::now();
        let mut buf = Vec::with_capacity(which.iter().map(|&i| batch.record_len(i) + 1).sum());
        for &i in which {
            buf.extend_from_slice(batch.get(i).json);
            buf.push(b'\n');
        }
        let written = match self.sink.lock() {
            Ok(mut sink) => match &mut *sink {
                Sink::File { file, .. } => file.write_all(&buf),
                Sink::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&buf).and_then(|_| out.flush())
                }
            },
            Err(_) => Err(std::io::Error::other("delivery log lock poisoned")),
        };
        let failed = match written {
            Ok(()) => Vec::new(),
            Err(e) => {
                let error = format!("write {}: {e}", self.path);
                // Nobody reads the output any more (`log:-` piped into `head`): no later
                // message can be delivered either.
                let outcome = match e.kind() {
                    std::io::ErrorKind::BrokenPipe => Outcome::Fatal(error),
                    _ => Outcome::Retry { error, after: None },
                };
                (0..which.len()).map(|k| (k, outcome.clone())).collect()
            }
        };
        (failed, started.elapsed())
    }

    /// Fsyncs the file (a regular file; nothing to make durable on a device or stdout).
    fn sync(&self) -> Result<()> {
        let sink = self
            .sink
            .lock()
            .map_err(|_| Error::runtime("delivery log lock poisoned"))?;
        if let Sink::File {
            file,
            durable: true,
        } = &*sink
        {
            file.sync_data()
                .with_context(|| format!("cannot sync delivery log {}", self.path))?;
        }
        Ok(())
    }
}

impl Push for LogProvider {
    fn name(&self) -> String {
        format!("log provider {}", self.path())
    }

    fn sends_each(&self) -> bool {
        false
    }

    fn send_all<'a>(
        &'a self,
        batch: Messages<'a>,
        which: &'a [usize],
        _attempt: u32,
        gate: Gate<'a>,
    ) -> BoxFuture<'a, (Vec<(usize, Outcome)>, Duration)> {
        Box::pin(self.write_all(batch, which, gate))
    }

    fn flush(&self) -> Result<()> {
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{Message, MessageBuf};

    #[tokio::test]
    async fn a_device_needs_no_sync() {
        let p = LogProvider::open("/dev/null").unwrap();
        let json = r#"{"campaign":"c","user":1,"title":"","body":"","key":"c:1"}"#;
        let m = Message {
            user: 1,
            json: json.as_bytes(),
            token: None,
        };
        let one: MessageBuf = std::iter::once(m).collect();
        let (failed, _) = p
            .send_all(
                one.messages(),
                &[0],
                1,
                Gate::new(None, crate::model::Priority::Normal),
            )
            .await;
        assert!(failed.is_empty());
        p.flush()
            .expect("fsync of /dev/null is no error worth stopping for");
    }
}
