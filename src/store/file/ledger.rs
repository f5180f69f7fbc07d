//! [`FileLedger`]: one ledger's sets in memory, its log appender, and its checkpoint.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use roaring::RoaringBitmap;

use super::format::{encode_record, file_stem, load, Kind, Sets};
use super::{io_error, lock};
use crate::error::{Error, Result};
use crate::store::{Claim, LedgerCounts};

/// One ledger of the embedded store.
pub struct FileLedger {
    key: String,
    dir: PathBuf,
    log_path: PathBuf,
    snap_path: PathBuf,
    /// A second handle on the log, so fsync runs without blocking claims.
    sync_handle: Option<File>,
    /// Set by every append, cleared by [`FileLedger::sync`].
    unsynced: AtomicBool,
    pub(super) state: Mutex<State>,
    /// Keeps the store locked while any ledger handle lives.
    _lock: Option<Arc<File>>,
}

impl fmt::Debug for FileLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLedger")
            .field("key", &self.key)
            .field("log", &self.log_path)
            .finish()
    }
}

/// Ids per roaring container below which a batch goes id by id (see [`ascending_bitmap`]).
const SET_OPS_MIN_IDS_PER_CONTAINER: usize = 8;

/// `ids` as a bitmap, if they are strictly ascending (no repeats) and dense enough for whole-
/// container set operations. Those cost about the size of every ledger container the batch
/// touches; the per-id rules cost a lookup per id. A fan-out batch (ids of a few buckets)
/// fills a container or two; a lazy coupon's batch (one epoch's logins) has a few ids in each
/// of many containers, and id by id it is several times cheaper (measured on lazy_logins).
fn ascending_bitmap(ids: &[u32]) -> Option<RoaringBitmap> {
    let containers = 1 + ids.windows(2).filter(|w| w[0] >> 16 != w[1] >> 16).count();
    if ids.len() < SET_OPS_MIN_IDS_PER_CONTAINER * containers {
        return None;
    }
    if ids.windows(2).all(|w| w[0] < w[1]) {
        RoaringBitmap::from_sorted_iter(ids.iter().copied()).ok()
    } else {
        None
    }
}

pub(super) struct State {
    pub(super) sets: Sets,
    /// Claimed but not done when the ledger was opened: in flight at a crash, handed out once.
    pending: RoaringBitmap,
    /// The append-mode log; `None` when read-only.
    log: Option<File>,
    /// Bytes of whole records in the log.
    log_len: u64,
    /// A failed append could not be cut back off the log: refuse to append after it.
    broken: bool,
    /// The record being written, kept to reuse its allocation.
    buf: Vec<u8>,
}

