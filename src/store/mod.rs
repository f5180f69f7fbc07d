//! The grant ledger: who has been sent (or granted) each campaign occurrence, with the atomic
//! claim that decides who sends.
//!
//! A *ledger* belongs to one campaign occurrence (`spring-sale-2026`,
//! `hot-1:2026-03-02T10:00:00+00:00`) and keeps three sets of user ids:
//! - *claimed*: the test-and-set. [`Ledger::claim`] hands an id out at most once per store…
//! - …except ids claimed but not *done* when the previous process died: they were in flight at
//!   the crash, so the next process gets each of them once more and re-sends it under the same
//!   idempotency key (SPEC "Delivery semantics").
//! - *done*: delivered or dead-lettered, durable. *dead* ⊆ done: dead-lettered, kept apart so a
//!   later run can re-drive them.
//!
//! [`Store`] opens ledgers by key from a store URL: the embedded store ([`file`](mod@file),
//! `file:DIR`, one process at a time) or the shared one ([`redis`](mod@redis), `redis://…`,
//! any number of processes and machines).

pub mod campaigns;
pub mod file;
pub mod redis;

use std::sync::Arc;

use roaring::RoaringBitmap;

use crate::error::{Error, Result};

/// The store a job writes its grants to. Cloning is cheap (Arc inside).
#[derive(Clone, Debug)]
pub enum Store {
    /// The embedded store in a local directory (`file:DIR`).
    File(Arc<file::FileStore>),
    /// The shared store on a Redis server.
    Redis(Arc<redis::RedisStore>),
}

/// One ledger: a campaign occurrence's grants. Clone is cheap.
#[derive(Clone, Debug)]
pub enum Ledger {
    /// A ledger of the embedded store.
    File(Arc<file::FileLedger>),
    /// A ledger on Redis.
    Redis(Arc<redis::RedisLedger>),
}

/// Result of a claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// Send these now, in input order.
    pub claimed: Vec<u32>,
    /// Already granted: done, or claimed earlier by this process (or twice in one batch).
    pub already: Vec<u32>,
}

/// How many ids a ledger holds in each set (done ⊆ claimed, dead ⊆ done).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerCounts {
    /// Ids ever claimed, including those done.
    pub claimed: u64,
    /// Ids delivered or dead-lettered.
    pub done: u64,
    /// Ids dead-lettered.
    pub dead: u64,
}

/// The users of one ledger by recorded outcome (SPEC "Outcomes"), for `fanout report`.
/// The sets are disjoint; together they are the ledger's claimed ids and those held for
/// their quiet hours.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcomes {
    /// Pushed and accepted by the provider (or granted, for lazy coupons).
    pub delivered: RoaringBitmap,
    /// Refused permanently or out of attempts.
    pub dead_lettered: RoaringBitmap,
    /// No push token.
    pub unreachable: RoaringBitmap,
    /// In the campaign's holdout or the control group: recorded, never sent.
    pub held_out: RoaringBitmap,
    /// Claimed and not yet settled (in flight, or in flight when a run died).
    pub in_flight: RoaringBitmap,
    /// Held for their quiet hours and not claimed since: a later run sends them.
    pub quiet_held: RoaringBitmap,
    /// A frequency cap bound: recorded, never sent for this occurrence.
    pub capped: RoaringBitmap,
    /// Not claimed when the campaign was cancelled: recorded, never sent.
    pub cancelled: RoaringBitmap,
}

impl Outcomes {
    /// Adds `part`'s users to each outcome (the parts of a store a cluster split).
    pub fn join(&mut self, part: Outcomes) {
        self.delivered |= part.delivered;
        self.dead_lettered |= part.dead_lettered;
        self.unreachable |= part.unreachable;
        self.held_out |= part.held_out;
        self.in_flight |= part.in_flight;
        self.quiet_held |= part.quiet_held;
        self.capped |= part.capped;
        self.cancelled |= part.cancelled;
    }
}

