//! `log:PATH` and `log:-`: each delivered message becomes one JSON line (SPEC "deliveries").
//!
//! A batch is written with one `write` on an append-mode file, before the engine marks it done,
//! so a killed process never has a message marked done that is not in the file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use tokio::sync::Semaphore;

use super::{acquire, rate::RateLimiter, Latency, Message, Outcome, Sent};
use crate::error::{Error, Result};

/// Where the records go.
#[derive(Debug)]
enum Sink {
    File(File),
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
            Sink::File(file)
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

    /// Writes the selected messages as one append.
    pub async fn send(
        &self,
        batch: &[Message<'_>],
        which: &[usize],
        slots: &Semaphore,
        rate: Option<&RateLimiter>,
    ) -> Sent {
        if let Some(rate) = rate {
            rate.acquire(which.len()).await;
        }
        let _permits = acquire(slots, which.len()).await;
        let started = Instant::now();
        let mut buf = Vec::with_capacity(which.iter().map(|&i| batch[i].json.len() + 1).sum());
        for &i in which {
            buf.extend_from_slice(batch[i].json.as_bytes());
            buf.push(b'\n');
        }
        let written = match self.sink.lock() {
            Ok(mut sink) => match &mut *sink {
                Sink::File(f) => f.write_all(&buf),
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
                let outcome = Outcome::Retry {
                    error: format!("write {}: {e}", self.path),
                    after: None,
                };
                (0..which.len()).map(|k| (k, outcome.clone())).collect()
            }
        };
        Sent {
            failed,
            latency: Latency::All(started.elapsed()),
        }
    }

    /// Fsyncs the file.
    pub fn flush(&self) -> Result<()> {
        let sink = self
            .sink
            .lock()
            .map_err(|_| Error::runtime("delivery log lock poisoned"))?;
        if let Sink::File(f) = &*sink {
            f.sync_data()
                .with_context(|| format!("cannot sync delivery log {}", self.path))?;
        }
        Ok(())
    }
}
