//! The embedded store (`file:DIR`): one append-only log and one snapshot per ledger.
//!
//! ```text
//! DIR/LOCK                      exclusive lock (flock) while a writer has the store open
//! DIR/ledgers/<key>.log         records [len u32 LE][crc32 u32 LE][kind u8, ids u32 LE…]
//! DIR/ledgers/<key>.snap        "FANOUTS1", body len u64 LE, crc32 u32 LE, body:
//!                               claimed, done, dead as (len u64 LE, roaring bitmap)
//! ```
//! `<key>` is the ledger key with every byte outside `[A-Za-z0-9_-]` written `%XX`.
//!
//! Each record is written with one `write` on an append-mode file, so a claim survives a
//! process kill the moment [`FileLedger::claim`] returns; [`FileStore::sync`] adds machine-crash
//! durability. Opening loads the snapshot and replays the log over it; a torn or corrupt tail is
//! cut off. Every record is a set union, so replaying a log over a newer snapshot (a crash
//! inside a checkpoint) changes nothing.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{anyhow, Context};
use roaring::RoaringBitmap;

use super::{Claim, LedgerCounts};
use crate::error::{Error, Result};

/// A ledger whose log is bigger than this is checkpointed when opened.
const AUTO_CHECKPOINT_BYTES: u64 = 64 << 20;
/// First bytes of a snapshot; the digit is the format version.
const SNAP_MAGIC: &[u8; 8] = b"FANOUTS1";
/// Magic, body length, crc.
const SNAP_HEADER: usize = 8 + 8 + 4;
/// Length and crc in front of every log record.
const RECORD_HEADER: usize = 8;
/// Longest escaped key; keeps `<key>.snap.tmp` under the usual 255-byte name limit.
const MAX_STEM: usize = 200;

/// What a log record says about its ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Claim = 1,
    Done = 2,
    Dead = 3,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Claim),
            2 => Some(Kind::Done),
            3 => Some(Kind::Dead),
            _ => None,
        }
    }
}

/// The durable sets of one ledger (done ⊆ claimed, dead ⊆ done).
#[derive(Default, Debug, PartialEq)]
struct Sets {
    claimed: RoaringBitmap,
    done: RoaringBitmap,
    dead: RoaringBitmap,
}

impl Sets {
    /// Applies one record (replay) or one mark.
    fn apply(&mut self, kind: Kind, id: u32) {
        self.claimed.insert(id);
        if kind != Kind::Claim {
            self.done.insert(id);
        }
        if kind == Kind::Dead {
            self.dead.insert(id);
        }
    }