/// A send time's slot in the store's send-time table ([`crate::history::SendTimes`]), from
/// [`Store::send_slot`]: what a capped claim records in each user's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendAt {
    /// The slot.
    pub slot: u16,
    /// The send time, unix seconds.
    pub t: i64,
}

/// One ledger's part of a capped claim ([`claim_capped`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CappedClaim {
    /// Claimed for sending (their send recorded in each user's history), and ids in flight
    /// at a dead process's crash handed out once more (their send was recorded then).
    pub claim: Claim,
    /// A cap bound: claimed and settled as capped in the same step, never sent.
    pub capped: Vec<u32>,
}

/// Claims frequency-capped sends at `at` (SPEC "Policy → Frequency caps"): for each member
/// `(ledger, ids)` in order — the run's decision order, priority then job order — each id not
/// claimed before is claimed for sending if its history admits a send at `at.t` under `caps`
/// ([`crate::history::History::admits`]), its history recording the send in the same atomic
/// step; else it is claimed and settled as capped. Ids claimed before answer as
/// [`Ledger::claim`] does (in flight at a crash: handed out once more, history untouched).
/// Members are ledgers of one store; their ids are sorted.
pub async fn claim_capped(
    members: &[(Ledger, Vec<u32>)],
    at: SendAt,
    caps: &[crate::history::Window],
) -> Result<Vec<CappedClaim>> {
    match members.first() {
        None => Ok(Vec::new()),
        Some((Ledger::File(_), _)) => file::claim_capped(members, at, caps),
        Some((Ledger::Redis(_), _)) => redis::claim_capped(members, at, caps).await,
    }
}

/// [`claim_capped`] without waiting where the store is local (see [`Ledger::claim_local`]).
pub fn claim_capped_local(
    members: &[(Ledger, Vec<u32>)],
    at: SendAt,
    caps: &[crate::history::Window],
) -> Option<Result<Vec<CappedClaim>>> {
    match members.first() {
        Some((Ledger::Redis(_), _)) => None,
        _ => Some(file::claim_capped(members, at, caps)),
    }
}

/// Which process of a cluster opens a store, and which users it owns: on Redis it adopts,
/// from a dead run's in-flight set, exactly the ids [`Route::keeps`](crate::model::Route::keeps)
/// says are its own — whatever the dead run's process or worker count was.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// This process's index, `0 .. processes`.
    pub process: usize,
    /// Processes in the cluster.
    pub processes: usize,
    /// The users this process owns.
    pub route: crate::model::Route,
}

/// A cheap local guard on the run's hold of its store, checked right before every provider
/// attempt: on Redis it fails once the run's lease may have expired (more than lease − lease/5
/// since the send time of the last successful refresh — a stopped or stalled process) or the
/// store is fenced (its lease was found gone); a woken stalled run then sends nothing new. On the
/// embedded store (and by default) it is always Ok: the directory's lock already excludes a
/// second writer while this process lives.
#[derive(Debug, Clone, Default)]
pub struct Fence(Option<Arc<redis::Lease>>);

impl Fence {
    /// Ok while this run may still send (see [`Fence`]).
    pub fn check(&self) -> Result<()> {
        match &self.0 {
            Some(lease) => lease.check(),
            None => Ok(()),
        }
    }

    /// The "lease lost" error once the store is fenced for good: the lease's heartbeat (or a
    /// store call) found another run's token, or none, where ours was. Unlike [`Fence::check`]
    /// it does not fail for a lease that may merely have expired (a refresh may still find it
    /// ours): an idle `serve` process looks at this to stop once it has been taken over.
    pub fn lost(&self) -> Option<Error> {
        self.0
            .as_ref()
            .filter(|lease| lease.is_fenced())
            .map(|lease| lease.lost())
    }
}

/// Where a store URL points.
enum Target<'a> {
    Dir(&'a str),
    Redis,
}

