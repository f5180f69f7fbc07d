//! The embedded store (`file:DIR`): per ledger, one snapshot and one append-only log per shard.
//!
//! ```text
//! DIR/LOCK                      exclusive lock (flock) while a writer has the store open
//! DIR/ledgers/<key>.log         shard 0's log: records [len u32 LE][crc32 u32 LE][kind u8, ids u32 LE…]
//! DIR/ledgers/<key>.<k>.log     shard k's log (k ≥ 1), the same records
//! DIR/ledgers/<key>.snap        "FANOUTS4", body len u64 LE, crc32 u32 LE, body: claimed,
//!                               done, dead, unreachable, held_out, quiet, capped, cancelled
//!                               as (len u64 LE, roaring bitmap) (versions 1–3, with the
//!                               first 3, 6 and 7 of them, are still read)
//! ```
//! Record kinds: 1 claim, 2 done (delivered), 3 dead, 4 unreachable, 5 held out, 7 capped and
//! 8 cancelled (each a claim and its settlement in one record), 6 held for quiet hours. A kind
//! byte with its high bit set (0x80) says the ids follow as runs, (first u32 LE, last u32 LE)
//! both inclusive: a record of consecutive ids is 17 bytes however many it holds.
//! `<key>` is the ledger key with every byte outside `[A-Za-z0-9_-]` written `%XX`.
//!
//! Each record is written with one `write` on an append-mode file, so a claim survives a
//! process kill the moment [`FileLedger::claim`] returns; [`FileStore::sync`] adds machine-crash
//! durability. Opening loads the snapshot and replays every log over it; a torn tail (what a
//! crash leaves: a partial last record, or zeros) is cut off, while a bad record with records
//! after it is corruption and refuses the open rather than drop them. Every record is a set
//! union, so replaying a log over a newer snapshot (a crash inside a checkpoint) changes
//! nothing, and which log holds an id does not matter: a ledger is sharded ([`Shards`], by the
//! worker that owns each id) only so that workers do not contend for one lock and one file.

mod admitted;
mod campaigns;
mod format;
mod history;
mod ledger;
mod runs;
mod shard;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{anyhow, Context};

use crate::error::{Error, Result};
pub use campaigns::set_state_in;
use format::{file_stem, load};
pub use ledger::FileLedger;
/// The ledger's claim of an id-ordered batch that is one run of consecutive ids: its shape
/// test and its disjointness test (bench/ceiling.rs claims the same way).
pub use runs::{joined_runs, run_of};
pub use shard::Shards;

/// A ledger whose log is bigger than this is checkpointed when opened.
const AUTO_CHECKPOINT_BYTES: u64 = 64 << 20;

/// Threads that fsync ledgers at once in [`FileStore::sync`] and [`FileStore::checkpoint`].
const PARALLEL_FSYNCS: usize = 16;

/// Runs `f` on every ledger, [`PARALLEL_FSYNCS`] at a time; the first error, if any. Each
/// ledger's sync and checkpoint stand alone, and fsyncs of different files issued together
/// share the file system's journal commits: one after another, a run with 100 lazy coupons
/// spent ~1 s of its 3 s waiting on them (lazy_logins, issue #12).
fn each_ledger(
    ledgers: Vec<Arc<FileLedger>>,
    f: impl Fn(&FileLedger) -> Result<()> + Sync,
) -> Result<()> {
    if ledgers.len() <= 1 {
        return ledgers.iter().try_for_each(|l| f(l));
    }
    let per_thread = ledgers.len().div_ceil(PARALLEL_FSYNCS);
    std::thread::scope(|scope| {
        let f = &f;
        let threads: Vec<_> = ledgers
            .chunks(per_thread)
            .map(|part| scope.spawn(move || part.iter().try_for_each(|l| f(l))))
            .collect();
        threads.into_iter().try_for_each(|t| {
            t.join()
                .unwrap_or_else(|_| Err(Error::runtime("a ledger fsync thread panicked")))
        })
    })
}

/// A runtime error for a failed I/O call on `path`.
fn io_error(e: io::Error, what: &str, path: &Path) -> Error {
    Error::Runtime(anyhow!(e).context(format!("{what} {}", path.display())))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the sets consistent (each step is one insert).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An embedded store: a directory of ledgers, locked against other writers.
pub struct FileStore {
    url: String,
    ledgers_dir: PathBuf,
    /// The held `LOCK` file; `None` when read-only.
    lock: Option<Arc<File>>,
    open: Mutex<HashMap<String, Arc<FileLedger>>>,
    /// How ledgers opened from now on are sharded.
    shards: Mutex<Shards>,
    /// A ledger whose log is longer than this when opened is checkpointed right away.
    auto_checkpoint_bytes: u64,
    /// Users' send history, for frequency caps.
    history: Arc<history::Histories>,
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("url", &self.url)
            .field("read_only", &self.lock.is_none())
            .finish()
    }
}

