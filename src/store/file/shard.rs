//! One shard of a [`super::FileLedger`]: the sets of the ids the shard function gives it, its
//! own append-only log, and its own lock.
//!
//! A ledger is cut into shards so that the engine's workers do not contend: the engine
//! shards by the worker that owns each id's bucket ([`Shards::of`]), so a push task claims and
//! marks in its worker's shard alone and writes its own log file. Which shard holds an id is
//! a matter of speed, not of meaning: every record is a set union and a ledger's sets are the
//! union of all its logs and its snapshot, so any id may sit in any log and a re-run with
//! another shard count reads the same sets.

use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use roaring::RoaringBitmap;

use super::format::{encode_record, encode_runs, Kind, Sets};
use super::history::{Recorded, SendHistory};
use super::runs::{joined_runs, runs_in, runs_of};
use super::{io_error, lock};
use crate::error::{Error, Result};
use crate::store::Claim;

/// How ids are spread over a ledger's shards: by the local worker that owns each id's bucket
/// (`(id / bucket_size / processes) % count`, [`crate::model::Placement`]'s rule within a
/// process). One shard unless the engine says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shards {
    bucket_size: u32,
    processes: u32,
    count: u32,
}

impl Default for Shards {
    fn default() -> Self {
        Shards::new(1, 1, 1)
    }
}

impl Shards {
    /// `count` shards (at least 1, at most [`Shards::MAX`]) of buckets of `bucket_size` ids
    /// spread over `processes`.
    pub fn new(bucket_size: u32, processes: u32, count: u32) -> Self {
        Shards {
            bucket_size: bucket_size.max(1),
            processes: processes.max(1),
            count: count.clamp(1, Self::MAX),
        }
    }

    /// Shards a ledger has at most (each is a log file).
    pub const MAX: u32 = 256;

    /// Ids per bucket-sized block (a block's ids share a shard).
    pub fn bucket_size(&self) -> u32 {
        self.bucket_size
    }

    /// How many shards.
    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// The shard of `id`.
    #[inline]
    pub fn of(&self, id: u32) -> usize {
        ((id / self.bucket_size / self.processes) % self.count) as usize
    }

    /// The shard of `id`, and the end (exclusive) of its bucket-sized block: every id from
    /// `id` up to there is in the same shard.
    #[inline]
    pub fn of_block(&self, id: u32) -> (usize, u64) {
        let size = u64::from(self.bucket_size);
        (self.of(id), (u64::from(id) / size + 1) * size)
    }

    /// Per shard, a bitmap covering the whole bucket-sized block of every id of `ids` that
    /// belongs to it: `ids & masks[k]` is shard `k`'s part. It costs a step per block holding
    /// ids, however far apart they are.
    pub fn masks(&self, ids: &RoaringBitmap) -> Vec<RoaringBitmap> {
        let mut masks = vec![RoaringBitmap::new(); self.count()];
        if self.count == 1 {
            masks[0].insert_range(..);
            return masks;
        }
        let size = u64::from(self.bucket_size);
        let mut it = ids.iter();
        while let Some(id) = it.next() {
            let lo = u64::from(id) / size * size;
            let hi = (lo + size).min(1 << 32);
            // Both within u32: lo ≤ id, hi - 1 < 2^32.
            masks[self.of(id)].insert_range(lo as u32..=(hi - 1) as u32);
            match u32::try_from(hi) {
                Ok(next) => it.advance_to(next),
                Err(_) => break,
            }
        }
        masks
    }
}

pub(super) struct State {
    pub(super) sets: Sets,
    /// Claimed but not done when the ledger was opened: in flight at a crash, handed out once.
    pub(super) pending: RoaringBitmap,
    /// The append-mode log; `None` when read-only.
    pub(super) log: Option<File>,
    /// Bytes of whole records in the log.
    pub(super) log_len: u64,
    /// A failed append could not be cut back off the log: refuse to append after it.
    pub(super) broken: bool,
    /// The record being written, kept to reuse its allocation.
    buf: Vec<u8>,
}

/// One shard: its state behind its lock, and a second handle on its log for fsync.
pub(super) struct Shard {
    pub(super) log_path: PathBuf,
    /// A second handle on the log, so fsync runs without blocking claims.
    sync_handle: Option<File>,
    /// Set by every append, cleared by [`Shard::sync`].
    unsynced: AtomicBool,
    pub(super) state: Mutex<State>,
}