    fn encode(&self) -> Result<Vec<u8>> {
        let maps = [&self.claimed, &self.done, &self.dead];
        let body_len: usize = maps.iter().map(|m| 8 + m.serialized_size()).sum();
        let mut out = Vec::with_capacity(SNAP_HEADER + body_len);
        out.extend_from_slice(SNAP_MAGIC);
        out.extend_from_slice(&(body_len as u64).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for map in maps {
            out.extend_from_slice(&(map.serialized_size() as u64).to_le_bytes());
            map.serialize_into(&mut out)
                .context("cannot serialize a ledger snapshot")?;
        }
        let crc = crc32fast::hash(&out[SNAP_HEADER..]);
        out[16..20].copy_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> std::result::Result<Sets, String> {
        if bytes.len() < SNAP_HEADER || &bytes[..8] != SNAP_MAGIC {
            return Err("not a fanout ledger snapshot (bad header)".into());
        }
        let body = &bytes[SNAP_HEADER..];
        if u64_at(bytes, 8) != body.len() as u64 {
            return Err("truncated (length mismatch)".into());
        }
        if u32_at(bytes, 16) != crc32fast::hash(body) {
            return Err("checksum mismatch".into());
        }
        let mut rest = body;
        let mut maps = Vec::with_capacity(3);
        for _ in 0..3 {
            if rest.len() < 8 {
                return Err("truncated bitmap".into());
            }
            let len = usize::try_from(u64_at(rest, 0)).unwrap_or(usize::MAX);
            rest = &rest[8..];
            if len > rest.len() {
                return Err("truncated bitmap".into());
            }
            let map = RoaringBitmap::deserialize_from(&rest[..len]).map_err(|e| e.to_string())?;
            maps.push(map);
            rest = &rest[len..];
        }
        if !rest.is_empty() {
            return Err("trailing bytes after the bitmaps".into());
        }
        let dead = maps.pop().unwrap_or_default();
        let done = maps.pop().unwrap_or_default();
        let claimed = maps.pop().unwrap_or_default();
        Ok(Sets {
            claimed,
            done,
            dead,
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Fills `buf` with one log record of `kind` for `ids`.
fn encode_record(buf: &mut Vec<u8>, kind: Kind, ids: impl ExactSizeIterator<Item = u32>) {
    buf.clear();
    buf.reserve(RECORD_HEADER + 1 + 4 * ids.len());
    buf.extend_from_slice(&[0; RECORD_HEADER]);
    buf.push(kind as u8);
    for id in ids {
        buf.extend_from_slice(&id.to_le_bytes());
    }
    let len = (buf.len() - RECORD_HEADER) as u32;
    let crc = crc32fast::hash(&buf[RECORD_HEADER..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Replays the log at `path` into `sets`; returns (bytes of whole good records, file length).
fn replay(path: &Path, sets: &mut Sets) -> Result<(u64, u64)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(io_error(e, "cannot open", path)),
    };
    let file_len = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut good = 0u64;
    let mut header = [0u8; RECORD_HEADER];
    let mut payload = Vec::new();
    loop {
        if !read_full(&mut reader, &mut header, path)? {
            break;
        }
        let len = u32_at(&header, 0) as u64;
        let sane = len >= 1 && (len - 1).is_multiple_of(4);
        if !sane || good + RECORD_HEADER as u64 + len > file_len {
            break;
        }
        payload.resize(len as usize, 0);
        if !read_full(&mut reader, &mut payload, path)? {
            break;
        }
        let Some(kind) = Kind::from_byte(payload[0]) else {
            break;
        };
        if crc32fast::hash(&payload) != u32_at(&header, 4) {
            break;
        }
        for id in payload[1..].chunks_exact(4) {
            sets.apply(kind, u32_at(id, 0));
        }
        good += RECORD_HEADER as u64 + len;
    }
    Ok((good, file_len))
}

/// Fills `buf`; false when the file ends first.
fn read_full(reader: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_error(e, "cannot read", path)),
    }
}

/// Loads a ledger's sets: the log is read before the snapshot, so a reader racing a writer's
/// checkpoint sees either the old snapshot with the old log or the new snapshot (which holds
/// everything the old log did). Returns the sets, the good log length and the log's length.
fn load(snap_path: &Path, log_path: &Path) -> Result<(Sets, u64, u64)> {
    let mut from_log = Sets::default();
    let (good, file_len) = replay(log_path, &mut from_log)?;
    let mut sets = load_snapshot(snap_path)?;
    sets.claimed |= from_log.claimed;
    sets.done |= from_log.done;
    sets.dead |= from_log.dead;
    Ok((sets, good, file_len))
}

/// Loads the snapshot at `path`, if any.
fn load_snapshot(path: &Path) -> Result<Sets> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Sets::default()),
        Err(e) => return Err(io_error(e, "cannot read", path)),
    };
    Sets::decode(&bytes).map_err(|why| {
        Error::runtime(format!(
            "ledger snapshot {} is corrupt: {why}",
            path.display()
        ))
    })
}

/// The file name stem of a ledger key: reversible, safe on every file system.
fn file_stem(key: &str) -> Result<String> {
    let mut stem = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            stem.push(char::from(b));
        } else {
            stem.push_str(&format!("%{b:02X}"));
        }
    }
    if stem.is_empty() || stem.len() > MAX_STEM {
        return Err(Error::Usage(format!(
            "ledger key `{key}` must be 1 to {MAX_STEM} bytes once escaped"
        )));
    }
    Ok(stem)
}

