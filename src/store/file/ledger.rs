//! [`FileLedger`]: one ledger's shards ([`super::shard`]), its snapshot and its checkpoint.

use std::borrow::Cow;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};

use anyhow::Context;
use roaring::RoaringBitmap;

use super::format::{file_stem, load, Kind, Sets};
use super::lock;
use super::shard::{Shard, Shards, State};
use crate::error::{Error, Result};
use crate::store::{Claim, LedgerCounts};

/// One ledger of the embedded store.
pub struct FileLedger {
    key: String,
    dir: PathBuf,
    snap_path: PathBuf,
    /// Which shard holds each id (one shard when read-only).
    shard_of: Shards,
    shards: Vec<Shard>,
    /// Keeps the store locked while any ledger handle lives.
    _lock: Option<Arc<File>>,
    /// The store's send history (frequency caps).
    history: Arc<super::history::Histories>,
}

impl fmt::Debug for FileLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLedger")
            .field("key", &self.key)
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// The log of shard `k` of the ledger with file stem `stem`: `<stem>.log` for shard 0 (the
/// only one before ledgers had shards), `<stem>.<k>.log` for the others.
pub(super) fn log_path(dir: &Path, stem: &str, k: usize) -> PathBuf {
    if k == 0 {
        dir.join(format!("{stem}.log"))
    } else {
        dir.join(format!("{stem}.{k}.log"))
    }
}

/// Every log of the ledger with file stem `stem`: shard 0's (whether or not it exists), then
/// shard 1's, 2's … while they exist (a writer creates all of its shards' logs at once, and
/// removes surplus ones from the last down, so they are numbered without gaps).
pub(super) fn log_paths(dir: &Path, stem: &str) -> Vec<PathBuf> {
    let mut paths = vec![log_path(dir, stem, 0)];
    for k in 1.. {
        let path = log_path(dir, stem, k);
        if !path.exists() {
            break;
        }
        paths.push(path);
    }
    paths
}

/// Opens shard `k`'s log for appending, cutting a torn tail (`good` of `len` bytes are whole
/// records); also returns a second handle for fsync.
fn open_log(path: &Path, dir: &Path, good: u64, len: u64) -> Result<(File, File)> {
    let created = !path.exists();
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if good < len {
        tracing::warn!(
            log = %path.display(),
            kept_bytes = good,
            dropped_bytes = len - good,
            "torn tail in a ledger log (a crash mid-append); truncating to the last good record"
        );
        file.set_len(good)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot truncate {}", path.display()))?;
    }
    if created {
        fsync_dir(dir)?;
    }
    let sync = file
        .try_clone()
        .with_context(|| format!("cannot reopen {}", path.display()))?;
    Ok((file, sync))
}

/// `sets` cut into one part per shard of `shard_of`.
fn split(sets: Sets, shard_of: &Shards) -> Vec<Sets> {
    if shard_of.count() == 1 {
        return vec![sets];
    }
    // Every id of any set is claimed or quiet-held: their blocks cover them all.
    let masks = shard_of.masks(&sets.ids());
    masks.iter().map(|mask| sets.masked(mask)).collect()
}

impl FileLedger {
    pub(super) fn open(
        key: &str,
        dir: &Path,
        store_lock: Option<Arc<File>>,
        auto_checkpoint_bytes: u64,
        shard_of: Shards,
        history: Arc<super::history::Histories>,
    ) -> Result<FileLedger> {
        let stem = file_stem(key)?;
        let snap_path = dir.join(format!("{stem}.snap"));
        let found = log_paths(dir, &stem);
        let (sets, lens) = load(&snap_path, &found)?;
        let writable = store_lock.is_some();
        let shard_of = if writable {
            shard_of
        } else {
            Shards::default()
        };
        let mut shards = Vec::with_capacity(shard_of.count());
        for (k, sets) in split(sets, &shard_of).into_iter().enumerate() {
            let path = log_path(dir, &stem, k);
            let (good, len) = lens.get(k).copied().unwrap_or((0, 0));
            let (log, sync) = match writable {
                true => {
                    let (log, sync) = open_log(&path, dir, good, len)?;
                    (Some(log), Some(sync))
                }
                false => (None, None),
            };
            shards.push(Shard::new(path, log, sync, sets, good));
        }
        let ledger = FileLedger {
            key: key.to_owned(),
            dir: dir.to_owned(),
            snap_path,
            shard_of,
            shards,
            _lock: store_lock,
            history,
        };
        let logged: u64 = lens.iter().map(|(good, _)| good).sum();
        let surplus = &found[found.len().min(ledger.shards.len())..];
        if writable && (logged > auto_checkpoint_bytes || !surplus.is_empty()) {
            ledger.fold(surplus)?;
        }
        Ok(ledger)
    }