/// Ids per roaring container (or per run) below which a batch goes id by id (see
/// [`Batch::of`]).
const SET_OPS_MIN_IDS_PER_CONTAINER: usize = 8;

/// Strictly ascending ids, dense enough for whole-set operations: a few ranges when they are
/// runs of consecutive ids (a synthetic or densely numbered population's push task, the users
/// of a few buckets: tested and applied with no set built), else a bitmap.
enum Batch {
    Runs(Vec<RangeInclusive<u32>>),
    Set(RoaringBitmap),
}

impl Batch {
    /// `ids` as a batch, if they are strictly ascending (no repeats) and dense enough.
    /// Set operations cost about the size of every ledger container the batch touches; the
    /// per-id rules cost a lookup per id. A fan-out batch (ids of a few buckets) fills a
    /// container or two; a lazy coupon's batch (one epoch's logins) has a few ids in each of
    /// many containers, and id by id it is several times cheaper (measured on lazy_logins).
    fn of(ids: &[u32]) -> Option<Batch> {
        // Runs of 8 ids or more on average: each run is a step (a range test, a range
        // insert, 8 bytes of record) where a set is built, tested and logged id by id.
        if let Some(runs) = runs_of(ids, ids.len() / SET_OPS_MIN_IDS_PER_CONTAINER) {
            return Some(Batch::Runs(runs));
        }
        let containers = 1 + ids.windows(2).filter(|w| w[0] >> 16 != w[1] >> 16).count();
        if ids.len() < SET_OPS_MIN_IDS_PER_CONTAINER * containers
            || !ids.windows(2).all(|w| w[0] < w[1])
        {
            return None;
        }
        RoaringBitmap::from_sorted_iter(ids.iter().copied())
            .ok()
            .map(Batch::Set)
    }

    /// The batch ready to apply, if `set` holds none of its ids: its runs joined across the
    /// gaps `set` holds ([`joined_runs`]), or its bitmap.
    fn fit(&self, set: &RoaringBitmap) -> Option<Fitted<'_>> {
        match self {
            Batch::Runs(runs) => joined_runs(runs, set).map(|joined| Fitted::Runs { runs, joined }),
            Batch::Set(b) => b.is_disjoint(set).then_some(Fitted::Set(b)),
        }
    }

    /// The batch's ids (`ids`, as it was made of) as runs: its own, or found in `ids`.
    fn runs<'a>(&'a self, ids: &[u32]) -> Cow<'a, [RangeInclusive<u32>]> {
        match self {
            Batch::Runs(runs) => Cow::Borrowed(runs),
            Batch::Set(_) => Cow::Owned(runs_in(ids)),
        }
    }

    /// Takes the batch's ids out of `set`.
    fn remove_from(&self, set: &mut RoaringBitmap) {
        match self {
            Batch::Runs(runs) => {
                for r in runs {
                    set.remove_range(r.clone());
                }
            }
            Batch::Set(b) => *set -= b,
        }
    }

    fn into_set(self) -> RoaringBitmap {
        match self {
            Batch::Runs(runs) => {
                let mut set = RoaringBitmap::new();
                for r in runs {
                    set.insert_range(r);
                }
                set
            }
            Batch::Set(b) => b,
        }
    }
}

/// A [`Batch`] none of whose ids is in the set it was fitted against ([`Batch::fit`]).
enum Fitted<'a> {
    Runs {
        runs: &'a [RangeInclusive<u32>],
        joined: Vec<RangeInclusive<u32>>,
    },
    Set(&'a RoaringBitmap),
}

impl Fitted<'_> {
    /// Applies the batch to `sets` as a record of `kind`; `settled`: it was fitted against
    /// done or `kind`'s tag (a mark), else against the claimed set (see
    /// [`Sets::apply_joined`]).
    fn apply_to(&self, sets: &mut Sets, kind: Kind, settled: bool) {
        match self {
            Fitted::Runs { runs, joined } => sets.apply_joined(kind, runs, joined, settled),
            Fitted::Set(b) => sets.apply_all(kind, b),
        }
    }
}

/// `ids` as a bitmap: built in order when they are ascending (a capped claim's are).
fn bitmap_of(ids: &[u32]) -> RoaringBitmap {
    RoaringBitmap::from_sorted_iter(ids.iter().copied())
        .unwrap_or_else(|_| ids.iter().copied().collect())
}