/// A runtime error for a failed I/O call on `path`.
fn io_error(e: io::Error, what: &str, path: &Path) -> Error {
    Error::Runtime(anyhow!(e).context(format!("{what} {}", path.display())))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))?;
    Ok(())
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
    /// A ledger whose log is longer than this when opened is checkpointed right away.
    auto_checkpoint_bytes: u64,
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
            auto_checkpoint_bytes: AUTO_CHECKPOINT_BYTES,
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
            auto_checkpoint_bytes: AUTO_CHECKPOINT_BYTES,
        })
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
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
        )?);
        open.insert(key.to_owned(), Arc::clone(&ledger));
        Ok(ledger)
    }

    fn open_ledgers(&self) -> Vec<Arc<FileLedger>> {
        lock(&self.open).values().cloned().collect()
    }

    /// Fsyncs the log of every ledger written since the last sync.
    pub fn sync(&self) -> Result<()> {
        for ledger in self.open_ledgers() {
            ledger.sync()?;
        }
        Ok(())
    }

    /// Folds every open ledger's log into its snapshot.
    pub fn checkpoint(&self) -> Result<()> {
        for ledger in self.open_ledgers() {
            ledger.checkpoint()?;
        }
        Ok(())
    }

    /// Every claimed id of `key`, sorted; empty if the ledger doesn't exist.
    pub fn granted(&self, key: &str) -> Result<Vec<u32>> {
        if let Some(ledger) = lock(&self.open).get(key) {
            return Ok(lock(&ledger.state).sets.claimed.iter().collect());
        }
        // Not open here: read the files as they are, without opening (or creating) the ledger.
        let stem = file_stem(key)?;
        let (sets, _, _) = load(
            &self.ledgers_dir.join(format!("{stem}.snap")),
            &self.ledgers_dir.join(format!("{stem}.log")),
        )?;
        Ok(sets.claimed.iter().collect())
    }
}

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
    state: Mutex<State>,
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

/// `ids` as a bitmap, if they are strictly ascending (no repeats).
fn ascending_bitmap(ids: &[u32]) -> Option<RoaringBitmap> {
    if ids.windows(2).all(|w| w[0] < w[1]) {
        RoaringBitmap::from_sorted_iter(ids.iter().copied()).ok()
    } else {
        None
    }
}

