//! The embedded store's send history (frequency caps, [`crate::history`]): every user's
//! [`History`] in memory, in pages of consecutive ids, and on disk as:
//!
//! ```text
//! DIR/history/sendtimes         the send-time table: "FANOUTT1", era u32, horizon i64, then
//!                               4096 × i64 LE (unix seconds by slot, 0 free), crc32 u32 LE
//! DIR/history/history.snap      "FANOUTH1", covered log generation u64, page count u64, per
//!                               page: page number u32, 65536 × u64 LE histories; crc32 u32 LE
//! DIR/history/sent.<gen>.log    records [len u32][crc32 u32][slot u16][key len u16][key]
//!                               [ids]: sends recorded since the snapshot ([`log`]: the ids
//!                               as runs of consecutive ids, or four bytes each)
//! ```
//! A capped claim writes its `sent` record *before* the ledger's own claim record: the `sent`
//! log is the write-ahead record of the send. A crash between the two leaves a send the
//! ledger does not know; opening the store replays the log and hands those ids to their
//! ledger as claimed (in flight at the crash, so the next run sends them once — the send was
//! already counted). Replaying a record twice would count a send twice, so logs are numbered:
//! the snapshot names the generation it covers, and older logs are ignored, then removed.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use anyhow::Context;
use roaring::RoaringBitmap;

mod log;

use log::{encode, read_log, Sent};

use super::runs::{ids_in, runs_in};
use super::{io_error, lock};
use crate::error::{Error, Result};
use crate::history::{History, SendTimes, Window, SLOTS};

/// Ids per page.
const PAGE: usize = 1 << 16;

/// Histories in pages of [`PAGE`] ids, indexed by page number (`id >> 16`): no hashing per id.
#[derive(Default)]
struct PageTable(Vec<Option<Box<[u64]>>>);

impl PageTable {
    fn slot(&mut self, n: u32) -> &mut Option<Box<[u64]>> {
        let n = n as usize;
        if self.0.len() <= n {
            self.0.resize_with(n + 1, || None);
        }
        &mut self.0[n]
    }

    fn get(&self, id: u32) -> u64 {
        self.page(id >> 16)
            .map_or(0, |page| page[id as usize & (PAGE - 1)])
    }

    /// Page `n`, if any history in it has a send.
    fn page(&self, n: u32) -> Option<&[u64]> {
        self.0.get(n as usize)?.as_deref()
    }

    /// Adds a send at `slot` to the history of each id of `runs`, a run's ids within one page
    /// at a time. A history with no send yet — every one in a first run — becomes the same
    /// word, computed once, and a run of such histories is filled with it.
    fn add_sends(&mut self, table: &SendTimes, slot: u16, runs: &[RangeInclusive<u32>]) {
        let first = History::default().with_send(table, slot).0;
        for run in in_pages(runs) {
            let page = self
                .slot(run.start() >> 16)
                .get_or_insert_with(written_zeros);
            let words = &mut page[words_of(&run)];
            if words.iter().all(|&h| h == 0) {
                words.fill(first);
                continue;
            }
            for h in words {
                *h = match *h {
                    0 => first,
                    sent => History(sent).with_send(table, slot).0,
                };
            }
        }
    }

    /// The pages in use, by number.
    fn pages(&self) -> impl Iterator<Item = (u32, &[u64])> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(n, p)| p.as_deref().map(|p| (n as u32, p)))
    }
}

/// `runs` cut where they cross from one page to the next.
fn in_pages(runs: &[RangeInclusive<u32>]) -> impl Iterator<Item = RangeInclusive<u32>> + '_ {
    runs.iter().flat_map(|run| {
        let (mut next, end) = ((!run.is_empty()).then_some(*run.start()), *run.end());
        std::iter::from_fn(move || {
            let start = next?;
            let stop = end.min(start | (PAGE as u32 - 1));
            next = stop.checked_add(1).filter(|&n| n <= end);
            Some(start..=stop)
        })
    })
}