impl Shard {
    /// A shard over `log` (`None`: read-only) holding `sets`, of which `log_len` bytes of
    /// records are in its log.
    pub(super) fn new(
        log_path: PathBuf,
        log: Option<File>,
        sync_handle: Option<File>,
        sets: Sets,
        log_len: u64,
    ) -> Shard {
        let pending = &sets.claimed - &sets.done;
        Shard {
            log_path,
            sync_handle,
            unsynced: AtomicBool::new(false),
            state: Mutex::new(State {
                sets,
                pending,
                log,
                log_len,
                broken: false,
                buf: Vec::new(),
            }),
        }
    }

    /// The atomic claim of `ids` (all of this shard); see [`crate::store::Ledger::claim`].
    /// With `kind` [`Kind::HeldOut`] or [`Kind::Cancelled`] the ids claimed are settled as
    /// held out or cancelled in the same record ([`crate::store::Ledger::claim_held_out`],
    /// [`crate::store::Ledger::claim_cancelled`]); else `kind` is [`Kind::Claim`].
    pub(super) fn claim(&self, key: &str, kind: Kind, ids: &[u32]) -> Result<Claim> {
        let batch = Batch::of(ids);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if let Some(batch) = batch {
            return self.claim_sorted(key, st, kind, ids, batch);
        }
        let mut out = Claim {
            claimed: Vec::with_capacity(ids.len()),
            already: Vec::new(),
        };
        let mut fresh = RoaringBitmap::new();
        let mut resend = RoaringBitmap::new();
        for &id in ids {
            if st.sets.done.contains(id) || fresh.contains(id) || resend.contains(id) {
                out.already.push(id);
            } else if !st.sets.claimed.contains(id) {
                fresh.insert(id);
                out.claimed.push(id);
            } else if st.pending.contains(id) {
                resend.insert(id);
                out.claimed.push(id);
            } else {
                out.already.push(id);
            }
        }
        self.settle_claim(key, st, kind, &fresh, &resend)?;
        Ok(out)
    }

    /// [`Self::claim`] for strictly ascending ids, as set operations on whole containers
    /// (the engine's batches are id-ordered): the same outcome as the per-id rules.
    fn claim_sorted(
        &self,
        key: &str,
        st: &mut State,
        kind: Kind,
        ids: &[u32],
        batch: Batch,
    ) -> Result<Claim> {
        // The common case, a first run: every id is new (tested without building a set; the
        // claimed set holds the done one).
        if let Some(fitted) = batch.fit(&st.sets.claimed) {
            self.append_batch(key, st, kind, ids, &batch)?;
            fitted.apply_to(&mut st.sets, kind, false);
            return Ok(Claim {
                claimed: ids.to_vec(),
                already: Vec::new(),
            });
        }
        let batch = batch.into_set();
        let done = &batch & &st.sets.done;
        let open = batch - &done;
        let fresh = &open - &st.sets.claimed;
        let claimed_before = open - &fresh;
        let resend = &claimed_before & &st.pending;
        let taken = claimed_before - &resend;
        self.settle_claim(key, st, kind, &fresh, &resend)?;
        Ok(Claim {
            claimed: (fresh | resend).iter().collect(),
            already: (done | taken).iter().collect(),
        })
    }

    /// Records a claim: `fresh` ids were never claimed, `resend` ids were claimed by a process
    /// that died before settling them (their claim is in the log already). Written first:
    /// memory never claims more than the log holds.
    fn settle_claim(
        &self,
        key: &str,
        st: &mut State,
        kind: Kind,
        fresh: &RoaringBitmap,
        resend: &RoaringBitmap,
    ) -> Result<()> {
        let write = match kind {
            Kind::Claim => fresh.clone(),
            _ => fresh | resend,
        };
        if !write.is_empty() {
            let ids: Vec<u32> = write.iter().collect();
            self.append(key, st, kind, &ids)?;
            st.sets.apply_all(kind, &write);
        }
        st.pending -= resend;
        Ok(())
    }

