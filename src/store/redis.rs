//! The shared store (`redis://[user:pass@]host:port/db`): the ledger as bitmaps on a Redis
//! server, so several processes and machines share one "at most once".
//!
//! ```text
//! fanout:granted:{ledger}:{id >> 24}    bitmap, bit id & 0xFFFFFF: claimed (SETBIT's old bit
//!                                       is the atomic test-and-set)
//! fanout:dead:{ledger}:{id >> 24}       bitmap: dead-lettered
//! fanout:inflight:{ledger}:{run}:{id >> 24}  bitmap: ids this run claimed, not yet done
//! fanout:run:{run}                      string, EX 5 s, refreshed every second: the run lives
//! fanout:admitted:{content hash}        string (campaign id), SET NX EX 1800: the guard
//! ```
//! A claim is one script call per batch and chunk: SETBIT each id and record the newly claimed
//! ones in the run's in-flight bitmap, atomically. Marking done removes the ids from that
//! bitmap (and sets dead letters' bits): *done* is "claimed and in no in-flight bitmap", so the
//! ledger of a finished campaign is one bit a user. A run that dies leaves its in-flight bitmaps behind and its `run` key expires:
//! the next run to open the ledger adopts them (atomically, so two runs cannot both adopt
//! one) and hands those ids out once more — the messages that were in flight at the crash. A
//! claim answers ids in the caller's own in-flight bitmap as claimed, which also makes a retried
//! claim (its first reply lost in a restart) give the same answer.
//!
//! Every call retries with backoff while the server is unreachable (a restart), and gives up
//! with a runtime error after [`RETRY_BUDGET`]. The password (from the URL or
//! `FANOUT_REDIS_PASSWORD`) is never printed: URLs are shown without it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use roaring::RoaringBitmap;

use super::{Claim, LedgerCounts};
use scripts::{Segments, ADOPT, CLAIM_SCRIPT, COMPACT, DROP_EMPTY, MARK_SCRIPT, REVIVE};

mod conn;
mod scripts;

use crate::error::{Error, Result};
use conn::scan;
pub use conn::{client, connect, shown, CA_ENV, RETRY_BUDGET};
pub(crate) use conn::{retrying, retrying_as};

/// How long a run's liveness key lasts without a refresh.
pub const LEASE: Duration = Duration::from_secs(5);
/// Ids per bitmap key: 2^24 bits, 2 MiB at most.
const CHUNK_BITS: u32 = 24;
const CHUNK_MASK: u32 = (1 << CHUNK_BITS) - 1;

/// The run-id suffix of process `i` of a cluster of `n`.
fn member_tag((i, n): (usize, usize)) -> String {
    format!("-p{i}of{n}")
}

/// `ids` cut into runs of one chunk each: (chunk, offsets).
fn by_chunk(ids: &[u32]) -> Vec<(u32, Vec<u32>)> {
    let mut out: Vec<(u32, Vec<u32>)> = Vec::new();
    for &id in ids {
        let chunk = id >> CHUNK_BITS;
        match out.last_mut() {
            Some((c, offsets)) if *c == chunk => offsets.push(id & CHUNK_MASK),
            _ => out.push((chunk, vec![id & CHUNK_MASK])),
        }
    }
    out
}

/// A Redis store, shared by every worker and task of a process.
pub struct RedisStore {
    url: String,
    con: ConnectionManager,
    run: String,
    read_only: bool,
    ledgers: Mutex<HashMap<String, Arc<RedisLedger>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("run", &self.run)
            .finish()
    }
}

/// One ledger on Redis.
#[derive(Debug)]
pub struct RedisLedger {
    url: String,
    con: ConnectionManager,
    granted: String,
    dead: String,
    /// `fanout:inflight:{ledger}:`: every run's in-flight bitmaps of this ledger start so.
    inflight_all: String,
    inflight: String,
    read_only: bool,
    /// The chunks this process claimed or marked in, to compact at the end of the run.
    chunks: Mutex<BTreeSet<u32>>,
}