/// The positions in its page of a run of [`in_pages`].
fn words_of(run: &RangeInclusive<u32>) -> std::ops::Range<usize> {
    let (start, end) = (*run.start() as usize, *run.end() as usize);
    start & (PAGE - 1)..(end & (PAGE - 1)) + 1
}

/// A page of empty histories, its zeros written. `vec![0; PAGE]` would take the system's
/// untouched zero pages: each history is read before its send is added, which maps the
/// shared zero page, and each first write then replaced it with a flush of every core's TLB
/// (an interrupt to the other worker's core per 4 KiB: an eighth of the policy benchmark's
/// time, where the written zeros cost a memset). The zero is hidden from the compiler, which
/// would otherwise turn the allocation and its fill back into one `calloc`.
fn written_zeros() -> Box<[u64]> {
    let mut page = Vec::with_capacity(PAGE);
    page.resize(PAGE, std::hint::black_box(0));
    page.into_boxed_slice()
}

const TABLE_MAGIC: &[u8; 8] = b"FANOUTT1";
const SNAP_MAGIC: &[u8; 8] = b"FANOUTH1";

/// The send histories of a writable embedded store.
pub struct SendHistory {
    dir: PathBuf,
    state: Mutex<State>,
    /// Sends recorded here whose ledger claim is not written yet ([`Recorded`]): the lock is
    /// not held across the ledger's write (the workers' claims would queue on it), so the
    /// log is not folded into a snapshot while any is, as a crash before their claims must
    /// find them in the log.
    unclaimed: AtomicUsize,
}

/// Sends recorded in the history whose ledger claim is being written; the log is not folded
/// while this lives.
pub struct Recorded<'a>(&'a SendHistory);

impl Recorded<'_> {
    /// The ledger's claim of these sends failed: the log must be replayed at the next open.
    pub fn must_replay(self) {
        self.0.lock().must_replay = true;
    }
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        self.0.unclaimed.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Everything behind the lock.
pub struct State {
    /// The send-time table.
    pub table: SendTimes,
    pages: PageTable,
    log: File,
    log_path: PathBuf,
    /// The generation of the log being appended to.
    gen: u64,
    /// Sends replayed from the logs and not yet handed to their ledgers, by ledger key.
    unreconciled: BTreeMap<String, RoaringBitmap>,
    /// A `sent` record was written and its ledger's record failed: the log must be replayed
    /// at the next open, so it is not folded into a snapshot.
    must_replay: bool,
    /// Sends in the logs after the snapshot: what the next open replays.
    logged: u64,
    buf: Vec<u8>,
}

impl State {
    /// The history of `id`.
    pub fn get(&self, id: u32) -> History {
        History(self.pages.get(id))
    }

    /// The ids of `runs` whose history refuses a send at `t` under `caps`, in order: none in
    /// a first run, where every history is empty.
    pub fn refused(&self, runs: &[RangeInclusive<u32>], t: i64, caps: &[Window]) -> Vec<u32> {
        // An empty history's answer is every one's: asked once, and a page not yet made
        // holds only empty ones.
        let empty_admits = History::default().admits(&self.table, t, caps);
        let mut refused = Vec::new();
        for run in in_pages(runs) {
            let Some(page) = self.pages.page(run.start() >> 16) else {
                if !empty_admits {
                    refused.extend(run);
                }
                continue;
            };
            let words = &page[words_of(&run)];
            if empty_admits && words.iter().all(|&h| h == 0) {
                continue;
            }
            refused.extend((run.zip(words)).filter_map(|(id, &h)| {
                let admits = match h {
                    0 => empty_admits,
                    sent => History(sent).admits(&self.table, t, caps),
                };
                (!admits).then_some(id)
            }));
        }
        refused
    }

    /// Records sends at `slot` to the ids of `runs` of ledger `key`: the write-ahead record
    /// first, then each history.
    pub fn record(&mut self, key: &str, slot: u16, runs: &[RangeInclusive<u32>]) -> Result<()> {
        encode(&mut self.buf, key, slot, runs)?;
        if let Err(e) = self.log.write_all(&self.buf) {
            // What reached the file is either a torn tail or a whole record the next open
            // replays; either way this run stops.
            self.must_replay = true;
            return Err(io_error(e, "cannot append to", &self.log_path));
        }
        self.logged += ids_in(runs);
        self.pages.add_sends(&self.table, slot, runs);
        Ok(())
    }
}

