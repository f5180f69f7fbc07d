//! Redis streams as inputs (SPEC "Redis layout"): login events on `fanout:logins` and campaigns
//! submitted to `serve` on `fanout:campaigns`, both read through the consumer group `fanout`.
//!
//! An entry is acknowledged (`XACK`) only once what it asked for is durable, so a process
//! killed at any moment leaves its unfinished entries pending in the group. On start a reader
//! takes those back: its own (same consumer name) by reading its pending list from id 0, and
//! those of a consumer that has been silent for [`RECLAIM_IDLE`] with `XAUTOCLAIM`. Taking an
//! entry twice is harmless: the store's claim decides who is sent what.
//!
//! A reader fenced by the store ([`StreamReader::fenced_by`]) reads nothing new while this
//! process may have lost its store lease: entries it took then would sit pending under its
//! consumer name, unfinished, after a successor of the same name had already taken back that
//! name's pending entries at its start — lost to the group until the next start.
//!
//! Should the group vanish (Redis restarted without persistence, a flush, the stream deleted),
//! a reader says so once, as an error, and re-creates it at the stream's first entry, so what
//! is added after the loss is read.
//!
//! Each reader has its own connection: `XREADGROUP … BLOCK` holds the connection it runs on.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply,
};
use redis::AsyncCommands;

use crate::error::{Error, InputError, Result};
use crate::sources::logins::{login_from, Login};
use crate::store::redis::{connect, retrying_as, shown};
use crate::store::Fence;

/// The consumer group every fanout process reads through.
pub const GROUP: &str = "fanout";
/// Login events: fields `user`, `ts`.
pub const LOGINS: &str = "fanout:logins";
/// Campaigns submitted to `serve`: field `job`, the TOML of one `[[campaign]]`.
pub const CAMPAIGNS: &str = "fanout:campaigns";
/// A consumer silent this long is presumed dead; its pending entries are taken over.
pub const RECLAIM_IDLE: Duration = Duration::from_secs(60);
/// How long a fenced reader's [`StreamReader::read`] waits before answering nothing.
const FENCED_WAIT: Duration = Duration::from_millis(50);
/// Entries asked for per read.
const PAGE: usize = 1000;

/// One entry of a stream: its id and fields (values as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry id, `ms-seq`.
    pub id: String,
    /// Field → value, in the order Redis gave them.
    pub fields: Vec<(String, String)>,
}

impl Entry {
    /// The value of `field`, if present.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == field)
            .map(|(_, v)| v.as_str())
    }

    fn from_redis(e: StreamId) -> Entry {
        let mut fields: Vec<(String, String)> = e
            .map
            .iter()
            .map(|(k, v)| {
                let text = redis::from_redis_value_ref::<String>(v).unwrap_or_default();
                (k.clone(), text)
            })
            .collect();
        fields.sort();
        Entry { id: e.id, fields }
    }
}

/// A reader of one stream as one consumer of the group `fanout`.
pub struct StreamReader {
    con: ConnectionManager,
    url: String,
    key: String,
    consumer: String,
    /// Called each time the group is found gone and re-created ([`StreamReader::read`]).
    on_group_lost: Option<Box<dyn Fn() + Send + Sync>>,
    /// While it fails, [`StreamReader::read`] reads nothing.
    fence: Fence,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("url", &self.url)
            .field("key", &self.key)
            .field("consumer", &self.consumer)
            .finish()
    }
}

impl StreamReader {
    /// Connects to the Redis at `url` and joins the group on stream `key` as `consumer`,
    /// creating the stream and the group if missing (the group starts at the stream's first
    /// entry, so events added before the first reader started are read too).
    pub async fn open(url: &str, key: &str, consumer: &str) -> Result<StreamReader> {
        let con = connect("redis", url).await?;
        let reader = StreamReader {
            con,
            url: shown(url),
            key: key.to_owned(),
            consumer: consumer.to_owned(),
            on_group_lost: None,
            fence: Fence::default(),
        };
        reader.create_group().await?;
        Ok(reader)
    }

    /// Calls `f` each time [`StreamReader::read`] finds the group gone and re-creates it.
    pub fn on_group_lost(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_group_lost = Some(Box::new(f));
        self
    }

    /// Reads nothing new while `fence` fails (see the module's notes): a stalled process woken
    /// past its lease, or one taken over, leaves the stream's new entries to its successor.
    pub fn fenced_by(mut self, fence: Fence) -> Self {
        self.fence = fence;
        self
    }