    /// The capped claim of `ids` (all of this shard, sorted) at `at`; see
    /// [`crate::store::claim_capped`]. The sends go to `history`'s write-ahead log before this
    /// ledger's claim record, so a crash between the two loses no send. The history's lock
    /// is held from the test of the caps to the record of the sends, no longer: it is the
    /// store's, and each worker claims in its own shard.
    pub(super) fn claim_capped(
        &self,
        key: &str,
        ids: &[u32],
        history: &SendHistory,
        at: crate::store::SendAt,
        caps: &[crate::history::Window],
    ) -> Result<crate::store::CappedClaim> {
        let batch = Batch::of(ids);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut out = crate::store::CappedClaim::default();
        // A batch none of whose ids was ever claimed (a first run) skips the per-id ledger
        // lookups: every id goes to its history, and usually every one is sent.
        let fitted = batch
            .as_ref()
            .and_then(|b| Some((b, b.fit(&st.sets.claimed)?)));
        if let Some((batch, fitted)) = fitted {
            let runs = batch.runs(ids);
            let mut h = history.lock_at(at)?;
            out.capped = h.refused(&runs, at.t, caps);
            if out.capped.is_empty() {
                let recorded = history.record(&mut h, key, at.slot, &runs)?;
                drop(h);
                self.settle_capped(key, st, recorded, (ids, Some(batch), fitted), &[])?;
                out.claim.claimed = ids.to_vec();
            } else {
                let sent = bitmap_of(ids) - bitmap_of(&out.capped);
                out.claim.claimed = sent.iter().collect();
                let recorded = match sent.is_empty() {
                    true => None,
                    false => {
                        let runs = runs_in(&out.claim.claimed);
                        Some(history.record(&mut h, key, at.slot, &runs)?)
                    }
                };
                drop(h);
                let sends = (out.claim.claimed.as_slice(), None, Fitted::Set(&sent));
                self.settle_capped(key, st, recorded, sends, &out.capped)?;
            }
            return Ok(out);
        }
        let (mut sent, mut resend) = (Vec::new(), RoaringBitmap::new());
        let mut h = history.lock_at(at)?;
        // Repeats (ids are sorted, so a repeat follows its first) answer as already granted.
        let mut last = None;
        for &id in ids {
            let repeat = last.replace(id) == Some(id);
            if repeat || st.sets.done.contains(id) {
                out.claim.already.push(id);
            } else if st.sets.claimed.contains(id) {
                match st.pending.contains(id) {
                    true => {
                        resend.insert(id);
                        out.claim.claimed.push(id);
                    }
                    false => out.claim.already.push(id),
                }
            } else if h.get(id).admits(&h.table, at.t, caps) {
                sent.push(id);
                out.claim.claimed.push(id);
            } else {
                out.capped.push(id);
            }
        }
        let recorded = match sent.is_empty() {
            true => None,
            false => Some(history.record(&mut h, key, at.slot, &runs_in(&sent))?),
        };
        drop(h);
        let sent_set = bitmap_of(&sent);
        let sends = (sent.as_slice(), None, Fitted::Set(&sent_set));
        self.settle_capped(key, st, recorded, sends, &out.capped)?;
        st.pending -= &resend;
        Ok(out)
    }

    /// Records a capped claim's decisions in this ledger: the sends (`sent`, as a list, as
    /// runs where they were taken as runs, and fitted against the claimed set), already
    /// `recorded` in the send history, as claims; the `capped` ids as claimed and settled
    /// capped in one record.
    fn settle_capped<'h>(
        &self,
        key: &str,
        st: &mut State,
        recorded: impl Into<Option<Recorded<'h>>>,
        (sent, batch, fitted): (&[u32], Option<&Batch>, Fitted<'_>),
        capped: &[u32],
    ) -> Result<()> {
        if let Some(recorded) = recorded.into() {
            let written = match batch {
                Some(batch) => self.append_batch(key, st, Kind::Claim, sent, batch),
                None => self.append(key, st, Kind::Claim, sent),
            };
            if let Err(e) = written {
                recorded.must_replay();
                return Err(e);
            }
            fitted.apply_to(&mut st.sets, Kind::Claim, false);
        }
        if !capped.is_empty() {
            self.append(key, st, Kind::Capped, capped)?;
            st.sets.apply_all(Kind::Capped, &bitmap_of(capped));
        }
        Ok(())
    }