impl RedisStore {
    /// Connects to `url` (`FANOUT_REDIS_PASSWORD` supplies a password the URL lacks).
    pub async fn open(url: &str, read_only: bool) -> Result<RedisStore> {
        Self::open_as(url, read_only, None).await
    }

    /// [`RedisStore::open`] for process `I` of a cluster of `N` (`member = Some((I, N))`).
    /// Its run id carries `-pIofN`, and it adopts only the in-flight sets of dead runs with the
    /// same tag: those hold users of the buckets it owns. A single process (`None`) owns every
    /// bucket and adopts every dead run's set.
    pub async fn open_as(
        url: &str,
        read_only: bool,
        member: Option<(usize, usize)>,
    ) -> Result<RedisStore> {
        let show = shown(url);
        let con = connect("store", url).await?;
        let run = format!(
            "{:016x}{}",
            rand::random::<u64>(),
            member.map(member_tag).unwrap_or_default()
        );
        let store = RedisStore {
            url: show,
            con,
            run,
            read_only,
            ledgers: Mutex::new(HashMap::new()),
        };
        if !read_only {
            store.heartbeat().await?;
            let (con, key) = (store.con.clone(), store.run_key());
            tokio::spawn(async move {
                let mut con = con;
                loop {
                    tokio::time::sleep(LEASE / 5).await;
                    let refreshed: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(&key)
                        .arg(1)
                        .arg("PX")
                        .arg(LEASE.as_millis() as u64)
                        .query_async(&mut con)
                        .await;
                    if let Err(e) = refreshed {
                        tracing::warn!(error = %e, "cannot refresh the run's lease in redis");
                    }
                }
            });
        }
        Ok(store)
    }

    /// Whether this run adopts the in-flight set of dead run `run` (see
    /// [`RedisStore::open_as`]).
    fn adopts(&self, run: &str) -> bool {
        match self.run.find("-p") {
            None => true,
            Some(at) => run.ends_with(&self.run[at..]),
        }
    }

    fn run_key(&self) -> String {
        format!("fanout:run:{}", self.run)
    }