struct State {
    sets: Sets,
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
    fn open(
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
                    "torn or corrupt tail in a ledger log; truncating to the last good record"
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

    /// The atomic claim; see [`super::Ledger::claim`].
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

    fn sync(&self) -> Result<()> {
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
    fn checkpoint(&self) -> Result<()> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let Some(log) = st.log.as_mut() else {
            return Ok(());
        };
        if st.log_len == 0 {
            return Ok(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> FileStore {
        let url = format!("file:{}", dir.display());
        FileStore::open(&url, &dir.to_string_lossy()).expect("open store")
    }

    fn log_of(dir: &Path, key: &str) -> PathBuf {
        dir.join("ledgers")
            .join(format!("{}.log", file_stem(key).expect("stem")))
    }

    fn snap_of(dir: &Path, key: &str) -> PathBuf {
        log_of(dir, key).with_extension("snap")
    }

    fn sets_of(ledger: &FileLedger) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let st = lock(&ledger.state);
        (
            st.sets.claimed.iter().collect(),
            st.sets.done.iter().collect(),
            st.sets.dead.iter().collect(),
        )
    }

    fn unescape(stem: &str) -> String {
        let bytes = stem.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex");
                out.push(u8::from_str_radix(hex, 16).expect("hex"));
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn keys_escape_reversibly_to_safe_names() {
        let keys = [
            "spring-sale-2026",
            "hot-1:2026-03-02T10:00:00+00:00",
            "a%3Ab",
            "a:b",
            "../etc/passwd",
            "ünï code",
        ];
        let mut stems = std::collections::HashSet::new();
        for key in keys {
            let stem = file_stem(key).expect("stem");
            assert!(stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b)));
            assert_eq!(unescape(&stem), key);
            assert!(stems.insert(stem));
        }
        assert_eq!(
            file_stem("spring-sale-2026").expect("stem"),
            "spring-sale-2026"
        );
        assert!(matches!(file_stem(""), Err(Error::Usage(_))));
        assert!(matches!(file_stem(&"x".repeat(201)), Err(Error::Usage(_))));
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let store = open(tmp.path());
            let ledger = store.ledger("k").expect("ledger");
            ledger.claim(&[1, 2, 3]).expect("claim");
            ledger.mark_done(&[1]).expect("done");
            ledger.claim(&[4, 5]).expect("claim");
        }
        let log = log_of(tmp.path(), "k");
        let full = fs::read(&log).expect("read log");
        let last_record = RECORD_HEADER + 1 + 2 * 4;
        let cut = full.len() - last_record / 2;
        let mut garbage = full.clone();
        garbage.extend_from_slice(&[0xFF, 0x00, 0x00, 0x00, 7, 7]);
        let mut bad_crc = full.clone();
        let n = bad_crc.len();
        bad_crc[n - 1] ^= 0x55;
        let cases = [
            (garbage, full.len(), vec![1, 2, 3, 4, 5]),
            (
                full[..cut].to_vec(),
                full.len() - last_record,
                vec![1, 2, 3],
            ),
            (bad_crc, full.len() - last_record, vec![1, 2, 3]),
        ];
        for (bytes, good_len, claimed) in cases {
            fs::write(&log, &bytes).expect("write log");
            let store = open(tmp.path());
            let ledger = store.ledger("k").expect("ledger");
            assert_eq!(fs::metadata(&log).expect("stat").len(), good_len as u64);
            assert_eq!(sets_of(&ledger), (claimed.clone(), vec![1], vec![]));
            // Appends after the cut are readable on the next open.
            ledger.claim(&[9]).expect("claim");
            drop((ledger, store));
            let store = open(tmp.path());
            let (claimed_now, _, _) = sets_of(&store.ledger("k").expect("ledger"));
            assert!(claimed_now.contains(&9));
            drop(store);
            fs::write(&log, &full).expect("restore log");
        }
    }

    #[test]
    fn replaying_an_old_log_over_a_new_snapshot_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = open(tmp.path());
        let ledger = store.ledger("k").expect("ledger");
        ledger.claim(&[10, 20, 30]).expect("claim");
        ledger.mark_dead(&[20]).expect("dead");
        let before = sets_of(&ledger);
        let old_log = fs::read(log_of(tmp.path(), "k")).expect("read log");
        store.checkpoint().expect("checkpoint");
        assert_eq!(
            fs::metadata(log_of(tmp.path(), "k")).expect("stat").len(),
            0
        );
        drop((ledger, store));
        // A crash between the snapshot's rename and the log's truncation.
        fs::write(log_of(tmp.path(), "k"), old_log).expect("write log");
        let store = open(tmp.path());
        assert_eq!(sets_of(&store.ledger("k").expect("ledger")), before);
    }