/// Splits a store URL; refuses what this build cannot open.
fn parse_url(url: &str) -> Result<Target<'_>> {
    if let Some(rest) = url.strip_prefix("file:") {
        // `file:///abs/dir` is accepted as the URL spelling of `file:/abs/dir`.
        let dir = rest.strip_prefix("//").unwrap_or(rest);
        if dir.is_empty() {
            return Err(Error::Usage(format!(
                "store URL `{url}` names no directory: expected file:DIR"
            )));
        }
        return Ok(Target::Dir(dir));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(Target::Redis);
    }
    Err(Error::Usage(format!(
        "unsupported store URL `{url}`: expected file:DIR or redis://host:port/db"
    )))
}

/// Checks the form of a store URL without opening anything (for the job file, which names
/// where the URL came from); `Err` says what was expected.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    match parse_url(url) {
        Ok(Target::Dir(_)) => Ok(()),
        Ok(Target::Redis) => check_redis_url(url),
        Err(_) => Err("expected file:DIR, redis://[user:pass@]host:port/db or rediss://…".into()),
    }
}

/// Checks that `url` parses as a Redis URL (host, port, database, TLS), connecting to
/// nothing; `Err` says what was expected.
pub fn check_redis_url(url: &str) -> std::result::Result<(), String> {
    ::redis::IntoConnectionInfo::into_connection_info(url)
        .map(drop)
        .map_err(|e| {
            format!(
                "not a Redis URL ({e}): expected redis://[user:pass@]host:port/db or rediss://…"
            )
        })
}

/// The directory of an embedded store's URL (`file:DIR`); `None` for any other URL.
pub fn file_dir(url: &str) -> Option<&str> {
    match parse_url(url) {
        Ok(Target::Dir(dir)) => Some(dir),
        _ => None,
    }
}

/// Runs blocking store work (fsync, replay) off the async workers when inside a tokio runtime.
async fn off_runtime<T, F>(work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle
            .spawn_blocking(work)
            .await
            .map_err(|e| Error::runtime(format!("store task failed: {e}")))?,
        Err(_) => work(),
    }
}

/// How long an admitted campaign's content blocks the same content under another id.
pub const ADMISSION_TTL_S: u64 = 30 * 60;

