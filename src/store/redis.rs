//! The shared store (`redis://[user:pass@]host:port/db`): the ledger as bitmaps on a Redis
//! server, so several processes and machines share one "at most once".
//!
//! ```text
//! fanout:granted:{ledger}:{chunk}       bitmap (chunk = id >> 24, bit id & 0xFFFFFF): claimed
//! fanout:dead:{ledger}:{chunk}          bitmap: dead-lettered
//! fanout:unreachable:{ledger}:{chunk}   bitmap: settled without a push (no token)
//! fanout:held_out:{ledger}:{chunk}      bitmap: held out (claimed and settled in one call)
//! fanout:quiet:{ledger}:{chunk}         bitmap: ever held for quiet hours (not claimed by it)
//! fanout:capped:{ledger}:{chunk}        bitmap: a frequency cap bound (claimed and settled
//!                                       in one call)
//! fanout:cancelled:{ledger}:{chunk}     bitmap: not claimed when the campaign was cancelled
//!                                       (claimed and settled in one call)
//! fanout:history:{id / 65528}           string: 8 bytes of send history a user ([`history`])
//! fanout:sendtimes                      hash: the send-time table the histories point into
//! fanout:inflight:{ledger}:{run}:{chunk}  bitmap: ids run holds, not yet done
//! fanout:resend:{ledger}:{run}:{chunk}  bitmap: ids run adopted and has not handed out again
//! fanout:lease:next                     counter: the last lease token handed out
//! fanout:run:{run}                      string: run's token, PX lease: the run lives
//! fanout:reply:{run}:{nonce}            string, PX 60 s: a claim call's reply, for its retry
//! fanout:admitted:{content hash}        string (campaign id), EX 1800: the guard (one script
//!                                       checks and sets every pair of a job)
//! ```
//! - **Lease.** Opening for writing takes a token (`INCR fanout:lease:next`, so tokens only
//!   grow); the run id is the token plus `-pIofN` in a cluster (information only; run ids hold
//!   no `:`). `fanout:run:{run}` holds the token for [`LEASE`] (`FANOUT_LEASE`); a heartbeat
//!   every lease/5 extends it only while it still holds the token, never re-creating it.
//! - **Claim.** One script call per batch and chunk: SETBIT-like test-and-set of each id in
//!   the granted bitmap; a newly set id joins the run's in-flight bitmap and is "claimed"; a
//!   set one is "claimed" only if it is in the run's resend bitmap (then cleared there: once),
//!   else "already". Each call carries a nonce: its reply is kept 60 s, and a retry of a call
//!   whose reply was lost gets the same answer.
//! - **Marking** done clears the ids from the run's in-flight bitmap (dead letters and
//!   unreachable users also set their bit in that outcome's bitmap): *done* is "claimed and in
//!   no in-flight bitmap". A held-out claim sets the held-out bit instead of the in-flight
//!   one, in the claim's own call, so no crash leaves a held-out user to be sent.
//! - **Frequency caps** ([`history`]): a capped claim is the claim's script with each new
//!   user's send history checked and written in the same call, under the same lease, nonce
//!   and stored reply; a user a cap binds is claimed and settled in the capped bitmap.
//! - **Adoption.** Before a ledger is first handed out, every other run's in-flight bitmap of
//!   it is looked at: if the run's lease is gone it is dead; if the lease exists (and the set
//!   holds ids), it is polled until its PTTL goes up or the set changes (alive: left alone)
//!   or the key expires (dead) — about one lease at most. From a dead run's set this process moves exactly the ids
//!   it owns ([`Member`]'s route; all of them for a single process) into its own in-flight and
//!   resend bitmaps, atomically and only if still set, so adopters never take an id twice.
//!   A failed run ([`RedisStore::abandon`]) drops its lease, so it is dead at once; a clean
//!   one ([`RedisStore::close`]) also deletes its emptied in-flight and its resend bitmaps.
//! - **Fencing.** Claim, mark and adopt fail atomically unless the run's lease holds its token;
//!   that, or a heartbeat finding the lease gone, fences the store: every later call fails at
//!   once ("lease lost"). [`Lease::check`] (the [`super::Fence`]) also fails once lease − lease/5
//!   has passed since the send time of the last successful refresh (a stalled process).
//!
//! Every call retries with backoff while the server is unreachable (a restart), and gives up
//! with a runtime error after the retry budget ([`RETRY_BUDGET`], `FANOUT_REDIS_RETRY`). The
//! password (from the URL or `FANOUT_REDIS_PASSWORD`) is never printed: URLs are shown without
//! it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Script;
use roaring::RoaringBitmap;
use tokio::sync::OnceCell;