    #[test]
    fn corrupt_snapshot_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = open(tmp.path());
        store
            .ledger("k")
            .expect("ledger")
            .claim(&[1])
            .expect("claim");
        store.checkpoint().expect("checkpoint");
        drop(store);
        let snap = snap_of(tmp.path(), "k");
        let mut bytes = fs::read(&snap).expect("read snap");
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        fs::write(&snap, bytes).expect("write snap");
        let err = open(tmp.path()).ledger("k").expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn lock_excludes_a_second_writer_until_every_handle_is_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_string_lossy().into_owned();
        let first = FileStore::open("file:x", &dir).expect("first open");
        let err = FileStore::open("file:x", &dir).expect_err("second open");
        assert_eq!(
            err.to_string(),
            "store file:x is in use by another fanout process"
        );
        assert!(matches!(err, Error::Runtime(_)));
        // A reader needs no lock.
        FileStore::open_read_only("file:x", &dir).expect("read-only open");
        let ledger = first.ledger("k").expect("ledger");
        drop(first);
        assert!(
            FileStore::open("file:x", &dir).is_err(),
            "a ledger keeps the lock"
        );
        drop(ledger);
        FileStore::open("file:x", &dir).expect("reopen after drop");
    }

    #[test]
    fn a_million_sequential_claims_make_a_small_snapshot() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = open(tmp.path());
        let ledger = store.ledger("big").expect("ledger");
        let ids: Vec<u32> = (0..1_000_000).collect();
        for batch in ids.chunks(1000) {
            assert_eq!(ledger.claim(batch).expect("claim").claimed.len(), 1000);
        }
        ledger.mark_done(&ids[..500_000]).expect("done");
        store.checkpoint().expect("checkpoint");
        let size = fs::metadata(snap_of(tmp.path(), "big"))
            .expect("stat")
            .len();
        assert!(size < 1 << 20, "snapshot is {size} bytes");
        drop((ledger, store));
        let store = open(tmp.path());
        let ledger = store.ledger("big").expect("ledger");
        assert_eq!(
            ledger.counts(),
            LedgerCounts {
                claimed: 1_000_000,
                done: 500_000,
                dead: 0
            }
        );
    }

    #[test]
    fn a_long_log_is_checkpointed_on_open() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let store = open(tmp.path());
            let ledger = store.ledger("k").expect("ledger");
            for id in 0..100 {
                ledger.claim(&[id]).expect("claim");
            }
        }
        let mut store = open(tmp.path());
        store.auto_checkpoint_bytes = 100;
        let ledger = store.ledger("k").expect("ledger");
        assert_eq!(
            fs::metadata(log_of(tmp.path(), "k")).expect("stat").len(),
            0
        );
        assert!(snap_of(tmp.path(), "k").exists());
        assert_eq!(ledger.counts().claimed, 100);
    }

    #[test]
    fn read_only_store_reads_without_writing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("nothing-here");
        let ro = FileStore::open_read_only("file:n", &missing.to_string_lossy()).expect("ro");
        assert!(ro.granted("k").expect("granted").is_empty());
        let empty = ro.ledger("k").expect("ledger");
        assert!(!empty.is_done(1));
        assert!(empty.claim(&[1]).is_err());
        assert!(!missing.exists(), "read-only open created files");

        let writer = open(tmp.path());
        let ledger = writer.ledger("k").expect("ledger");
        ledger.claim(&[5, 3, 4]).expect("claim");
        ledger.mark_done(&[3]).expect("done");
        // A torn tail is ignored by a reader and left for the writer to repair.
        let log = log_of(tmp.path(), "k");
        let mut bytes = fs::read(&log).expect("read log");
        bytes.extend_from_slice(&[1, 2, 3]);
        fs::write(&log, &bytes).expect("write log");
        let ro = FileStore::open_read_only("file:w", &tmp.path().to_string_lossy()).expect("ro");
        assert_eq!(ro.granted("k").expect("granted"), vec![3, 4, 5]);
        assert!(ro.ledger("k").expect("ledger").is_done(3));
        assert_eq!(fs::read(&log).expect("read log"), bytes);
        ro.sync().expect("sync");
        ro.checkpoint().expect("checkpoint");
        assert!(!snap_of(tmp.path(), "k").exists());
    }
}