impl FileLedger {
    pub(super) fn open(
        key: &str,
        dir: &Path,
        store_lock: Option<Arc<File>>,
        auto_checkpoint_bytes: u64,
    ) -> Result<FileLedger> {
        let stem = file_stem(key)?;
        let log_path = dir.join(format!("{stem}.log"));
        let snap_path = dir.join(format!("{stem}.snap"));
        let (sets, good, file_len) = load(&snap_path, &log_path)?;
        let writable = store_lock.is_some();
        let mut log = None;
        let mut sync_handle = None;
        if writable {
            let created = !log_path.exists();
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log_path)
                .with_context(|| format!("cannot open {}", log_path.display()))?;
            if good < file_len {
                tracing::warn!(
                    log = %log_path.display(),
                    kept_bytes = good,
                    dropped_bytes = file_len - good,
                    "torn tail in a ledger log (a crash mid-append); truncating to the last good record"
                );
                file.set_len(good)
                    .and_then(|()| file.sync_all())
                    .with_context(|| format!("cannot truncate {}", log_path.display()))?;
            }
            if created {
                fsync_dir(dir)?;
            }
            sync_handle = Some(
                file.try_clone()
                    .with_context(|| format!("cannot reopen {}", log_path.display()))?,
            );
            log = Some(file);
        }
        let pending = &sets.claimed - &sets.done;
        let ledger = FileLedger {
            key: key.to_owned(),
            dir: dir.to_owned(),
            log_path,
            snap_path,
            sync_handle,
            unsynced: AtomicBool::new(false),
            state: Mutex::new(State {
                sets,
                pending,
                log,
                log_len: good,
                broken: false,
                buf: Vec::new(),
            }),
            _lock: store_lock,
        };
        if writable && good > auto_checkpoint_bytes {
            ledger.checkpoint()?;
        }
        Ok(ledger)
    }

    /// The atomic claim; see [`crate::store::Ledger::claim`].
    pub fn claim(&self, ids: &[u32]) -> Result<Claim> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if let Some(batch) = ascending_bitmap(ids) {
            return self.claim_sorted(st, ids, batch);
        }
        let mut out = Claim {
            claimed: Vec::with_capacity(ids.len()),
            already: Vec::new(),
        };
        let mut fresh = Vec::with_capacity(ids.len());
        let mut from_pending = Vec::new();
        for &id in ids {
            if st.sets.done.contains(id) {
                out.already.push(id);
            } else if st.sets.claimed.insert(id) {
                fresh.push(id);
                out.claimed.push(id);
            } else if st.pending.remove(id) {
                // Already in the log as claimed: no new record.
                from_pending.push(id);
                out.claimed.push(id);
            } else {
                out.already.push(id);
            }
        }
        if fresh.is_empty() {
            return Ok(out);
        }
        if let Err(e) = self.append(st, Kind::Claim, &fresh) {
            // Nothing was granted: undo so the ids can be claimed again.
            for id in fresh {
                st.sets.claimed.remove(id);
            }
            for id in from_pending {
                st.pending.insert(id);
            }
            return Err(e);
        }
        Ok(out)
    }

    /// Records `ids` as delivered.
    pub fn mark_done(&self, ids: &[u32]) -> Result<()> {
        self.mark(Kind::Done, ids)
    }

    /// Records `ids` as dead-lettered (and so done).
    pub fn mark_dead(&self, ids: &[u32]) -> Result<()> {
        self.mark(Kind::Dead, ids)
    }

    fn mark(&self, kind: Kind, ids: &[u32]) -> Result<()> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if let Some(batch) = ascending_bitmap(ids) {
            return self.mark_sorted(st, kind, ids, batch);
        }
        let target = if kind == Kind::Dead {
            &st.sets.dead
        } else {
            &st.sets.done
        };
        let new: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| !target.contains(id))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        // Written first: memory never claims more than the log holds.
        self.append(st, kind, &new)?;
        for id in new {
            st.sets.apply(kind, id);
            st.pending.remove(id);
        }
        Ok(())
    }

    /// [`Self::claim`] for strictly ascending ids, as set operations on whole containers
    /// (the engine's batches are id-ordered): the same outcome as the per-id rules.
    fn claim_sorted(&self, st: &mut State, ids: &[u32], batch: RoaringBitmap) -> Result<Claim> {
        let done = &batch & &st.sets.done;
        let open = batch - &done;
        let fresh = &open - &st.sets.claimed;
        if fresh.len() == ids.len() as u64 {
            // The common case, a first run: every id is new.
            self.append(st, Kind::Claim, ids)?;
            st.sets.claimed |= &fresh;
            return Ok(Claim {
                claimed: ids.to_vec(),
                already: Vec::new(),
            });
        }
        let claimed_before = open - &fresh;
        let resend = &claimed_before & &st.pending;
        let taken = claimed_before - &resend;
        if !fresh.is_empty() {
            let ids: Vec<u32> = fresh.iter().collect();
            // Written first: memory never claims more than the log holds.
            self.append(st, Kind::Claim, &ids)?;
            st.sets.claimed |= &fresh;
        }
        st.pending -= &resend;
        Ok(Claim {
            claimed: (fresh | resend).iter().collect(),
            already: (done | taken).iter().collect(),
        })
    }

    /// [`Self::mark`] for strictly ascending ids, as set operations.
    fn mark_sorted(
        &self,
        st: &mut State,
        kind: Kind,
        ids: &[u32],
        batch: RoaringBitmap,
    ) -> Result<()> {
        let target = if kind == Kind::Dead {
            &st.sets.dead
        } else {
            &st.sets.done
        };
        let new = batch - target;
        if new.is_empty() {
            return Ok(());
        }
        if new.len() == ids.len() as u64 {
            self.append(st, kind, ids)?;
        } else {
            let ids: Vec<u32> = new.iter().collect();
            self.append(st, kind, &ids)?;
        }
        st.sets.claimed |= &new;
        st.sets.done |= &new;
        if kind == Kind::Dead {
            st.sets.dead |= &new;
        }
        st.pending -= &new;
        Ok(())
    }

    /// Appends one record with one write; on failure cuts the log back to its last whole record.
    fn append(&self, st: &mut State, kind: Kind, ids: &[u32]) -> Result<()> {
        let Some(log) = st.log.as_mut() else {
            return Err(Error::runtime(format!(
                "ledger {} is open read-only",
                self.key
            )));
        };
        if st.broken {
            return Err(Error::runtime(format!(
                "ledger log {} is damaged by an earlier failed write; restart to repair it",
                self.log_path.display()
            )));
        }
        encode_record(&mut st.buf, kind, ids.iter().copied());
        if let Err(e) = log.write_all(&st.buf) {
            if log.set_len(st.log_len).is_err() {
                st.broken = true;
            }
            return Err(io_error(e, "cannot append to", &self.log_path));
        }
        st.log_len += st.buf.len() as u64;
        self.unsynced.store(true, Ordering::Release);
        Ok(())
    }

    /// A copy of the done set as it is now.
    pub fn done_now(&self) -> RoaringBitmap {
        lock(&self.state).sets.done.clone()
    }

    /// Whether `id` is done.
    pub fn is_done(&self, id: u32) -> bool {
        lock(&self.state).sets.done.contains(id)
    }

    /// How many ids each set holds.
    pub fn counts(&self) -> LedgerCounts {
        let st = lock(&self.state);
        LedgerCounts {
            claimed: st.sets.claimed.len(),
            done: st.sets.done.len(),
            dead: st.sets.dead.len(),
        }
    }

    pub(super) fn sync(&self) -> Result<()> {
        let Some(handle) = &self.sync_handle else {
            return Ok(());
        };
        if self.unsynced.swap(false, Ordering::AcqRel) {
            if let Err(e) = handle.sync_data() {
                self.unsynced.store(true, Ordering::Release);
                return Err(io_error(e, "cannot fsync", &self.log_path));
            }
        }
        Ok(())
    }

    /// Writes the sets to a new snapshot, then empties the log. Each step leaves a state that
    /// reopens to the same sets: old snap + log, new snap + log, or new snap + empty log.
    pub(super) fn checkpoint(&self) -> Result<()> {
        let mut guard = lock(&self.state);
        if guard.log_len == 0 {
            return Ok(());
        }
        self.write_snapshot(&mut guard)
    }

    /// Makes every dead-lettered id claimable again (`--retry-dead-letters`): each leaves
    /// *dead* and *done* and is handed out once more by [`Self::claim`], as if it had been in
    /// flight at a crash. Returns how many were revived.
    ///
    /// The log only ever adds ids, so the removal is written as a new snapshot (with the log
    /// emptied): a crash before the snapshot's rename leaves the ids dead, one after it leaves
    /// them revived (a crash between the rename and the log's truncation leaves them dead, as
    /// the old log replays over the new snapshot); either way nothing is sent twice.
    pub fn revive_dead(&self) -> Result<u64> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.log.is_none() {
            return Err(Error::runtime(format!(
                "ledger {} is open read-only",
                self.key
            )));
        }
        let dead = std::mem::take(&mut st.sets.dead);
        if dead.is_empty() {
            return Ok(0);
        }
        st.sets.done -= &dead;
        if let Err(e) = self.write_snapshot(st) {
            st.sets.done |= &dead;
            st.sets.dead = dead;
            return Err(e);
        }
        let revived = dead.len();
        st.pending |= dead;
        Ok(revived)
    }

    /// Writes the sets as the snapshot and empties the log (the state lock is held).
    fn write_snapshot(&self, st: &mut State) -> Result<()> {
        let Some(log) = st.log.as_mut() else {
            return Ok(());
        };
        let bytes = st.sets.encode()?;
        let tmp = self.snap_path.with_extension("snap.tmp");
        let write_tmp = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        write_tmp().with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &self.snap_path)
            .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
        fsync_dir(&self.dir)?;
        log.set_len(0)
            .and_then(|()| log.sync_all())
            .with_context(|| format!("cannot truncate {}", self.log_path.display()))?;
        st.log_len = 0;
        // Whatever a failed append left behind is gone with the log.
        st.broken = false;
        Ok(())
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
}