use super::{Claim, LedgerCounts, Member};
use scripts::{
    Segments, ADMIT, ADOPT_SCRIPT, CLAIM_SCRIPT, COMPACT, DROP_EMPTY, HOLD_QUIET_SCRIPT,
    MARK_SCRIPT, REVIVE, UNCLAIM_SCRIPT,
};

mod campaigns;
mod conn;
pub(super) mod history;
mod lease;
mod ledger;
mod scripts;

use crate::error::{Error, Result};
use conn::scan;
pub use conn::{
    client, connect, env_duration, retry_budget, shown, CA_ENV, RETRY_BUDGET, RETRY_ENV,
};
pub(crate) use conn::{retrying, retrying_as};
pub use history::claim_capped;
use lease::spawn_heartbeat;
pub use lease::Lease;
pub use ledger::RedisLedger;

/// How long a run's lease lasts without a refresh, unless [`LEASE_ENV`] says otherwise.
pub const LEASE: Duration = Duration::from_secs(5);
/// The environment variable that sets the lease (humantime: `800ms`, `5s`).
pub const LEASE_ENV: &str = "FANOUT_LEASE";
/// How long a claim's reply is kept for a retry of the same call.
const REPLY_TTL_MS: u64 = 60_000;
/// Ids per bitmap key: 2^24 bits, 2 MiB at most.
const CHUNK_BITS: u32 = 24;
const CHUNK_MASK: u32 = (1 << CHUNK_BITS) - 1;

/// The lease: [`LEASE_ENV`], else [`LEASE`]; a bad value is a usage error naming it.
pub fn lease_from_env() -> Result<Duration> {
    let value = std::env::var(LEASE_ENV).ok();
    env_duration(LEASE_ENV, value.as_deref(), LEASE)
}

/// The run-id suffix of process `i` of a cluster of `n`.
fn member_tag(m: &Member) -> String {
    format!("-p{}of{}", m.process, m.processes)
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

/// What the keys of ledger `key`'s claimed bitmap start with: `fanout:granted:{key}:`.
fn granted_prefix(key: &str) -> String {
    format!("fanout:granted:{key}:")
}

/// `text` with SCAN's glob characters escaped, so a ledger key matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `(run, chunk)` of a per-run key `{prefix}{run}:{chunk}`; `None` for any other key under
/// `prefix` — notably another ledger's (`{ledger}:{occurrence}`: occurrences hold `:`, run
/// ids do not, so the remainder is then not exactly `run:chunk`).
fn run_chunk<'a>(key: &'a str, prefix: &str) -> Option<(&'a str, u32)> {
    let (run, chunk) = key.strip_prefix(prefix)?.split_once(':')?;
    let digits = !chunk.is_empty() && chunk.bytes().all(|b| b.is_ascii_digit());
    match (run.is_empty(), digits) {
        (false, true) => Some((run, chunk.parse().ok()?)),
        _ => None,
    }
}

/// The ids whose bit is set in a chunk's bitmap bytes (Redis numbers bits from the most
/// significant bit of each byte).
fn ids_of(bytes: &[u8], chunk: u32) -> impl Iterator<Item = u32> + '_ {
    let base = chunk << CHUNK_BITS;
    bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b != 0)
        .flat_map(move |(i, byte)| {
            (0..8u32)
                .filter(move |bit| byte & (0x80 >> bit) != 0)
                .map(move |bit| base + (i as u32) * 8 + bit)
        })
}

/// A Redis store, shared by every worker and task of a process.
pub struct RedisStore {
    url: String,
    con: ConnectionManager,
    run: String,
    read_only: bool,
    member: Option<Member>,
    /// `None` when read-only.
    lease: Option<Arc<Lease>>,
    /// Other runs found alive (when) or dead, so many ledgers opened at once poll each run
    /// once: a dead run stays dead; an alive verdict holds for one lease.
    verdicts: Mutex<HashMap<String, Option<Instant>>>,
    /// One cell per ledger key: a ledger is built (and adopts) once, and no claim on it is
    /// answered before its adoption is done.
    ledgers: Mutex<HashMap<String, Arc<OnceCell<Arc<RedisLedger>>>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("run", &self.run)
            .finish()
    }
}