/// How often a `run` makes its store durable ([`Store::sync_every`]).
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Store {
    /// Opens the store at `url` for writing, taking its exclusive lock.
    ///
    /// `url` is `file:DIR` (DIR relative to the current directory is fine; it is created if
    /// missing). `redis://…` and `rediss://…` are refused with a usage error pointing to
    /// [`Store::connect`], as is any other scheme. A store held by another process is a runtime error.
    pub fn open(url: &str) -> Result<Store> {
        match parse_url(url)? {
            Target::Dir(dir) => Ok(Store::File(Arc::new(file::FileStore::open(url, dir)?))),
            Target::Redis => Err(Error::Usage(format!(
                "store URL `{}`: a Redis store is opened with Store::connect",
                redis::shown(url)
            ))),
        }
    }

    /// Opens the store at any `url`: `file:DIR` as [`Store::open`] does, `redis://…` or
    /// `rediss://…` (TLS; `FANOUT_REDIS_CA` names a PEM file of CAs to trust) by connecting (retrying for a while if the server is not up yet).
    pub async fn connect(url: &str) -> Result<Store> {
        Store::connect_as(url, None).await
    }

    /// [`Store::connect`] for a process of a cluster (`member`): on Redis it re-sends, of what
    /// any dead run had in flight, exactly the users its route owns (so a re-run with another
    /// process or worker count still re-sends each once). `None` (a single process, owning
    /// every user) is [`Store::connect`]. The Redis lease is `FANOUT_LEASE` (default 5s); a bad
    /// value is a usage error.
    pub async fn connect_as(url: &str, member: Option<Member>) -> Result<Store> {
        match parse_url(url)? {
            Target::Dir(_) => Store::open(url),
            Target::Redis => Ok(Store::Redis(Arc::new(
                redis::RedisStore::open_as(url, false, member).await?,
            ))),
        }
    }

    /// [`Store::connect`] for reading only (`fanout grants`, `fanout plan`).
    pub async fn connect_read_only(url: &str) -> Result<Store> {
        match parse_url(url)? {
            Target::Dir(_) => Store::open_read_only(url),
            Target::Redis => Ok(Store::Redis(Arc::new(
                redis::RedisStore::open(url, true).await?,
            ))),
        }
    }

    /// Opens without taking the lock and never writes (for `fanout grants` and `fanout plan`
    /// while a run may be active). A missing directory reads as an empty store; a ledger is
    /// read when first asked for, then stays as it was (claims on it are refused).
    pub fn open_read_only(url: &str) -> Result<Store> {
        match parse_url(url)? {
            Target::Dir(dir) => Ok(Store::File(Arc::new(file::FileStore::open_read_only(
                url, dir,
            )?))),
            Target::Redis => Err(Error::Usage(format!(
                "store URL `{}`: a Redis store is opened with Store::connect_read_only",
                redis::shown(url)
            ))),
        }
    }

    /// The repeated-campaign guard: admits every `(content hash, campaign id)` of a job, unless
    /// a content was admitted under another id in the last 30 minutes (or twice in this job):
    /// then nothing is admitted and the error names both ids (exit 3). The same id resumes.
    pub async fn admit(&self, campaigns: &[(String, String)]) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let verdict = match self {
            Store::File(store) => store.admit(campaigns, now, ADMISSION_TTL_S)?,
            Store::Redis(store) => store.admit(campaigns, ADMISSION_TTL_S).await?,
        };
        verdict.map_err(|(id, earlier)| Error::Duplicate { id, earlier })
    }

    /// Shards the embedded store's ledgers opened from now on by the worker of `placement`
    /// that owns each id, so that workers do not contend ([`file::Shards`]). Redis needs none.
    pub fn shard_by(&self, placement: &crate::model::Placement) {
        if let Store::File(store) = self {
            let workers = u32::try_from(placement.workers).unwrap_or(u32::MAX);
            let processes = u32::try_from(placement.processes).unwrap_or(u32::MAX);
            store.shard_by(file::Shards::new(
                placement.buckets.size,
                processes,
                workers,
            ));
        }
    }

    /// The ledger of `key` (a campaign occurrence); opened and replayed once, then cached.
    pub async fn ledger(&self, key: &str) -> Result<Ledger> {
        match self {
            Store::File(store) => {
                if let Some(ledger) = store.cached_ledger(key) {
                    return Ok(Ledger::File(ledger));
                }
                let store = Arc::clone(store);
                let key = key.to_owned();
                off_runtime(move || store.ledger(&key).map(Ledger::File)).await
            }
            Store::Redis(store) => store.ledger(key).await.map(Ledger::Redis),
        }
    }

    /// Makes every claim and mark so far durable against a machine crash.
    pub async fn sync(&self) -> Result<()> {
        match self {
            Store::File(store) => {
                let store = Arc::clone(store);
                off_runtime(move || store.sync()).await
            }
            // The server's own persistence (appendonly, fsync policy) decides.
            Store::Redis(_) => Ok(()),
        }
    }

    /// [`Self::sync`] every [`SYNC_EVERY`], for as long as it is polled: what a `run` loses to
    /// a power loss is bounded in time, as with Redis's `appendfsync everysec` (a killed
    /// process loses nothing already written). Each sync forces the logs' pages out, which on
    /// two cores cost the engine job ~5% of its CPU when it was done once per epoch (measured:
    /// ten interleaved rounds at 10M users, 1.31× → 1.25× the loop's CPU per user).
    pub async fn sync_every(&self) -> Result<()> {
        loop {
            tokio::time::sleep(SYNC_EVERY).await;
            self.sync().await?;
        }
    }

    /// At the end of a run or `serve`: makes every claim and mark durable, folding each
    /// ledger's log into its snapshot once the log has grown enough to be worth it
    /// ([`FileStore::checkpoint_due`]).
    pub async fn checkpoint(&self) -> Result<()> {
        match self {
            Store::File(store) => {
                let store = Arc::clone(store);
                off_runtime(move || store.checkpoint_due()).await
            }
            Store::Redis(store) => store.close().await,
        }
    }

    /// Every id of `key` claimed and not held out, sorted (what `fanout grants` prints). Empty if the ledger
    /// doesn't exist.
    pub async fn granted(&self, key: &str) -> Result<Vec<u32>> {
        match self {
            Store::File(store) => {
                let store = Arc::clone(store);
                let key = key.to_owned();
                off_runtime(move || store.granted(&key)).await
            }
            Store::Redis(store) => store.granted(key).await,
        }
    }

    /// The users of ledger `key` ever held for their quiet hours whose send is not settled:
    /// still held, or claimed by a release that did not finish (a crash: the claim hands them
    /// out once more), and with `with_dead` the dead-lettered ones too (about to be revived by
    /// `--retry-dead-letters`). Empty (and nothing created) if the ledger doesn't exist.
    pub async fn quiet_unsettled(&self, key: &str, with_dead: bool) -> Result<RoaringBitmap> {
        match self {
            Store::File(store) => {
                let store = Arc::clone(store);
                let key = key.to_owned();
                off_runtime(move || store.quiet_unsettled(&key, with_dead)).await
            }
            Store::Redis(store) => store.quiet_unsettled(key, with_dead).await,
        }
    }

    /// The users of ledger `key` by recorded outcome. Empty if the ledger doesn't exist.
    pub async fn outcomes(&self, key: &str) -> Result<Outcomes> {
        match self {
            Store::File(store) => {
                let store = Arc::clone(store);
                let key = key.to_owned();
                off_runtime(move || store.outcomes(&key)).await
            }
            Store::Redis(store) => store.outcomes(key).await,
        }
    }

    /// The slot of send time `t` (unix seconds) in the store's send-time table, added if new;
    /// `horizon_s` is the longest window of the caps it is for ([`crate::history`]).
    pub async fn send_slot(&self, t: i64, horizon_s: i64) -> Result<SendAt> {
        let slot = match self {
            Store::File(store) => {
                let store = Arc::clone(store);
                off_runtime(move || store.send_slot(t, horizon_s)).await?
            }
            Store::Redis(store) => store.send_slot(t, horizon_s).await?,
        };
        Ok(SendAt { slot, t })
    }

    /// The store's send-time table and the send histories of `ids` (sorted), as the store
    /// holds them now (for `fanout plan`).
    pub async fn histories(
        &self,
        ids: &[u32],
    ) -> Result<(crate::history::SendTimes, Vec<crate::history::History>)> {
        match self {
            Store::File(store) => {
                let (store, ids) = (Arc::clone(store), ids.to_vec());
                off_runtime(move || store.histories(&ids)).await
            }
            Store::Redis(store) => Ok((store.send_times().await?, store.histories(ids).await?)),
        }
    }

    /// Whether the store has a ledger for `key`, without creating it: on the embedded store,
    /// whether its files exist (a campaign admitted to nobody has one); on Redis, whether any
    /// id was ever claimed in it (a ledger nobody was claimed in leaves no key there).
    pub async fn has_ledger(&self, key: &str) -> Result<bool> {
        match self {
            Store::File(store) => store.has_ledger(key),
            Store::Redis(store) => store.has_claims(key).await,
        }
    }

    /// Ends a run that failed (exit 1): on Redis, drops this run's lease if it still holds
    /// our token and leaves its in-flight sets, so a re-run adopts them at once instead of
    /// waiting for the lease to expire. Nothing for the embedded store.
    pub async fn abandon(&self) -> Result<()> {
        match self {
            Store::File(_) => Ok(()),
            Store::Redis(store) => store.abandon().await,
        }
    }

    /// The guard the dispatcher checks before every provider attempt (see [`Fence`]).
    pub fn fence(&self) -> Fence {
        match self {
            Store::File(_) => Fence::default(),
            Store::Redis(store) => store.fence(),
        }
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        match self {
            Store::File(store) => store.url(),
            Store::Redis(store) => store.url(),
        }
    }
}