/// The `sent` records of the log at `path` (in `dir`), each naming a slot `table` holds, and
/// the bytes they fill.
fn replay_log(path: &Path, dir: &Path, table: &SendTimes) -> Result<(Vec<Sent>, u64)> {
    let (records, good) = read_log(path)?;
    if let Some(bad) = records.iter().find(|r| table.time(r.slot).is_none()) {
        return Err(Error::runtime(format!(
            "{} names send-time slot {} that {} does not hold",
            path.display(),
            bad.slot,
            dir.join("sendtimes").display()
        )));
    }
    Ok((records, good))
}

/// Writes `bytes` to `path` through a temporary file, durably.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads a file that ends in a crc32 of the rest, after `magic`; `None` if it is missing.
fn read_checked(path: &Path, magic: &[u8; 8]) -> Result<Option<Vec<u8>>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(e, "cannot read", path)),
    };
    let corrupt = || Error::runtime(format!("{} is corrupt", path.display()));
    if bytes.len() < 12 || &bytes[..8] != magic {
        return Err(corrupt());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt());
    }
    Ok(Some(body[8..].to_vec()))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn load_table(path: &Path) -> Result<SendTimes> {
    let Some(body) = read_checked(path, TABLE_MAGIC)? else {
        return Ok(SendTimes::default());
    };
    let corrupt = || Error::runtime(format!("{} is corrupt", path.display()));
    if body.len() != 4 + 8 + 8 * SLOTS {
        return Err(corrupt());
    }
    let era = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
    let horizon = u64_at(&body, 4).ok_or_else(corrupt)? as i64;
    let times = (0..SLOTS)
        .map(|s| u64_at(&body, 12 + 8 * s).map(|t| t as i64))
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(corrupt)?;
    SendTimes::from_parts(times, era, horizon).ok_or_else(corrupt)
}

fn encode_table(table: &SendTimes) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 12 + 8 * SLOTS + 4);
    out.extend_from_slice(TABLE_MAGIC);
    out.extend_from_slice(&table.era().to_le_bytes());
    out.extend_from_slice(&table.horizon_s().to_le_bytes());
    for t in table.times() {
        out.extend_from_slice(&t.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The pages of a snapshot and the log generation it covers.
fn load_snapshot(path: &Path) -> Result<(u64, PageTable)> {
    let Some(body) = read_checked(path, SNAP_MAGIC)? else {
        return Ok((0, PageTable::default()));
    };
    let corrupt = || Error::runtime(format!("{} is corrupt", path.display()));
    let gen = u64_at(&body, 0).ok_or_else(corrupt)?;
    let count = u64_at(&body, 8).ok_or_else(corrupt)?;
    let mut pages = PageTable::default();
    let mut at = 16;
    for _ in 0..count {
        let page = body.get(at..at + 4).ok_or_else(corrupt)?;
        let page = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
        let words = body.get(at + 4..at + 4 + 8 * PAGE).ok_or_else(corrupt)?;
        let words: Box<[u64]> = words
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        *pages.slot(page) = Some(words);
        at += 4 + 8 * PAGE;
    }
    if at != body.len() {
        return Err(corrupt());
    }
    Ok((gen, pages))
}

/// `sent.<gen>.log` files in `dir`, by generation.
fn logs(dir: &Path) -> Result<BTreeMap<u64, PathBuf>> {
    let mut out = BTreeMap::new();
    let entries = fs::read_dir(dir).map_err(|e| io_error(e, "cannot list", dir))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(e, "cannot list", dir))?;
        let name = entry.file_name();
        let Some(gen) = name
            .to_str()
            .and_then(|n| n.strip_prefix("sent."))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.insert(gen, entry.path());
    }
    Ok(out)
}

fn open_log(path: &Path, good: u64) -> Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    if good < len {
        file.set_len(good)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot truncate {}", path.display()))?;
    }
    Ok(file)
}