impl FileStore {
    /// Opens (creating if missing) the store in `dir` for writing and takes its lock.
    pub fn open(url: &str, dir: &str) -> Result<FileStore> {
        let dir = Path::new(dir);
        let ledgers_dir = dir.join("ledgers");
        fs::create_dir_all(&ledgers_dir)
            .with_context(|| format!("cannot create store directory {}", ledgers_dir.display()))?;
        let lock_path = dir.join("LOCK");
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::runtime(format!(
                    "store {url} is in use by another fanout process"
                )))
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error(e, "cannot lock", &lock_path)),
        }
        // The pid only helps a person find the holder; the flock is what excludes.
        lock_file
            .set_len(0)
            .and_then(|()| writeln!(&lock_file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", lock_path.display()))?;
        Ok(FileStore {
            url: url.to_owned(),
            ledgers_dir,
            lock: Some(Arc::new(lock_file)),
            open: Mutex::new(HashMap::new()),
            shards: Mutex::new(Shards::default()),
            auto_checkpoint_bytes: AUTO_CHECKPOINT_BYTES,
            history: Arc::new(history::Histories::open(dir)?),
        })
    }

    /// Opens the store in `dir` without the lock; nothing is ever written. Each ledger is read
    /// once, when first asked for: it is a snapshot of that moment, not a live view.
    pub fn open_read_only(url: &str, dir: &str) -> Result<FileStore> {
        let dir = Path::new(dir);
        if dir.exists() && !dir.is_dir() {
            return Err(Error::runtime(format!(
                "store {url}: {} is not a directory",
                dir.display()
            )));
        }
        Ok(FileStore {
            url: url.to_owned(),
            ledgers_dir: dir.join("ledgers"),
            lock: None,
            open: Mutex::new(HashMap::new()),
            shards: Mutex::new(Shards::default()),
            auto_checkpoint_bytes: AUTO_CHECKPOINT_BYTES,
            history: Arc::new(history::Histories::none(dir)),
        })
    }

    /// The repeated-campaign guard; see [`crate::store::Store::admit`].
    pub fn admit(
        &self,
        campaigns: &[(String, String)],
        now: u64,
        ttl_s: u64,
    ) -> Result<std::result::Result<(), (String, String)>> {
        if self.lock.is_none() {
            return Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            )));
        }
        let dir = self.ledgers_dir.parent().unwrap_or(Path::new("."));
        admitted::admit(dir, campaigns, now, ttl_s)
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Shards every ledger opened from now on by `shards` (those open keep theirs: the shard
    /// of an id is a matter of speed, not of meaning).
    pub fn shard_by(&self, shards: Shards) {
        *lock(&self.shards) = shards;
    }

    /// The ledger of `key` if it is already open.
    pub fn cached_ledger(&self, key: &str) -> Option<Arc<FileLedger>> {
        lock(&self.open).get(key).cloned()
    }

    /// The ledger of `key`, opened and replayed on first use.
    pub fn ledger(&self, key: &str) -> Result<Arc<FileLedger>> {
        // Held across the open so no ledger is ever opened twice (two appenders, two pendings).
        let mut open = lock(&self.open);
        if let Some(ledger) = open.get(key) {
            return Ok(Arc::clone(ledger));
        }
        let ledger = Arc::new(FileLedger::open(
            key,
            &self.ledgers_dir,
            self.lock.clone(),
            self.auto_checkpoint_bytes,
            *lock(&self.shards),
            Arc::clone(&self.history),
        )?);
        if let Some(sent) = self
            .history
            .existing()
            .and_then(|h| h.take_unreconciled(key))
        {
            ledger.adopt_sent(&sent)?;
        }
        open.insert(key.to_owned(), Arc::clone(&ledger));
        Ok(ledger)
    }

    fn open_ledgers(&self) -> Vec<Arc<FileLedger>> {
        lock(&self.open).values().cloned().collect()
    }

    /// Fsyncs the log of every ledger written since the last sync — the send history's
    /// first, as a send is recorded there before its claim is.
    pub fn sync(&self) -> Result<()> {
        if let Some(h) = self.history.existing() {
            h.sync()?;
        }
        each_ledger(self.open_ledgers(), FileLedger::sync)
    }

    /// Folds every open ledger's log into its snapshot, and the send history's log into its
    /// own, once every send it holds is in its ledger.
    pub fn checkpoint(&self) -> Result<()> {
        self.fold_logs(FileLedger::checkpoint)
    }

    /// [`Self::checkpoint`] of the ledgers whose logs have grown to a quarter of their
    /// snapshot; the others' logs are fsynced ([`FileLedger::checkpoint_if_due`]). How a run
    /// and `serve` end.
    pub fn checkpoint_due(&self) -> Result<()> {
        self.fold_logs(FileLedger::checkpoint_if_due)
    }

    fn fold_logs(&self, fold: fn(&FileLedger) -> Result<()>) -> Result<()> {
        let history = self.history.existing();
        if let Some(h) = &history {
            for key in h.unreconciled_keys() {
                self.ledger(&key)?;
            }
        }
        each_ledger(self.open_ledgers(), fold)?;
        match history {
            Some(h) => h.checkpoint(self.auto_checkpoint_bytes),
            None => Ok(()),
        }
    }

    /// Whether `key` has a ledger here (a snapshot or a log), without opening it.
    pub fn has_ledger(&self, key: &str) -> Result<bool> {
        let stem = file_stem(key)?;
        let file = |ext: &str| self.ledgers_dir.join(format!("{stem}.{ext}"));
        Ok(file("snap").exists() || file("log").exists())
    }

    /// Every id of `key` claimed and sent (not held out, capped or cancelled), sorted; empty
    /// if the ledger does not exist.
    pub fn granted(&self, key: &str) -> Result<Vec<u32>> {
        let sets = match lock(&self.open).get(key) {
            Some(ledger) => ledger.sets(),
            None => self.read_sets(key)?,
        };
        Ok(
            (sets.claimed - sets.held_out - sets.capped - sets.cancelled)
                .iter()
                .collect(),
        )
    }

    /// See [`crate::store::Store::quiet_unsettled`]; empty (and nothing created) if the
    /// ledger does not exist.
    pub fn quiet_unsettled(&self, key: &str, with_dead: bool) -> Result<roaring::RoaringBitmap> {
        let sets = match lock(&self.open).get(key) {
            Some(ledger) => ledger.sets(),
            None if !self.has_ledger(key)? => return Ok(roaring::RoaringBitmap::new()),
            None => self.read_sets(key)?,
        };
        let settled = match with_dead {
            true => &sets.done - &sets.dead,
            false => sets.done,
        };
        Ok(sets.quiet - settled)
    }

    /// The users of ledger `key` by recorded outcome.
    pub fn outcomes(&self, key: &str) -> Result<crate::store::Outcomes> {
        let sets = match lock(&self.open).get(key) {
            Some(ledger) => ledger.sets(),
            None => self.read_sets(key)?,
        };
        Ok(sets.outcomes())
    }

    /// The sets of ledger `key` as its files hold them, without opening (or creating) it.
    fn read_sets(&self, key: &str) -> Result<format::Sets> {
        let stem = file_stem(key)?;
        let (sets, _) = load(
            &self.ledgers_dir.join(format!("{stem}.snap")),
            &ledger::log_paths(&self.ledgers_dir, &stem),
        )?;
        Ok(sets)
    }
}