impl RedisStore {
    /// Connects to `url` (`FANOUT_REDIS_PASSWORD` supplies a password the URL lacks).
    pub async fn open(url: &str, read_only: bool) -> Result<RedisStore> {
        Self::open_as(url, read_only, None).await
    }

    /// [`RedisStore::open`] for a cluster process (`member`), with the lease from
    /// [`LEASE_ENV`]. It adopts, from any dead run's in-flight set, exactly the ids its route
    /// owns; `None` (a single process) owns every id.
    pub async fn open_as(url: &str, read_only: bool, member: Option<Member>) -> Result<RedisStore> {
        let lease = lease_from_env()?;
        Self::open_with(url, read_only, member, lease).await
    }

    /// [`RedisStore::open_as`] with the lease given (tests use a short one).
    pub async fn open_with(
        url: &str,
        read_only: bool,
        member: Option<Member>,
        lease: Duration,
    ) -> Result<RedisStore> {
        let show = shown(url);
        let con = connect("store", url).await?;
        let mut store = RedisStore {
            url: show,
            con,
            run: String::new(),
            read_only,
            member,
            lease: None,
            verdicts: Mutex::new(HashMap::new()),
            ledgers: Mutex::new(HashMap::new()),
        };
        if read_only {
            return Ok(store);
        }
        let token: u64 = retrying(&store.url, "INCR lease token", || {
            let mut con = store.con.clone();
            async move {
                redis::cmd("INCR")
                    .arg("fanout:lease:next")
                    .query_async(&mut con)
                    .await
            }
        })
        .await?;
        store.run = format!(
            "{token}{}",
            member.as_ref().map(member_tag).unwrap_or_default()
        );
        let base = Instant::now();
        let lease = Arc::new(Lease {
            url: store.url.clone(),
            run: store.run.clone(),
            key: format!("fanout:run:{}", store.run),
            token: token.to_string(),
            duration: lease,
            base,
            refreshed_ns: AtomicU64::new(0),
            fenced: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            nonce: AtomicU64::new(0),
        });
        // A fresh key (the token is new), so a plain SET; its send time is `base` or later.
        retrying(&store.url, "SET run lease", || {
            let mut con = store.con.clone();
            let lease = &lease;
            async move {
                redis::cmd("SET")
                    .arg(&lease.key)
                    .arg(&lease.token)
                    .arg("PX")
                    .arg(lease.duration.as_millis() as u64)
                    .query_async::<()>(&mut con)
                    .await
            }
        })
        .await?;
        // The heartbeat has a connection of its own: on the shared one a refresh waits behind
        // every claim and mark queued before it, and under load that ate the lease's margin
        // (a 1 s test lease went 800 ms without a refresh, the run stopped).
        spawn_heartbeat(
            connect("lease heartbeat", url).await?,
            Arc::downgrade(&lease),
            lease.duration / 5,
        );
        store.lease = Some(lease);
        Ok(store)
    }

    /// The run id (empty when read-only).
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The local guard on the lease (see [`super::Fence`]); always Ok when read-only.
    pub fn fence(&self) -> super::Fence {
        super::Fence(self.lease.clone())
    }