    /// Creates the stream (if missing) and the group at its first entry; true if this call
    /// created the group, false if it existed.
    async fn create_group(&self) -> Result<bool> {
        let created: redis::RedisResult<()> = self
            .con
            .clone()
            .xgroup_create_mkstream(&self.key, GROUP, "0")
            .await;
        match created {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(Error::runtime(format!(
                "redis {}: cannot create the consumer group {GROUP} on {}: {e}",
                self.url, self.key
            ))),
        }
    }

    /// The group is gone while we read: Redis lost its data (restarted without persistence,
    /// flushed) or the stream was deleted. Re-creates it at the stream's first entry, so every
    /// entry added since the loss is read; says so once, as an error: the entries pending
    /// before the loss, and any added before it and not yet read, are lost to the group.
    async fn recreate_group(&self) -> Result<()> {
        let created = self.create_group().await?;
        tracing::error!(
            url = %self.url,
            stream = %self.key,
            group = GROUP,
            recreated_here = created,
            "the consumer group was gone: Redis lost its data (restarted without persistence, \
             flushed) or the stream was deleted; re-created it at the stream's first entry. \
             Entries pending or unread before the loss are lost"
        );
        if let Some(f) = &self.on_group_lost {
            f();
        }
        Ok(())
    }

    /// The entries this consumer was given but never acknowledged (it crashed or was
    /// stopped), then those of consumers silent for [`RECLAIM_IDLE`], taken over.
    pub async fn reclaim(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut after = "0".to_owned();
        loop {
            let page = self.pending_after(&after).await?;
            match page.last() {
                Some(last) => after = last.id.clone(),
                None => break,
            }
            out.extend(page);
        }
        let mut start = "0-0".to_owned();
        loop {
            let (con, key, consumer, from) = (
                self.con.clone(),
                self.key.clone(),
                self.consumer.clone(),
                start.clone(),
            );
            let reply: StreamAutoClaimReply = retrying_as("redis", &self.url, "XAUTOCLAIM", || {
                let (mut con, key, consumer, from) =
                    (con.clone(), key.clone(), consumer.clone(), from.clone());
                async move {
                    con.xautoclaim_options(
                        key,
                        GROUP,
                        consumer,
                        RECLAIM_IDLE.as_millis() as u64,
                        from,
                        StreamAutoClaimOptions::default().count(PAGE),
                    )
                    .await
                }
            })
            .await?;
            out.extend(reply.claimed.into_iter().map(Entry::from_redis));
            if reply.next_stream_id == "0-0" {
                break;
            }
            start = reply.next_stream_id;
        }
        // A pending entry deleted from the stream (XDEL, trimming) comes back without fields:
        // there is nothing left to do for it.
        let (gone, out): (Vec<Entry>, Vec<Entry>) =
            out.into_iter().partition(|e| e.fields.is_empty());
        let gone: Vec<String> = gone.into_iter().map(|e| e.id).collect();
        self.ack(&gone).await?;
        Ok(out)
    }

    /// New entries, at most `count`, waiting up to `block` for the first one.
    pub async fn read(&self, count: usize, block: Duration) -> Result<Vec<Entry>> {
        if self.fence.check().is_err() {
            // Waits as a read that found nothing would: the caller loops.
            tokio::time::sleep(block.max(FENCED_WAIT)).await;
            return Ok(Vec::new());
        }
        let mut con = self.con.clone();
        let mut opts = StreamReadOptions::default()
            .group(GROUP, &self.consumer)
            .count(count.max(1));
        // BLOCK 0 would wait forever: zero means do not wait.
        if !block.is_zero() {
            opts = opts.block(block.as_millis() as usize);
        }
        // Not retried here: the caller loops, and a failed read gave out nothing.
        let reply: Option<StreamReadReply> =
            match con.xread_options(&[&self.key], &[">"], &opts).await {
                Ok(reply) => reply,
                Err(e) if e.code() == Some("NOGROUP") => {
                    self.recreate_group().await?;
                    return Ok(Vec::new());
                }
                // The stream was deleted while we waited on it: the next read finds out why.
                Err(e) if e.code() == Some("UNBLOCKED") => return Ok(Vec::new()),
                Err(e) => {
                    return Err(Error::runtime(format!(
                        "redis {}: XREADGROUP {}: {e}",
                        self.url, self.key
                    )))
                }
            };
        Ok(flatten(reply))
    }