impl Ledger {
    /// Claims `ids`: each id is handed out (in `claimed`) at most once per store, except ids in
    /// flight at the previous process's crash, which are handed out once more. Durable against
    /// a process kill when this returns; against a machine crash after the next [`Store::sync`].
    pub async fn claim(&self, ids: &[u32]) -> Result<Claim> {
        match self {
            Ledger::File(ledger) => ledger.claim(ids),
            Ledger::Redis(ledger) => ledger.claim(ids).await,
        }
    }

    /// [`Ledger::claim`] without waiting, where the store is local (the embedded store: a
    /// set operation and an append to its log); `None` where a claim is network I/O (Redis),
    /// to be awaited with [`Ledger::claim`] instead.
    pub fn claim_local(&self, ids: &[u32]) -> Option<Result<Claim>> {
        match self {
            Ledger::File(ledger) => Some(ledger.claim(ids)),
            Ledger::Redis(_) => None,
        }
    }

    /// Claims `ids` as [`Ledger::claim`] does and settles the claimed ones as held out in the
    /// same atomic step (SPEC "Holdouts": recorded, never sent). An id in flight at a dead
    /// process's crash is settled held out too; done ids are `already`.
    pub async fn claim_held_out(&self, ids: &[u32]) -> Result<Claim> {
        match self {
            Ledger::File(ledger) => ledger.claim_held_out(ids),
            Ledger::Redis(ledger) => ledger.claim_held_out(ids).await,
        }
    }