    /// Checkpoints, then removes `surplus` logs (of shards an earlier run had and this one
    /// has not: the snapshot now holds what they did), the last first.
    fn fold(&self, surplus: &[PathBuf]) -> Result<()> {
        let mut guards = self.lock_all();
        self.write_snapshot(&mut guards)?;
        for path in surplus.iter().rev() {
            fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        if !surplus.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Every shard's lock, in order (the one order every caller takes them in).
    fn lock_all(&self) -> Vec<MutexGuard<'_, State>> {
        self.shards.iter().map(|s| lock(&s.state)).collect()
    }

    /// `ids` by shard, each part in the order given: the whole slice when it lies in one shard
    /// (the engine's batches, the users of buckets one worker owns), else one part per shard
    /// it touches. Ascending ids (the engine's) are cut a bucket-sized block at a time
    /// ([`Self::sorted_parts`]); others cost a comparison per id while it stays in the block
    /// of the id before it (the shard's arithmetic, three divisions, was 8% of the engine
    /// job's CPU once per id).
    fn parts<'a>(&self, ids: &'a [u32]) -> Vec<(usize, Cow<'a, [u32]>)> {
        let Some(&first) = ids.first() else {
            return Vec::new();
        };
        let mut block = Block::of(&self.shard_of, first);
        let home = block.shard;
        if self.shards.len() == 1 {
            return vec![(home, Cow::Borrowed(ids))];
        }
        // One pass with no early exit (vector compares).
        if (ids[1..].iter().zip(ids)).fold(true, |ok, (next, id)| ok & (next >= id)) {
            return self.sorted_parts(ids);
        }
        if ids
            .iter()
            .all(|&id| block.locate(&self.shard_of, id) == home)
        {
            return vec![(home, Cow::Borrowed(ids))];
        }
        let mut parts = vec![Vec::new(); self.shards.len()];
        for &id in ids {
            parts[block.locate(&self.shard_of, id)].push(id);
        }
        parts
            .into_iter()
            .enumerate()
            .filter(|(_, part)| !part.is_empty())
            .map(|(k, part)| (k, Cow::Owned(part)))
            .collect()
    }