    /// This consumer's pending entries after id `after` (a page).
    async fn pending_after(&self, after: &str) -> Result<Vec<Entry>> {
        let reply: Option<StreamReadReply> = retrying_as("redis", &self.url, "XREADGROUP", || {
            let (mut con, key, after) = (self.con.clone(), self.key.clone(), after.to_owned());
            let consumer = self.consumer.clone();
            async move {
                let opts = StreamReadOptions::default()
                    .group(GROUP, consumer)
                    .count(PAGE);
                con.xread_options(&[key], &[after], &opts).await
            }
        })
        .await?;
        Ok(flatten(reply))
    }

    /// Acknowledges `ids`: their work is durable and they are never handed out again. With
    /// the group gone (Redis lost its data) nothing is pending, so there is nothing to do.
    pub async fn ack(&self, ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(PAGE) {
            retrying_as("redis", &self.url, "XACK", || {
                let (mut con, key) = (self.con.clone(), self.key.clone());
                async move {
                    match con.xack::<_, _, _, u64>(key, GROUP, chunk).await {
                        Err(e) if e.code() == Some("NOGROUP") => Ok(0),
                        acked => acked,
                    }
                }
            })
            .await?;
        }
        Ok(())
    }
}

/// Every login on the stream at `url` for `fanout run`: first the entries left pending by an
/// earlier run of `consumer`, then all new ones. A bad entry stops the read (bad input, exit
/// 2, naming the entry and field) unless `skip_bad`: then it is counted and acknowledged with
/// the rest. Returns the reader (to acknowledge with), the logins, every entry id, the count
/// of skipped entries.
pub async fn read_all_logins(
    url: &str,
    consumer: &str,
    skip_bad: bool,
) -> Result<(StreamReader, Vec<Login>, Vec<String>, u64)> {
    let reader = StreamReader::open(url, LOGINS, consumer).await?;
    let mut entries = reader.reclaim().await?;
    loop {
        let page = reader.read(PAGE, Duration::ZERO).await?;
        if page.is_empty() {
            break;
        }
        entries.extend(page);
    }
    let (mut logins, mut ids, mut skipped) = (Vec::new(), Vec::new(), 0);
    for entry in entries {
        match login_of(&entry) {
            Ok(login) => logins.push(login),
            Err(why) if skip_bad => {
                tracing::warn!(error = %why, "login entry skipped");
                skipped += 1;
            }
            Err(why) => return Err(Error::BadInput(why)),
        }
        ids.push(entry.id);
    }
    Ok((reader, logins, ids, skipped))
}

fn flatten(reply: Option<StreamReadReply>) -> Vec<Entry> {
    reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .map(Entry::from_redis)
        .collect()
}

/// A login entry as a [`Login`]; the error names the entry and field.
pub fn login_of(entry: &Entry) -> std::result::Result<Login, InputError> {
    use serde_json::Value;
    // Stream fields are text: a user id that reads as a number is one.
    let user = entry.get("user").map(|u| match u.trim().parse::<u64>() {
        Ok(n) => Value::from(n),
        Err(_) => Value::String(u.to_owned()),
    });
    let ts = entry.get("ts").map(|t| Value::String(t.to_owned()));
    login_from(user, ts).map_err(|(field, msg)| {
        InputError::new(format!("{LOGINS} entry {}", entry.id), None, field, msg)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> Entry {
        Entry {
            id: "1-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn login_entries_parse_and_name_bad_fields() {
        let l = login_of(&entry(&[
            ("user", "42"),
            ("ts", "2026-03-02T10:00:00+08:00"),
        ]))
        .unwrap();
        assert_eq!(l.user, 42);
        let ts = chrono::DateTime::parse_from_rfc3339("2026-03-02T02:00:00Z").unwrap();
        assert_eq!(l.ts_ms, ts.timestamp_millis());
        let bad = |fields: &[(&str, &str)]| login_of(&entry(fields)).unwrap_err().to_string();
        let e = bad(&[("user", "x"), ("ts", "2026-03-02T10:00:00Z")]);
        assert!(e.starts_with("fanout:logins entry 1-0: user: "), "{e}");
        let e = bad(&[("user", "7"), ("ts", "yesterday")]);
        assert!(e.starts_with("fanout:logins entry 1-0: ts: "), "{e}");
        let e = bad(&[("user", "0"), ("ts", "2026-03-02T10:00:00Z")]);
        assert!(e.contains(": user: "), "{e}");
        let e = bad(&[("ts", "2026-03-02T10:00:00Z")]);
        assert!(e.contains(": user: "), "{e}");
    }
}