    /// The URL, without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The ledger of `key`, adopting in-flight ids of dead runs on first open.
    pub async fn ledger(&self, key: &str) -> Result<Arc<RedisLedger>> {
        let cell = self
            .ledgers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.to_owned())
            .or_default()
            .clone();
        let ledger = cell
            .get_or_try_init(|| async {
                let ledger = RedisLedger {
                    url: self.url.clone(),
                    con: self.con.clone(),
                    granted: granted_prefix(key),
                    inflight_all: format!("fanout:inflight:{key}:"),
                    dead: format!("fanout:dead:{key}:"),
                    unreachable: format!("fanout:unreachable:{key}:"),
                    held_out: format!("fanout:held_out:{key}:"),
                    quiet: format!("fanout:quiet:{key}:"),
                    capped: format!("fanout:capped:{key}:"),
                    cancelled: format!("fanout:cancelled:{key}:"),
                    inflight: format!("fanout:inflight:{key}:{}:", self.run),
                    resend: format!("fanout:resend:{key}:{}:", self.run),
                    read_only: self.read_only,
                    lease: self.lease.clone(),
                    chunks: Mutex::new(BTreeSet::new()),
                    histories: Mutex::new(BTreeSet::new()),
                };
                if let Some(lease) = &self.lease {
                    let adopted = self.adopt_orphans(key, &ledger, lease).await?;
                    if adopted > 0 {
                        tracing::info!(
                            ledger = key,
                            ids = adopted,
                            "re-sending what a dead run had in flight"
                        );
                    }
                }
                Ok::<_, Error>(Arc::new(ledger))
            })
            .await?;
        Ok(ledger.clone())
    }

    /// Adopts, from the in-flight sets of dead runs, the ids this process owns; returns how
    /// many. A run whose lease still exists is watched until it proves alive or dies.
    async fn adopt_orphans(&self, key: &str, ledger: &RedisLedger, lease: &Lease) -> Result<u64> {
        let prefix = &ledger.inflight_all;
        let keys = scan(&self.con, &self.url, &format!("{}*", glob_escape(prefix))).await?;
        let orphans: Vec<(String, String, u32)> = keys
            .iter()
            .filter_map(|k| run_chunk(k, prefix).map(|(run, c)| (k.clone(), run.to_owned(), c)))
            .filter(|(_, run, _)| *run != self.run)
            .collect();
        if orphans.is_empty() {
            return Ok(0);
        }
        // Per orphan set: how many ids, and whether its run's lease exists.
        let looks: Vec<(u64, bool)> = retrying(&self.url, "look at in-flight sets", || {
            let mut con = self.con.clone();
            let mut pipe = redis::pipe();
            for (set, run, _) in &orphans {
                pipe.cmd("BITCOUNT")
                    .arg(set)
                    .cmd("EXISTS")
                    .arg(format!("fanout:run:{run}"));
            }
            async move { pipe.query_async(&mut con).await }
        })
        .await?;
        // One of each live-leased run's sets with ids in it: its run is watched.
        let mut watch: Vec<(String, String)> = orphans
            .iter()
            .zip(&looks)
            .filter(|(_, (ids, lives))| *ids > 0 && *lives)
            .map(|((set, run, _), _)| (run.clone(), set.clone()))
            .collect();
        watch.sort();
        watch.dedup_by(|a, b| a.0 == b.0);
        self.watch_leases(watch, lease.duration).await?;
        let verdicts = self
            .verdicts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut adopted = 0;
        for ((set, run, chunk), (_, lives)) in orphans.iter().zip(&looks) {
            let dead = !*lives || matches!(verdicts.get(run), Some(None));
            if dead {
                adopted += self.adopt(key, ledger, lease, set, run, *chunk).await?;
            }
        }
        Ok(adopted)
    }

    /// Decides whether each of `runs` (run, one of its in-flight sets; its lease existed) is
    /// alive, into `verdicts`: its lease (value, PTTL) and its set's bit count are sampled until
    /// the PTTL goes up or the value changes (a heartbeat), or the set changes (a claim or mark,
    /// which only a run holding its lease can make): alive; or until the lease is gone: dead.
    /// A live run shows itself within one heartbeat (lease/5), usually at once by its set; a
    /// dead one's lease expires within one lease.
    async fn watch_leases(&self, runs: Vec<(String, String)>, ours: Duration) -> Result<()> {
        let mut pending: Vec<(String, String)> = {
            let verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
            runs.into_iter()
                .filter(|(run, _)| match verdicts.get(run) {
                    Some(None) => false,
                    Some(Some(seen)) => seen.elapsed() >= ours,
                    None => true,
                })
                .collect()
        };
        // Short steps: a live run's set usually changes within milliseconds, and a sample is
        // one small MULTI.
        let step = (ours / 10).clamp(Duration::from_millis(10), Duration::from_millis(50));
        let started = Instant::now();
        let mut deadline = None;
        type Sample = (Option<String>, i64, i64);
        let mut last: HashMap<String, Sample> = HashMap::new();
        while !pending.is_empty() {
            let samples: Vec<Sample> = retrying(&self.url, "watch run leases", || {
                let mut con = self.con.clone();
                // MULTI: a lease's value and PTTL and its set's count from one instant.
                let mut pipe = redis::pipe();
                pipe.atomic();
                for (run, set) in &pending {
                    let key = format!("fanout:run:{run}");
                    pipe.cmd("GET")
                        .arg(&key)
                        .cmd("PTTL")
                        .arg(&key)
                        .cmd("BITCOUNT")
                        .arg(set);
                }
                async move {
                    let flat: Vec<redis::Value> = pipe.query_async(&mut con).await?;
                    let mut out = Vec::with_capacity(flat.len() / 3);
                    // A run left without a sample stays undecided and is watched again.
                    for triple in flat.chunks(3) {
                        if let [value, pttl, count] = triple {
                            out.push((
                                redis::from_redis_value_ref(value)?,
                                redis::from_redis_value_ref(pttl)?,
                                redis::from_redis_value_ref(count)?,
                            ));
                        }
                    }
                    Ok(out)
                }
            })
            .await?;
            // Past the longest remaining lease (plus slack), an undecided run is left alone.
            let longest = samples.iter().map(|(_, p, _)| *p).max().unwrap_or(0).max(0);
            let deadline = *deadline.get_or_insert_with(|| {
                started + Duration::from_millis(longest as u64) + ours / 2 + 4 * step
            });
            let mut still = Vec::new();
            let mut samples = samples.into_iter();
            for (run, set) in pending.drain(..) {
                let Some((value, pttl, count)) = samples.next() else {
                    still.push((run, set));
                    continue;
                };
                let verdict = match (&value, last.get(&run)) {
                    // Expired: dead.
                    (None, _) => Some(None),
                    _ if pttl == -2 => Some(None),
                    // No expiry: not a lease this protocol set; leave it alone.
                    _ if pttl < 0 => Some(Some(Instant::now())),
                    // Refreshed (or re-taken), or its set changed, since the last sample: alive.
                    (Some(v), Some((Some(pv), pp, pc)))
                        if v != pv || pttl > *pp || count != *pc =>
                    {
                        Some(Some(Instant::now()))
                    }
                    _ => None,
                };
                match verdict {
                    Some(v) => {
                        self.verdicts
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(run, v);
                    }
                    None => {
                        last.insert(run.clone(), (value, pttl, count));
                        still.push((run, set));
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    runs = ?pending,
                    "run leases neither refreshed nor expired; leaving their in-flight sets"
                );
                let mut verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
                for (run, _) in pending.drain(..) {
                    verdicts.insert(run, Some(Instant::now()));
                }
                break;
            }
            tokio::time::sleep(step).await;
        }
        Ok(())
    }

    /// Moves the ids this process owns from dead run `run`'s in-flight set `set` (chunk
    /// `chunk`) of ledger `key` into ours and our resend set; returns how many moved.
    async fn adopt(
        &self,
        key: &str,
        ledger: &RedisLedger,
        lease: &Lease,
        set: &str,
        run: &str,
        chunk: u32,
    ) -> Result<u64> {
        let bytes: Option<Vec<u8>> = retrying(&self.url, "GET in-flight set", || {
            let mut con = self.con.clone();
            async move { redis::cmd("GET").arg(set).query_async(&mut con).await }
        })
        .await?;
        let owned: Vec<u32> = ids_of(bytes.as_deref().unwrap_or_default(), chunk)
            .filter(|&id| self.member.is_none_or(|m| m.route.keeps(id)))
            .map(|id| id & CHUNK_MASK)
            .collect();
        let segments = Segments::new(&owned);
        let keys = [
            set.to_owned(),
            format!("fanout:resend:{key}:{run}:{chunk}"),
            format!("{}{chunk}", ledger.inflight),
            format!("{}{chunk}", ledger.resend),
            format!("fanout:run:{run}"),
            lease.key.clone(),
        ];
        lease
            .guarded("adopt in-flight ids", || {
                let mut con = self.con.clone();
                let mut call = ADOPT_SCRIPT.prepare_invoke();
                for k in &keys {
                    call.key(k);
                }
                call.arg(&lease.token);
                segments.args(&mut call);
                async move { call.invoke_async::<u64>(&mut con).await }
            })
            .await
    }

    /// The repeated-campaign guard (see [`super::Store::admit`]): one atomic script over every
    /// pair, so two racing submissions of one content cannot both be admitted.
    pub async fn admit(
        &self,
        campaigns: &[(String, String)],
        ttl_s: u64,
    ) -> Result<std::result::Result<(), (String, String)>> {
        if campaigns.is_empty() {
            return Ok(Ok(()));
        }
        let script = Script::new(ADMIT);
        let verdict: Vec<String> = retrying(&self.url, "admit", || {
            let mut con = self.con.clone();
            let mut call = script.prepare_invoke();
            call.arg(ttl_s);
            for (hash, id) in campaigns {
                call.key(format!("fanout:admitted:{hash}")).arg(id);
            }
            async move { call.invoke_async(&mut con).await }
        })
        .await?;
        match <[String; 2]>::try_from(verdict) {
            Ok([id, earlier]) => Ok(Err((id, earlier))),
            Err(v) if v.is_empty() => Ok(Ok(())),
            Err(v) => Err(Error::runtime(format!(
                "store {}: the admit script answered {} values",
                self.url,
                v.len()
            ))),
        }
    }

    /// See [`super::Store::quiet_unsettled`]: one EXISTS when nobody was ever held.
    pub async fn quiet_unsettled(&self, key: &str, with_dead: bool) -> Result<RoaringBitmap> {
        if !self.any_key(&format!("fanout:quiet:{key}:")).await? {
            return Ok(RoaringBitmap::new());
        }
        let ledger = self.ledger(key).await?;
        // Done is "claimed and in no run's in-flight bitmap".
        let mut settled = ledger.bits(&ledger.granted).await? - ledger.in_flight().await?;
        if with_dead {
            settled -= ledger.bits(&ledger.dead).await?;
        }
        Ok(ledger.bits(&ledger.quiet).await? - settled)
    }

    /// Whether any id was ever claimed in ledger `key`: one EXISTS over its chunks' keys.
    pub async fn has_claims(&self, key: &str) -> Result<bool> {
        self.any_key(&granted_prefix(key)).await
    }

    /// Whether a bitmap of any chunk under `prefix` exists.
    async fn any_key(&self, prefix: &str) -> Result<bool> {
        let keys: Vec<String> = (0u32..(1 << (32 - CHUNK_BITS)))
            .map(|chunk| format!("{prefix}{chunk}"))
            .collect();
        let found: u64 = retrying(&self.url, "EXISTS ledger", || {
            let mut con = self.con.clone();
            let keys = &keys;
            async move { redis::cmd("EXISTS").arg(keys).query_async(&mut con).await }
        })
        .await?;
        Ok(found > 0)
    }

    /// The users of ledger `key` by recorded outcome.
    pub async fn outcomes(&self, key: &str) -> Result<super::Outcomes> {
        let ledger = self.ledger(key).await?;
        let claimed = ledger.bits(&ledger.granted).await?;
        let in_flight = ledger.in_flight().await?;
        let dead = ledger.bits(&ledger.dead).await?;
        let unreachable = ledger.bits(&ledger.unreachable).await?;
        let held_out = ledger.bits(&ledger.held_out).await?;
        let capped = ledger.bits(&ledger.capped).await?;
        let cancelled = ledger.bits(&ledger.cancelled).await?;
        let quiet_held = ledger.bits(&ledger.quiet).await? - &claimed;
        let settled = &claimed - &in_flight;
        Ok(super::Outcomes {
            delivered: &(&(&(&(&settled - &dead) - &unreachable) - &held_out) - &capped)
                - &cancelled,
            dead_lettered: dead,
            unreachable,
            held_out,
            in_flight,
            quiet_held,
            capped,
            cancelled,
        })
    }

    /// Every id of ledger `key` claimed and sent (not held out, capped or cancelled), sorted.
    pub async fn granted(&self, key: &str) -> Result<Vec<u32>> {
        let ledger = self.ledger(key).await?;
        let claimed = ledger.bits(&ledger.granted).await?;
        let held_out = ledger.bits(&ledger.held_out).await?;
        let capped = ledger.bits(&ledger.capped).await?;
        let cancelled = ledger.bits(&ledger.cancelled).await?;
        Ok((claimed - held_out - capped - cancelled).iter().collect())
    }

    /// The ledgers opened so far.
    fn opened(&self) -> Vec<Arc<RedisLedger>> {
        self.ledgers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter_map(|cell| cell.get().cloned())
            .collect()
    }

    /// Ends the run: compacts, deletes its emptied in-flight bitmaps (one still holding ids is
    /// left for the next run to adopt) and its resend bitmaps, and drops its lease.
    pub async fn close(&self) -> Result<()> {
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        let drop_empty = Script::new(DROP_EMPTY);
        let mut histories = BTreeSet::new();
        for ledger in self.opened() {
            ledger.compact().await?;
            histories.extend(
                ledger
                    .histories
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .copied(),
            );
            for (prefix, drop) in [(&ledger.inflight, false), (&ledger.resend, true)] {
                let keys = scan(&self.con, &self.url, &format!("{}*", glob_escape(prefix))).await?;
                // Exactly ours: `{prefix}{chunk}`.
                for key in keys.iter().filter(|k| {
                    k.strip_prefix(prefix.as_str())
                        .is_some_and(|c| c.parse::<u32>().is_ok())
                }) {
                    retrying(&self.url, "drop empty in-flight set", || {
                        let mut con = self.con.clone();
                        let mut call = drop_empty.prepare_invoke();
                        call.key(key);
                        let del = redis::cmd("DEL").arg(key).clone();
                        async move {
                            match drop {
                                true => del.query_async::<i64>(&mut con).await,
                                false => call.invoke_async::<i64>(&mut con).await,
                            }
                        }
                    })
                    .await?;
                }
            }
        }
        self.compact_histories(&histories).await?;
        if lease.release(&self.con).await? {
            return Ok(());
        }
        // Our lease outlives the run unless the server dropped it: the data this run wrote
        // may be gone with it, and a later run may send those users again. Say so loudly.
        Err(Error::runtime(format!(
            "store {}: this run's lease was gone when it ended: the Redis server lost data \
             (a restart without persistence, a FLUSHALL, an eviction) or the run stalled past \
             its lease; what it recorded may be lost, so a later run may send some users again \
             (check the server's persistence: appendonly yes)",
            self.url
        )))
    }

    /// Ends a failed run: drops the lease if it still holds our token and leaves the in-flight
    /// sets, so the next run adopts them at once instead of waiting for the lease to expire.
    pub async fn abandon(&self) -> Result<()> {
        match &self.lease {
            Some(lease) => lease.release(&self.con).await.map(|_| ()),
            None => Ok(()),
        }
    }
}