/// Capped claims on the embedded store; see [`crate::store::claim_capped`].
pub fn claim_capped(
    members: &[(crate::store::Ledger, Vec<u32>)],
    at: crate::store::SendAt,
    caps: &[crate::history::Window],
) -> Result<Vec<crate::store::CappedClaim>> {
    let mut ledgers = Vec::with_capacity(members.len());
    for (ledger, ids) in members {
        match ledger {
            crate::store::Ledger::File(l) => ledgers.push((l, ids)),
            crate::store::Ledger::Redis(_) => {
                return Err(Error::runtime("a capped claim across two stores"))
            }
        }
    }
    let Some((first, _)) = ledgers.first() else {
        return Ok(Vec::new());
    };
    let history = first.history()?;
    ledgers
        .iter()
        .map(|(l, ids)| l.claim_capped(ids, &history, at, caps))
        .collect()
}

impl FileStore {
    /// The send-time table and the histories of `ids`, as the store holds them now.
    pub fn histories(
        &self,
        ids: &[u32],
    ) -> Result<(crate::history::SendTimes, Vec<crate::history::History>)> {
        if let Some(h) = self.history.existing() {
            let st = h.lock();
            return Ok((st.table.clone(), ids.iter().map(|&id| st.get(id)).collect()));
        }
        let dir = self.ledgers_dir.parent().unwrap_or(Path::new("."));
        let snap = history::Snapshot::read(dir)?;
        Ok((
            snap.table.clone(),
            ids.iter().map(|&id| snap.get(id)).collect(),
        ))
    }

    /// The slot of send time `t`; see [`crate::store::Store::send_slot`].
    pub fn send_slot(&self, t: i64, horizon_s: i64) -> Result<u16> {
        if self.lock.is_none() {
            return Err(Error::runtime(format!(
                "store {} is open read-only",
                self.url
            )));
        }
        self.history.get()?.send_slot(t, horizon_s)
    }
}
