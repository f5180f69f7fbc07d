//! Submitted campaigns that keep crashing `serve` are set aside instead of crashing every
//! start.
//!
//! Each start that takes up an entry of `fanout:campaigns` counts an attempt in the hash
//! [`ATTEMPTS`] (entry id → attempts that did not end in order). An orderly stop (a signal, or
//! an error exit) gives its attempts back, and acknowledging an entry forgets it, so the count
//! only grows when a process dies while working on the entry: an abort, `kill -9`, the OOM
//! killer. The start that finds [`MAX_ATTEMPTS`] such deaths moves the entry to the stream
//! [`DEAD`] (its `job`, the `entry` id, the `error`, the `attempts`) and acknowledges it.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::error::Result;
use crate::store::redis::{connect, retrying_as, shown};

/// Entry id → attempts at it that did not end in order.
pub const ATTEMPTS: &str = "fanout:campaigns:attempts";
/// Campaign entries set aside after [`MAX_ATTEMPTS`] crashes.
pub const DEAD: &str = "fanout:campaigns:dead";
/// Crashes while working on an entry after which it is set aside.
pub const MAX_ATTEMPTS: i64 = 3;
/// About how many entries [`DEAD`] keeps (the oldest are trimmed).
const DEAD_MAXLEN: usize = 10_000;

/// The attempt counts and the dead-letter stream, on the campaign stream's server.
pub struct Attempts {
    con: ConnectionManager,
    url: String,
}

impl Attempts {
    /// Connects to `url`.
    pub async fn open(url: &str) -> Result<Attempts> {
        Ok(Attempts {
            con: connect("redis", url).await?,
            url: shown(url),
        })
    }

    /// Counts an attempt at `entry`; returns how many earlier ones died with it.
    pub async fn begin(&self, entry: &str) -> Result<i64> {
        let now: i64 = retrying_as("redis", &self.url, "HINCRBY", || {
            let (mut con, entry) = (self.con.clone(), entry.to_owned());
            async move { con.hincr(ATTEMPTS, entry, 1).await }
        })
        .await?;
        Ok(now - 1)
    }

    /// Forgets `entries` (acknowledged: done with).
    pub async fn forget(&self, entries: &[String]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        retrying_as("redis", &self.url, "HDEL", || {
            let mut con = self.con.clone();
            async move { con.hdel::<_, _, ()>(ATTEMPTS, entries).await }
        })
        .await
    }

    /// Gives back this process's attempts at `entries`: it stops in order, so they did not
    /// fail.
    pub async fn give_back(&self, entries: &[String]) -> Result<()> {
        for entry in entries {
            let left: i64 = retrying_as("redis", &self.url, "HINCRBY", || {
                let (mut con, entry) = (self.con.clone(), entry.clone());
                async move { con.hincr(ATTEMPTS, entry, -1).await }
            })
            .await?;
            if left <= 0 {
                self.forget(std::slice::from_ref(entry)).await?;
            }
        }
        Ok(())
    }

    /// Adds `entry` (its TOML `job`) to [`DEAD`] with why it was set aside.
    pub async fn bury(&self, entry: &str, job: &str, error: &str, attempts: i64) -> Result<()> {
        let fields = [
            ("job", job.to_owned()),
            ("entry", entry.to_owned()),
            ("error", error.to_owned()),
            ("attempts", attempts.to_string()),
        ];
        retrying_as("redis", &self.url, "XADD", || {
            let (mut con, fields) = (self.con.clone(), fields.clone());
            async move {
                let trim = redis::streams::StreamMaxlen::Approx(DEAD_MAXLEN);
                con.xadd_maxlen::<_, _, _, _, String>(DEAD, trim, "*", &fields)
                    .await
            }
        })
        .await?;
        Ok(())
    }
}