    /// [`Self::parts`] for ascending ids (a capped claim's), found a bucket-sized block at a
    /// time rather than an id at a time.
    fn sorted_parts<'a>(&self, ids: &'a [u32]) -> Vec<(usize, Cow<'a, [u32]>)> {
        debug_assert!(ids.windows(2).all(|w| w[0] <= w[1]), "unsorted ids");
        // Runs of consecutive blocks in one shard: (shard, end of the run in `ids`).
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut at = 0;
        while let Some(&id) = ids.get(at) {
            let (k, end) = self.shard_of.of_block(id);
            at += ids[at..].partition_point(|&x| u64::from(x) < end);
            match runs.last_mut() {
                Some(run) if run.0 == k => run.1 = at,
                _ => runs.push((k, at)),
            }
        }
        if let [(k, _)] = runs[..] {
            return vec![(k, Cow::Borrowed(ids))];
        }
        let mut parts = vec![Vec::new(); self.shards.len()];
        let mut from = 0;
        for (k, end) in runs {
            parts[k].extend_from_slice(&ids[from..end]);
            from = end;
        }
        parts
            .into_iter()
            .enumerate()
            .filter(|(_, part)| !part.is_empty())
            .map(|(k, part)| (k, Cow::Owned(part)))
            .collect()
    }

    /// The atomic claim; see [`crate::store::Ledger::claim`]. Each shard's part is atomic on
    /// its own; the engine's batches (the users of buckets one worker owns) lie in one shard.
    pub fn claim(&self, ids: &[u32]) -> Result<Claim> {
        self.claim_as(Kind::Claim, ids)
    }

    /// The claim of `ids` settled at once as held out; see
    /// [`crate::store::Ledger::claim_held_out`].
    pub fn claim_held_out(&self, ids: &[u32]) -> Result<Claim> {
        self.claim_as(Kind::HeldOut, ids)
    }

    /// The claim of `ids` settled at once as cancelled; see
    /// [`crate::store::Ledger::claim_cancelled`].
    pub fn claim_cancelled(&self, ids: &[u32]) -> Result<Claim> {
        self.claim_as(Kind::Cancelled, ids)
    }

    /// The store's send history, opened (created) if need be.
    pub(super) fn history(&self) -> Result<Arc<super::history::SendHistory>> {
        self.history.get()
    }

    /// This ledger's part of a capped claim; see [`crate::store::claim_capped`].
    pub fn claim_capped(
        &self,
        ids: &[u32],
        history: &super::history::SendHistory,
        at: crate::store::SendAt,
        caps: &[crate::history::Window],
    ) -> Result<crate::store::CappedClaim> {
        let parts = self.sorted_parts(ids);
        let mut out = crate::store::CappedClaim::default();
        for (k, part) in &parts {
            let one = self.shards[*k].claim_capped(&self.key, part, history, at, caps)?;
            if parts.len() == 1 {
                return Ok(one);
            }
            out.claim.claimed.extend(one.claim.claimed);
            out.claim.already.extend(one.claim.already);
            out.capped.extend(one.capped);
        }
        out.claim.claimed.sort_unstable();
        out.claim.already.sort_unstable();
        out.capped.sort_unstable();
        Ok(out)
    }

    /// Takes sends a crash left only in the send history's log as claimed and in flight.
    pub(super) fn adopt_sent(&self, ids: &RoaringBitmap) -> Result<()> {
        for (k, mask) in self.shard_of.masks(ids).iter().enumerate() {
            let part = ids & mask;
            if !part.is_empty() {
                self.shards[k].adopt_sent(&self.key, &part)?;
            }
        }
        Ok(())
    }

    /// See [`crate::store::Ledger::unclaim`].
    pub fn unclaim(&self, ids: &[u32]) {
        for (k, part) in self.parts(ids) {
            self.shards[k].unclaim(&part);
        }
    }

    /// Holds the unclaimed of `ids` for their quiet hours; see
    /// [`crate::store::Ledger::hold_quiet`].
    pub fn hold_quiet(&self, ids: &[u32]) -> Result<Claim> {
        self.by_shard(ids, |shard, part| shard.hold_quiet(&self.key, part))
    }

    fn claim_as(&self, kind: Kind, ids: &[u32]) -> Result<Claim> {
        self.by_shard(ids, |shard, part| shard.claim(&self.key, kind, part))
    }

    /// Runs a claim-like `op` on each shard's part of `ids`; the answer in input order.
    fn by_shard(&self, ids: &[u32], op: impl Fn(&Shard, &[u32]) -> Result<Claim>) -> Result<Claim> {
        let parts = self.parts(ids);
        if let [(k, part)] = parts.as_slice() {
            return op(&self.shards[*k], part);
        }
        let mut claimed = RoaringBitmap::new();
        for (k, part) in &parts {
            claimed.extend(op(&self.shards[*k], part)?.claimed);
        }
        // In input order; a repeated id is claimed once, at its first place.
        let (claimed, already) = ids.iter().partition(|&&id| claimed.remove(id));
        Ok(Claim { claimed, already })
    }

    /// Records `ids` as delivered.
    pub fn mark_done(&self, ids: &[u32]) -> Result<()> {
        self.mark(Kind::Done, ids)
    }

    /// Records `ids` as dead-lettered (and so done).
    pub fn mark_dead(&self, ids: &[u32]) -> Result<()> {
        self.mark(Kind::Dead, ids)
    }

    /// Records `ids` as unreachable (no push token; done).
    pub fn mark_unreachable(&self, ids: &[u32]) -> Result<()> {
        self.mark(Kind::Unreachable, ids)
    }

    /// Records claimed `ids` as cancelled before their push (and so done).
    pub fn mark_cancelled(&self, ids: &[u32]) -> Result<()> {
        self.mark(Kind::Cancelled, ids)
    }

    fn mark(&self, kind: Kind, ids: &[u32]) -> Result<()> {
        self.parts(ids)
            .iter()
            .try_for_each(|(k, part)| self.shards[*k].mark(&self.key, kind, part))
    }

    /// One of the sets, every shard's part together, as it is now.
    fn union_now(&self, set: fn(&Sets) -> &RoaringBitmap) -> RoaringBitmap {
        let mut all = RoaringBitmap::new();
        for shard in &self.shards {
            all |= set(&lock(&shard.state).sets);
        }
        all
    }

    /// A copy of the done set as it is now.
    pub fn done_now(&self) -> RoaringBitmap {
        self.union_now(|sets| &sets.done)
    }

    /// Whether `id` is done.
    pub fn is_done(&self, id: u32) -> bool {
        let shard = &self.shards[self.shard_of.of(id)];
        lock(&shard.state).sets.done.contains(id)
    }

    /// How many ids each set holds.
    pub fn counts(&self) -> LedgerCounts {
        let mut counts = LedgerCounts::default();
        for shard in &self.shards {
            let st = lock(&shard.state);
            counts.claimed += st.sets.claimed.len();
            counts.done += st.sets.done.len();
            counts.dead += st.sets.dead.len();
        }
        counts
    }

    /// A copy of the ledger's sets as they are now (every shard's, together).
    pub(super) fn sets(&self) -> Sets {
        union(&self.lock_all())
    }

    /// Whether any shard's log holds records not yet fsynced.
    #[cfg(test)]
    pub(crate) fn unsynced(&self) -> bool {
        self.shards.iter().any(Shard::unsynced)
    }

    /// Fsyncs every shard's log written since the last sync.
    pub(super) fn sync(&self) -> Result<()> {
        self.shards.iter().try_for_each(Shard::sync)
    }

    /// [`Self::checkpoint`] once the logs hold a quarter of what the snapshot would, else
    /// [`Self::sync`]. A snapshot is rewritten whole, at the cost of the ledger's size, while a
    /// log costs its own length to replay: a 10M-user campaign's run logs ~0.5 MB of runs, and
    /// writing and fsyncing its 2.5 MB snapshot was ~25 ms at the end of a ~1 s run.
    pub(super) fn checkpoint_if_due(&self) -> Result<()> {
        let due = {
            let guards = self.lock_all();
            let logged: u64 = guards.iter().map(|st| st.log_len).sum();
            let snapshot: usize = guards.iter().map(|st| st.sets.serialized_size()).sum();
            logged.saturating_mul(4) >= snapshot as u64
        };
        match due {
            true => self.checkpoint(),
            false => self.sync(),
        }
    }

    /// Writes the sets to a new snapshot, then empties the logs. Each step leaves a state that
    /// reopens to the same sets: old snap + logs, new snap + logs, or new snap + empty logs.
    pub(super) fn checkpoint(&self) -> Result<()> {
        let mut guards = self.lock_all();
        if guards.iter().all(|st| st.log_len == 0) {
            return Ok(());
        }
        self.write_snapshot(&mut guards)
    }

    /// Makes every dead-lettered id claimable again (`--retry-dead-letters`): each leaves
    /// *dead* and *done* and is handed out once more by [`Self::claim`], as if it had been in
    /// flight at a crash. Returns how many were revived.
    ///
    /// The logs only ever add ids, so the removal is written as a new snapshot (with the logs
    /// emptied): a crash before the snapshot's rename leaves the ids dead, one after it leaves
    /// them revived (a crash between the rename and the logs' truncation leaves them dead, as
    /// the old logs replay over the new snapshot); either way nothing is sent twice.
    pub fn revive_dead(&self) -> Result<u64> {
        let mut guards = self.lock_all();
        if guards.iter().any(|st| st.log.is_none()) {
            return Err(Error::runtime(format!(
                "ledger {} is open read-only",
                self.key
            )));
        }
        let dead: Vec<RoaringBitmap> = guards
            .iter_mut()
            .map(|st| std::mem::take(&mut st.sets.dead))
            .collect();
        let revived: u64 = dead.iter().map(RoaringBitmap::len).sum();
        for (st, dead) in guards.iter_mut().zip(&dead) {
            st.sets.done -= dead;
        }
        if revived > 0 {
            if let Err(e) = self.write_snapshot(&mut guards) {
                for (st, dead) in guards.iter_mut().zip(dead) {
                    st.sets.done |= &dead;
                    st.sets.dead = dead;
                }
                return Err(e);
            }
        }
        for (st, dead) in guards.iter_mut().zip(dead) {
            st.pending |= dead;
        }
        Ok(revived)
    }

    /// Writes the sets as the snapshot and empties every log (every shard's lock is held).
    fn write_snapshot(&self, shards: &mut [MutexGuard<'_, State>]) -> Result<()> {
        if shards.iter().any(|st| st.log.is_none()) {
            return Ok(());
        }
        let bytes = union(shards).encode()?;
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
        for (st, shard) in shards.iter_mut().zip(&self.shards) {
            if let Some(log) = st.log.as_mut() {
                log.set_len(0)
                    .and_then(|()| log.sync_all())
                    .with_context(|| format!("cannot truncate {}", shard.log_path.display()))?;
            }
            st.log_len = 0;
            // Whatever a failed append left behind is gone with the log.
            st.broken = false;
        }
        Ok(())
    }
}