/// The integration tests' real redis-server helper, for the unit tests below.
#[cfg(test)]
#[path = "../../tests/redis_server/mod.rs"]
pub(super) mod redis_server;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exactly_run_and_chunk_after_the_prefix_is_a_runs_set() {
        let p = "fanout:inflight:x:";
        assert_eq!(
            run_chunk("fanout:inflight:x:17-p0of2:3", p),
            Some(("17-p0of2", 3))
        );
        // The occurrence ledger `x:2026-03-02T10:00:00+00:00`'s set of run 17, chunk 0.
        let other = "fanout:inflight:x:2026-03-02T10:00:00+00:00:17:0";
        assert_eq!(run_chunk(other, p), None);
        assert_eq!(run_chunk("fanout:inflight:x:17:", p), None);
        assert_eq!(run_chunk("fanout:inflight:x::0", p), None);
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_retried_with_its_nonce_gets_its_first_answer() {
        let redis = redis_server::RedisServer::start();
        let store = RedisStore::open_with(&redis.url(0), false, None, LEASE)
            .await
            .unwrap();
        let ledger = store.ledger("k").await.unwrap();
        let ids = [1, 2, 3, 1 << 24];
        // The first call ran but its reply was lost; the retry repeats its nonces.
        let first = ledger.claim_with(&ids, &[7, 8], None).await.unwrap();
        assert_eq!(first.claimed, ids);
        let retried = ledger.claim_with(&ids, &[7, 8], None).await.unwrap();
        assert_eq!(retried, first);
        // Any other call finds them taken.
        let other = ledger.claim(&ids).await.unwrap();
        assert_eq!(other.already, ids);
    }
}