/// A store's send histories as its files hold them, read without the store's lock (for
/// `fanout plan`): the table, and every history of the snapshot with the logs after it.
pub struct Snapshot {
    /// The send-time table.
    pub table: SendTimes,
    pages: PageTable,
}

impl Snapshot {
    /// Reads the histories under `store_dir/history` (none if missing).
    pub fn read(store_dir: &Path) -> Result<Snapshot> {
        let dir = store_dir.join("history");
        if !dir.exists() {
            return Ok(Snapshot {
                table: SendTimes::default(),
                pages: PageTable::default(),
            });
        }
        let table = load_table(&dir.join("sendtimes"))?;
        let (covered, mut pages) = load_snapshot(&dir.join("history.snap"))?;
        for path in logs(&dir)?.range(covered + 1..).map(|(_, p)| p) {
            for sent in replay_log(path, &dir, &table)?.0 {
                pages.add_sends(&table, sent.slot, &runs_in(&sent.ids));
            }
        }
        Ok(Snapshot { table, pages })
    }

    /// The history of `id`.
    pub fn get(&self, id: u32) -> History {
        History(self.pages.get(id))
    }
}

impl SendHistory {
    /// Opens (creating) the histories under `store_dir/history`: the table, the snapshot, and
    /// the logs after it replayed.
    pub fn open(store_dir: &Path) -> Result<SendHistory> {
        let dir = store_dir.join("history");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let table = load_table(&dir.join("sendtimes"))?;
        let (covered, pages) = load_snapshot(&dir.join("history.snap"))?;
        let found = logs(&dir)?;
        let mut state = State {
            table,
            pages,
            log: open_log(&dir.join(format!("sent.{}.log", covered + 1)), u64::MAX)?,
            log_path: dir.join(format!("sent.{}.log", covered + 1)),
            gen: covered + 1,
            unreconciled: BTreeMap::new(),
            must_replay: false,
            logged: 0,
            buf: Vec::new(),
        };
        for (&gen, path) in found.range(covered + 1..) {
            let (records, good) = replay_log(path, &dir, &state.table)?;
            for sent in records {
                state.logged += sent.ids.len() as u64;
                state
                    .pages
                    .add_sends(&state.table, sent.slot, &runs_in(&sent.ids));
                state
                    .unreconciled
                    .entry(sent.key)
                    .or_default()
                    .extend(sent.ids);
            }
            state.log = open_log(path, good)?;
            state.log_path = path.clone();
            state.gen = gen;
        }
        Ok(SendHistory {
            dir,
            state: Mutex::new(state),
            unclaimed: AtomicUsize::new(0),
        })
    }