/// The union of the shards' sets.
fn union(shards: &[MutexGuard<'_, State>]) -> Sets {
    let mut all = Sets::default();
    for st in shards {
        all.union_with(&st.sets);
    }
    all
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
}

/// The bucket-sized block of ids last looked up, and its shard.
struct Block {
    shard: usize,
    start: u64,
    end: u64,
}

impl Block {
    fn of(shards: &Shards, id: u32) -> Block {
        let (shard, end) = shards.of_block(id);
        let start = end - u64::from(shards.bucket_size());
        Block { shard, start, end }
    }

    /// The shard of `id`: this block's, or that of the block `id` moves it to.
    #[inline]
    fn locate(&mut self, shards: &Shards, id: u32) -> usize {
        let at = u64::from(id);
        if at < self.start || at >= self.end {
            *self = Block::of(shards, id);
        }
        self.shard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block remembered from any earlier id answers every id as the shard arithmetic does.
    #[test]
    fn a_remembered_block_locates_ids_as_the_shards_do() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        for (size, processes, count) in [(1, 1, 4), (10, 1, 3), (1000, 3, 5), (7, 2, 2)] {
            let shards = Shards::new(size, processes, count);
            let mut block = Block::of(&shards, 0);
            for _ in 0..20_000 {
                // Mostly near the last id (runs within a block), sometimes far away.
                let id = match next(4) {
                    0 => next(u64::from(u32::MAX)) as u32,
                    _ => (block.start + next(2 * u64::from(size))).min(u64::from(u32::MAX)) as u32,
                };
                assert_eq!(block.locate(&shards, id), shards.of(id), "id {id}");
            }
        }
    }
}