    /// Takes `ids` as claimed and in flight: sends a crash left in the send history's log
    /// and not in this ledger's (see [`super::history`]). Those not claimed yet are written.
    pub(super) fn adopt_sent(&self, key: &str, ids: &RoaringBitmap) -> Result<()> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let new = ids - &st.sets.claimed;
        if new.is_empty() {
            return Ok(());
        }
        let list: Vec<u32> = new.iter().collect();
        self.append(key, st, Kind::Claim, &list)?;
        st.sets.apply_all(Kind::Claim, &new);
        st.pending |= &new;
        Ok(())
    }

    /// Hands `ids` (all of this shard) out once more at their next claim, where they are
    /// claimed and not settled; see [`crate::store::Ledger::unclaim`]. Nothing is written:
    /// the log holds their claim, and a reopen hands them out again anyway.
    pub(super) fn unclaim(&self, ids: &[u32]) {
        let mut st = lock(&self.state);
        let open = &st.sets.claimed - &st.sets.done;
        let ids: RoaringBitmap = ids
            .iter()
            .copied()
            .filter(|&id| open.contains(id))
            .collect();
        st.pending |= ids;
    }

    /// Holds `ids` (all of this shard) for their quiet hours; see
    /// [`crate::store::Ledger::hold_quiet`].
    pub(super) fn hold_quiet(&self, key: &str, ids: &[u32]) -> Result<Claim> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let mut out = Claim {
            claimed: Vec::with_capacity(ids.len()),
            already: Vec::new(),
        };
        let mut seen = RoaringBitmap::new();
        for &id in ids {
            if st.sets.claimed.contains(id) || !seen.insert(id) {
                out.already.push(id);
            } else {
                out.claimed.push(id);
            }
        }
        let new = seen - &st.sets.quiet;
        if !new.is_empty() {
            let ids: Vec<u32> = new.iter().collect();
            self.append(key, st, Kind::Quiet, &ids)?;
            st.sets.apply_all(Kind::Quiet, &new);
        }
        Ok(out)
    }

    /// Records `ids` (all of this shard) as settled: done, or done with the outcome `kind`
    /// tags (dead, unreachable).
    pub(super) fn mark(&self, key: &str, kind: Kind, ids: &[u32]) -> Result<()> {
        let batch = Batch::of(ids);
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let settled = st.sets.tag(kind).unwrap_or(&st.sets.done);
        // None settled before (the common case): written as given, no difference built.
        if let Some((batch, fitted)) = batch.as_ref().and_then(|b| Some((b, b.fit(settled)?))) {
            self.append_batch(key, st, kind, ids, batch)?;
            fitted.apply_to(&mut st.sets, kind, true);
            if !st.pending.is_empty() {
                batch.remove_from(&mut st.pending);
            }
            return Ok(());
        }
        let batch = match batch {
            Some(batch) => batch.into_set(),
            None => ids.iter().copied().collect(),
        };
        let new = batch - settled;
        if new.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = new.iter().collect();
        self.append(key, st, kind, &ids)?;
        st.sets.apply_all(kind, &new);
        st.pending -= &new;
        Ok(())
    }

    /// Appends one record of `ids` with one write; on failure cuts the log back to its last
    /// whole record.
    fn append(&self, key: &str, st: &mut State, kind: Kind, ids: &[u32]) -> Result<()> {
        self.write(key, st, |buf| encode_record(buf, kind, ids))
    }

    /// [`Self::append`] of `ids` taken as `batch`: runs are written as they are, not looked
    /// for again.
    fn append_batch(
        &self,
        key: &str,
        st: &mut State,
        kind: Kind,
        ids: &[u32],
        batch: &Batch,
    ) -> Result<()> {
        match batch {
            Batch::Runs(runs) => self.write(key, st, |buf| encode_runs(buf, kind, runs)),
            Batch::Set(_) => self.append(key, st, kind, ids),
        }
    }

    /// Writes the record `encode` puts in the buffer (see [`Self::append`]).
    fn write(&self, key: &str, st: &mut State, encode: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        let Some(log) = st.log.as_mut() else {
            return Err(Error::runtime(format!("ledger {key} is open read-only")));
        };
        if st.broken {
            return Err(Error::runtime(format!(
                "ledger log {} is damaged by an earlier failed write; restart to repair it",
                self.log_path.display()
            )));
        }
        encode(&mut st.buf);
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

    /// Whether records were appended since the last sync.
    #[cfg(test)]
    pub(super) fn unsynced(&self) -> bool {
        self.unsynced.load(Ordering::Acquire)
    }

    /// Fsyncs the log if anything was appended since the last sync.
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
}