    /// [`Ledger::claim_held_out`] without waiting where the store is local (see
    /// [`Ledger::claim_local`]).
    pub fn claim_held_out_local(&self, ids: &[u32]) -> Option<Result<Claim>> {
        match self {
            Ledger::File(ledger) => Some(ledger.claim_held_out(ids)),
            Ledger::Redis(_) => None,
        }
    }

    /// Claims `ids` as [`Ledger::claim`] does and settles the claimed ones as cancelled in
    /// the same atomic step (SPEC "Campaign control": a cancelled campaign's unclaimed users
    /// are `cancelled`, never sent). Done ids are `already`.
    pub async fn claim_cancelled(&self, ids: &[u32]) -> Result<Claim> {
        match self {
            Ledger::File(ledger) => ledger.claim_cancelled(ids),
            Ledger::Redis(ledger) => ledger.claim_cancelled(ids).await,
        }
    }

    /// [`Ledger::claim_cancelled`] without waiting where the store is local.
    pub fn claim_cancelled_local(&self, ids: &[u32]) -> Option<Result<Claim>> {
        match self {
            Ledger::File(ledger) => Some(ledger.claim_cancelled(ids)),
            Ledger::Redis(_) => None,
        }
    }

    /// Holds users for their quiet hours (SPEC "Quiet hours"): each of `ids` not claimed is
    /// recorded as held (in `claimed` of the answer) and stays claimable, for the run that
    /// finds it outside its quiet hours; a claimed one is `already`.
    pub async fn hold_quiet(&self, ids: &[u32]) -> Result<Claim> {
        match self {
            Ledger::File(ledger) => ledger.hold_quiet(ids),
            Ledger::Redis(ledger) => ledger.hold_quiet(ids).await,
        }
    }

    /// [`Ledger::hold_quiet`] without waiting where the store is local (see
    /// [`Ledger::claim_local`]).
    pub fn hold_quiet_local(&self, ids: &[u32]) -> Option<Result<Claim>> {
        match self {
            Ledger::File(ledger) => Some(ledger.hold_quiet(ids)),
            Ledger::Redis(_) => None,
        }
    }