    async fn heartbeat(&self) -> Result<()> {
        let key = self.run_key();
        retrying(&self.url, "SET run lease", || {
            let mut con = self.con.clone();
            let key = key.clone();
            async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("PX")
                    .arg(LEASE.as_millis() as u64)
                    .query_async::<()>(&mut con)
                    .await
            }
        })
        .await
    }

    /// The URL, without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The ledger of `key`, adopting in-flight ids of dead runs on first open.
    pub async fn ledger(&self, key: &str) -> Result<Arc<RedisLedger>> {
        if let Some(l) = self
            .ledgers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return Ok(l.clone());
        }
        let ledger = RedisLedger {
            url: self.url.clone(),
            con: self.con.clone(),
            granted: format!("fanout:granted:{key}:"),
            inflight_all: format!("fanout:inflight:{key}:"),
            dead: format!("fanout:dead:{key}:"),
            inflight: format!("fanout:inflight:{key}:{}:", self.run),
            read_only: self.read_only,
            chunks: Mutex::new(BTreeSet::new()),
        };
        if !self.read_only {
            let adopted = self.adopt_orphans(key, &ledger).await?;
            if adopted > 0 {
                tracing::info!(
                    ledger = key,
                    ids = adopted,
                    "re-sending what a dead run had in flight"
                );
            }
        }
        let ledger = Arc::new(ledger);
        self.ledgers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_owned(), ledger.clone());
        Ok(ledger)
    }

    /// Adopts the in-flight sets of runs whose lease expired; returns how many ids.
    async fn adopt_orphans(&self, key: &str, ledger: &RedisLedger) -> Result<u64> {
        let keys = scan(&self.con, &self.url, &format!("fanout:inflight:{key}:*")).await?;
        let script = Script::new(ADOPT);
        let mut adopted = 0;
        for orphan in keys
            .into_iter()
            .filter(|k| !k.starts_with(&ledger.inflight))
        {
            // fanout:inflight:{ledger}:{run}:{chunk}
            let mut tail = orphan.rsplitn(3, ':');
            let (Some(chunk), Some(run)) = (tail.next(), tail.next()) else {
                continue;
            };
            if !self.adopts(run) {
                continue; // another cluster process's buckets
            }
            let lease = format!("fanout:run:{run}");
            let mine = format!("{}{chunk}", ledger.inflight);
            let ids: u64 = retrying(&self.url, "adopt in-flight ids", || {
                let mut con = self.con.clone();
                let mut call = script.prepare_invoke();
                call.key(&orphan).key(&mine).key(&lease);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
            adopted += ids;
        }
        Ok(adopted)
    }

    /// The repeated-campaign guard (see [`super::Store::admit`]).
    pub async fn admit(
        &self,
        campaigns: &[(String, String)],
        ttl_s: u64,
    ) -> Result<std::result::Result<(), (String, String)>> {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (hash, id) in campaigns {
            let key = format!("fanout:admitted:{hash}");
            let holder: Option<String> = retrying(&self.url, "GET admitted", || {
                let mut con = self.con.clone();
                let key = key.clone();
                async move { redis::cmd("GET").arg(key).query_async(&mut con).await }
            })
            .await?;
            let earlier = holder.as_deref().filter(|h| h != id).or_else(|| {
                seen.iter()
                    .find(|(h, i)| h == hash && i != id)
                    .map(|(_, i)| *i)
            });
            if let Some(earlier) = earlier {
                return Ok(Err((id.clone(), earlier.to_owned())));
            }
            seen.push((hash, id));
        }
        for (hash, id) in campaigns {
            let key = format!("fanout:admitted:{hash}");
            retrying(&self.url, "SET admitted", || {
                let mut con = self.con.clone();
                let (key, id) = (key.clone(), id.clone());
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(id)
                        .arg("EX")
                        .arg(ttl_s)
                        .query_async::<()>(&mut con)
                        .await
                }
            })
            .await?;
        }
        Ok(Ok(()))
    }

    /// Every claimed id of ledger `key`, sorted.
    pub async fn granted(&self, key: &str) -> Result<Vec<u32>> {
        let ledger = self.ledger(key).await?;
        Ok(ledger.bits(&ledger.granted).await?.iter().collect())
    }

    /// Ends the run: deletes its emptied in-flight bitmaps (empty after a clean drain; one
    /// still holding ids is left for the next run to adopt) and drops its lease.
    pub async fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let ledgers: Vec<Arc<RedisLedger>> = self
            .ledgers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for ledger in ledgers {
            ledger.compact().await?;
        }
        let pattern = format!("fanout:inflight:*:{}:*", self.run);
        let keys = scan(&self.con, &self.url, &pattern).await?;
        let script = Script::new(DROP_EMPTY);
        for key in &keys {
            retrying(&self.url, "drop empty in-flight set", || {
                let mut con = self.con.clone();
                let mut call = script.prepare_invoke();
                call.key(key);
                async move { call.invoke_async::<i64>(&mut con).await }
            })
            .await?;
        }
        let key = self.run_key();
        retrying(&self.url, "DEL run lease", || {
            let mut con = self.con.clone();
            let key = key.clone();
            async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut con).await }
        })
        .await
    }
}