    /// The state, locked.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The state, locked for a capped claim at `at`: an error if the table no longer holds
    /// the run's send time in its slot.
    pub fn lock_at(&self, at: crate::store::SendAt) -> Result<MutexGuard<'_, State>> {
        let st = self.lock();
        if st.table.time(at.slot) != Some(at.t) {
            return Err(Error::runtime(format!(
                "send-time slot {} no longer holds the run's send time {}",
                at.slot, at.t
            )));
        }
        Ok(st)
    }

    /// [`State::record`] under `st` (this history's lock), with a guard that keeps the log
    /// from being folded until the ledger's claim of the same sends is written.
    pub fn record(
        &self,
        st: &mut State,
        key: &str,
        slot: u16,
        runs: &[RangeInclusive<u32>],
    ) -> Result<Recorded<'_>> {
        st.record(key, slot, runs)?;
        self.unclaimed.fetch_add(1, Ordering::AcqRel);
        Ok(Recorded(self))
    }

    /// See [`crate::store::Store::send_slot`]: the table is durable before the slot is used.
    pub fn send_slot(&self, t: i64, horizon_s: i64) -> Result<u16> {
        let mut st = self.lock();
        let before = st.table.clone();
        let slot = st.table.alloc(t, horizon_s).map_err(Error::runtime)?;
        if st.table != before {
            if let Err(e) = write_atomic(
                &self.dir,
                &self.dir.join("sendtimes"),
                &encode_table(&st.table),
            ) {
                st.table = before;
                return Err(e);
            }
        }
        Ok(slot)
    }

    /// Sends of ledger `key` replayed from the logs and not yet handed to it (taken out).
    pub fn take_unreconciled(&self, key: &str) -> Option<RoaringBitmap> {
        self.lock().unreconciled.remove(key)
    }

    /// The keys with sends not yet handed to their ledgers.
    pub fn unreconciled_keys(&self) -> Vec<String> {
        self.lock().unreconciled.keys().cloned().collect()
    }

    /// Folds the log into a new snapshot and starts the next generation, once the logs hold
    /// as many sends as `min_log_bytes` of four-byte ids would (a snapshot writes every page:
    /// 80 MB for 10M users, while replaying the logs at open updates a history per send, however
    /// few bytes its runs take) — unless sends are still to be handed to their ledgers, are
    /// being claimed in them, or a ledger record after a `sent` one failed.
    pub fn checkpoint(&self, min_log_bytes: u64) -> Result<()> {
        let mut st = self.lock();
        if st.must_replay
            || !st.unreconciled.is_empty()
            || self.unclaimed.load(Ordering::Acquire) > 0
        {
            return Ok(());
        }
        if st.logged == 0 || st.logged.saturating_mul(4) < min_log_bytes {
            return Ok(());
        }
        let pages: Vec<(u32, &[u64])> = st.pages.pages().collect();
        let mut out = Vec::with_capacity(8 + 16 + pages.len() * (4 + 8 * PAGE) + 4);
        out.extend_from_slice(SNAP_MAGIC);
        out.extend_from_slice(&st.gen.to_le_bytes());
        out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        for (n, words) in pages {
            out.extend_from_slice(&n.to_le_bytes());
            for w in words.iter() {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        write_atomic(&self.dir, &self.dir.join("history.snap"), &out)?;
        for (_, path) in logs(&self.dir)?.range(..=st.gen) {
            fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        st.gen += 1;
        st.log_path = self.dir.join(format!("sent.{}.log", st.gen));
        st.log = open_log(&st.log_path, u64::MAX)?;
        st.logged = 0;
        Ok(())
    }

    /// Fsyncs the log.
    pub fn sync(&self) -> Result<()> {
        let st = self.lock();
        st.log
            .sync_data()
            .map_err(|e| io_error(e, "cannot fsync", &st.log_path))
    }
}

/// A store's [`SendHistory`], opened when the store is (if it has one) or at its first capped
/// claim; shared by the store and its ledgers.
#[derive(Debug)]
pub struct Histories {
    store_dir: PathBuf,
    writable: bool,
    opened: Mutex<Option<std::sync::Arc<SendHistory>>>,
}

impl std::fmt::Debug for SendHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendHistory")
            .field("dir", &self.dir)
            .finish()
    }
}

impl Histories {
    /// The histories of the store in `store_dir`, opened now if it has any.
    pub fn open(store_dir: &Path) -> Result<Histories> {
        let opened = match store_dir.join("history").exists() {
            true => Some(std::sync::Arc::new(SendHistory::open(store_dir)?)),
            false => None,
        };
        Ok(Histories {
            store_dir: store_dir.to_owned(),
            writable: true,
            opened: Mutex::new(opened),
        })
    }

    /// A read-only store's: none.
    pub fn none(store_dir: &Path) -> Histories {
        Histories {
            store_dir: store_dir.to_owned(),
            writable: false,
            opened: Mutex::new(None),
        }
    }

    /// The histories, opened (created) if need be.
    pub fn get(&self) -> Result<std::sync::Arc<SendHistory>> {
        let mut opened = lock(&self.opened);
        if let Some(h) = opened.as_ref() {
            return Ok(h.clone());
        }
        if !self.writable {
            return Err(Error::runtime(format!(
                "store {} is open read-only",
                self.store_dir.display()
            )));
        }
        let h = std::sync::Arc::new(SendHistory::open(&self.store_dir)?);
        *opened = Some(h.clone());
        Ok(h)
    }

    /// The histories if open.
    pub fn existing(&self) -> Option<std::sync::Arc<SendHistory>> {
        lock(&self.opened).clone()
    }
}