    /// Hands `ids` — claimed by this process and left unsettled (never attempted) — out once
    /// more at their next claim, as if a crash had left them in flight: `serve` cuts a
    /// generation short this way and sends them in the next.
    pub async fn unclaim(&self, ids: &[u32]) -> Result<()> {
        match self {
            Ledger::File(ledger) => {
                ledger.unclaim(ids);
                Ok(())
            }
            Ledger::Redis(ledger) => ledger.unclaim(ids).await,
        }
    }

    /// Records `ids` as unreachable (no push token): settled, never sent.
    pub async fn mark_unreachable(&self, ids: &[u32]) -> Result<()> {
        match self {
            Ledger::File(ledger) => ledger.mark_unreachable(ids),
            Ledger::Redis(ledger) => ledger.mark_unreachable(ids).await,
        }
    }

    /// Records claimed `ids` as cancelled: their campaign was cancelled before they were
    /// pushed (SPEC "Campaign control"); done, never sent.
    pub async fn mark_cancelled(&self, ids: &[u32]) -> Result<()> {
        match self {
            Ledger::File(ledger) => ledger.mark_cancelled(ids),
            Ledger::Redis(ledger) => ledger.mark_cancelled(ids).await,
        }
    }

    /// Records `ids` as delivered.
    pub async fn mark_done(&self, ids: &[u32]) -> Result<()> {
        match self {
            Ledger::File(ledger) => ledger.mark_done(ids),
            Ledger::Redis(ledger) => ledger.mark_done(ids).await,
        }
    }

    /// Records `ids` as dead-lettered; they also count as done.
    pub async fn mark_dead(&self, ids: &[u32]) -> Result<()> {
        match self {
            Ledger::File(ledger) => ledger.mark_dead(ids),
            Ledger::Redis(ledger) => ledger.mark_dead(ids).await,
        }
    }

    /// Makes every dead-lettered id claimable again, so this run re-drives it
    /// (`--retry-dead-letters`); returns how many. Durable when it returns.
    pub async fn revive_dead(&self) -> Result<u64> {
        match self {
            Ledger::File(ledger) => {
                let ledger = Arc::clone(ledger);
                off_runtime(move || ledger.revive_dead()).await
            }
            Ledger::Redis(ledger) => ledger.revive_dead().await,
        }
    }

    /// How many of `ids` are done (for `fanout plan`).
    pub async fn count_done(&self, ids: &[u32]) -> Result<u64> {
        match self {
            Ledger::File(ledger) => Ok(ids.iter().filter(|&&id| ledger.is_done(id)).count() as u64),
            Ledger::Redis(ledger) => ledger.count_done(ids).await,
        }
    }

    /// The ids done (delivered or dead-lettered) now, where that is a local copy (the
    /// embedded store); `None` on Redis, where it would be a read of the whole ledger. A done
    /// id stays done until `--retry-dead-letters` revives it, which happens before anything is
    /// fed, so the claim answers `already` for every id of this set for the rest of a run.
    pub fn done_now(&self) -> Option<RoaringBitmap> {
        match self {
            Ledger::File(ledger) => Some(ledger.done_now()),
            Ledger::Redis(_) => None,
        }
    }

    /// Whether each of `ids` is done.
    pub async fn are_done(&self, ids: &[u32]) -> Result<Vec<bool>> {
        match self {
            Ledger::File(ledger) => Ok(ids.iter().map(|&id| ledger.is_done(id)).collect()),
            Ledger::Redis(ledger) => ledger.are_done(ids).await,
        }
    }

    /// Whether `id` is done.
    pub async fn is_done(&self, id: u32) -> Result<bool> {
        Ok(self.count_done(&[id]).await? == 1)
    }

    /// How many ids the ledger holds in each set.
    pub async fn counts(&self) -> Result<LedgerCounts> {
        match self {
            Ledger::File(ledger) => Ok(ledger.counts()),
            Ledger::Redis(ledger) => ledger.counts().await,
        }
    }
}

#[cfg(test)]
mod tests;