impl RedisLedger {
    fn refuse_read_only(&self) -> Result<()> {
        match self.read_only {
            true => Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            ))),
            false => Ok(()),
        }
    }

    /// Notes the chunks of `ids` as touched by this process.
    fn touch(&self, ids: &[u32]) {
        let mut chunks = self.chunks.lock().unwrap_or_else(PoisonError::into_inner);
        chunks.extend(ids.iter().map(|id| id >> CHUNK_BITS));
    }

    /// Rewrites the bitmaps of the chunks this process touched at their exact size: Redis
    /// grows a string it extends by up to 1 MiB ahead, so a 10M-user bitmap built batch by
    /// batch holds ~1.8 MiB for its 1.25 MB of bits.
    async fn compact(&self) -> Result<()> {
        let chunks: Vec<u32> = self
            .chunks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        let script = Script::new(COMPACT);
        for chunk in chunks {
            let keys = [&self.granted, &self.dead].map(|set| format!("{set}{chunk}"));
            retrying(&self.url, "compact the ledger", || {
                let mut con = self.con.clone();
                let mut call = script.prepare_invoke();
                call.key(&keys[0]).key(&keys[1]);
                async move { call.invoke_async::<i64>(&mut con).await }
            })
            .await?;
        }
        Ok(())
    }

    /// The atomic claim; see [`super::Ledger::claim`].
    pub async fn claim(&self, ids: &[u32]) -> Result<Claim> {
        self.refuse_read_only()?;
        self.touch(ids);
        let groups: Vec<(u32, Vec<u32>, Segments)> = by_chunk(ids)
            .into_iter()
            .map(|(chunk, offsets)| {
                let segments = Segments::new(&offsets);
                (chunk, offsets, segments)
            })
            .collect();
        // One script call per chunk (a batch of ids is almost always one chunk); invoking a
        // script loads it on the server when missing.
        let replies: Vec<Vec<u8>> = retrying(&self.url, "claim", || {
            let mut con = self.con.clone();
            let groups = &groups;
            async move {
                let mut replies = Vec::with_capacity(groups.len());
                for (chunk, _, segments) in groups {
                    let mut call = CLAIM_SCRIPT.prepare_invoke();
                    call.key(format!("{}{chunk}", self.granted))
                        .key(format!("{}{chunk}", self.inflight));
                    segments.args(&mut call);
                    replies.push(call.invoke_async(&mut con).await?);
                }
                Ok(replies)
            }
        })
        .await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for ((_, offsets, segments), reply) in groups.iter().zip(&replies) {
            let bits = segments.claimed(offsets, reply).ok_or_else(|| {
                Error::runtime(format!(
                    "store {}: the claim script answered {} bytes for {} segments",
                    self.url,
                    reply.len(),
                    segments.len()
                ))
            })?;
            claimed.extend(bits);
        }
        let mut out = Claim::default();
        for (&id, yes) in ids.iter().zip(claimed) {
            if yes {
                out.claimed.push(id);
            } else {
                out.already.push(id);
            }
        }
        Ok(out)
    }

    async fn mark(&self, ids: &[u32], dead: bool) -> Result<()> {
        self.refuse_read_only()?;
        if ids.is_empty() {
            return Ok(());
        }
        self.touch(ids);
        let groups: Vec<(u32, Segments)> = by_chunk(ids)
            .into_iter()
            .map(|(chunk, offsets)| (chunk, Segments::new(&offsets)))
            .collect();
        retrying(&self.url, "mark done", || {
            let mut con = self.con.clone();
            let groups = &groups;
            async move {
                for (chunk, segments) in groups {
                    let dead_key = if dead {
                        format!("{}{chunk}", self.dead)
                    } else {
                        String::new()
                    };
                    let mut call = MARK_SCRIPT.prepare_invoke();
                    call.key(dead_key).key(format!("{}{chunk}", self.inflight));
                    segments.args(&mut call);
                    call.invoke_async::<i64>(&mut con).await?;
                }
                Ok(())
            }
        })
        .await?;
        Ok(())
    }

    /// Records `ids` as delivered.
    pub async fn mark_done(&self, ids: &[u32]) -> Result<()> {
        self.mark(ids, false).await
    }

    /// Records `ids` as dead-lettered (and done).
    pub async fn mark_dead(&self, ids: &[u32]) -> Result<()> {
        self.mark(ids, true).await
    }

    /// Makes every dead-lettered id claimable again (`--retry-dead-letters`); returns how many.
    pub async fn revive_dead(&self) -> Result<u64> {
        self.refuse_read_only()?;
        let script = Script::new(REVIVE);
        let mut revived = 0;
        for chunk in 0u32..(1 << (32 - CHUNK_BITS)) {
            let keys = [
                format!("{}{chunk}", self.dead),
                format!("{}{chunk}", self.granted),
            ];
            let n: u64 = retrying(&self.url, "revive dead letters", || {
                let mut con = self.con.clone();
                let mut call = script.prepare_invoke();
                call.key(&keys[0]).key(&keys[1]);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
            revived += n;
        }
        Ok(revived)
    }

    /// How many of `ids` are done: claimed (pipelined GETBITs) and in no run's in-flight
    /// bitmap.
    pub async fn count_done(&self, ids: &[u32]) -> Result<u64> {
        let in_flight = self.in_flight().await?;
        let mut done = 0;
        for chunk in ids.chunks(10_000) {
            let bits: Vec<u8> = retrying(&self.url, "GETBIT granted", || {
                let mut con = self.con.clone();
                let mut pipe = redis::pipe();
                for &id in chunk {
                    pipe.cmd("GETBIT")
                        .arg(format!("{}{}", self.granted, id >> CHUNK_BITS))
                        .arg(id & 0xFF_FFFF);
                }
                async move { pipe.query_async(&mut con).await }
            })
            .await?;
            done += chunk
                .iter()
                .zip(&bits)
                .filter(|(id, &b)| b == 1 && !in_flight.contains(**id))
                .count() as u64;
        }
        Ok(done)
    }

    /// Every id in some run's in-flight bitmap of this ledger (claimed, not done).
    async fn in_flight(&self) -> Result<RoaringBitmap> {
        let mut out = RoaringBitmap::new();
        for key in scan(&self.con, &self.url, &format!("{}*", self.inflight_all)).await? {
            let Some(chunk) = key.rsplit(':').next().and_then(|c| c.parse::<u32>().ok()) else {
                continue;
            };
            out |= self.bits_of(&key, chunk).await?;
        }
        Ok(out)
    }

    /// The set of ids whose bit is set in the bitmaps under `prefix`.
    async fn bits(&self, prefix: &str) -> Result<RoaringBitmap> {
        let mut out = RoaringBitmap::new();
        for chunk in 0u32..(1 << (32 - CHUNK_BITS)) {
            out |= self.bits_of(&format!("{prefix}{chunk}"), chunk).await?;
        }
        Ok(out)
    }

    /// The ids whose bit is set in bitmap `key` of chunk `chunk`.
    async fn bits_of(&self, key: &str, chunk: u32) -> Result<RoaringBitmap> {
        let mut out = RoaringBitmap::new();
        let bytes: Option<Vec<u8>> = retrying(&self.url, "GET ledger", || {
            let mut con = self.con.clone();
            async move { redis::cmd("GET").arg(key).query_async(&mut con).await }
        })
        .await?;
        let Some(bytes) = bytes else { return Ok(out) };
        let base = chunk << CHUNK_BITS;
        for (i, byte) in bytes.iter().enumerate().filter(|(_, b)| **b != 0) {
            for bit in 0..8 {
                // Redis numbers bits from the most significant bit of each byte.
                if byte & (0x80 >> bit) != 0 {
                    out.insert(base + (i as u32) * 8 + bit);
                }
            }
        }
        Ok(out)
    }

    /// How many ids each set holds.
    pub async fn counts(&self) -> Result<LedgerCounts> {
        let claimed = self.bits(&self.granted).await?;
        let in_flight = self.in_flight().await?;
        Ok(LedgerCounts {
            claimed: claimed.len(),
            done: (claimed - in_flight).len(),
            dead: self.bits(&self.dead).await?.len(),
        })
    }
}
