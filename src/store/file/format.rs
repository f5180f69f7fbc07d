//! The bytes on disk (laid out in [the module docs](super)): log records and their replay,
//! snapshots, and the file names ledger keys map to.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::Context;
use roaring::RoaringBitmap;

use super::io_error;
use super::runs::run_of;
use crate::error::{Error, Result};

/// First bytes of a snapshot; the digit is the format version. Version 2 added the
/// unreachable, held-out and quiet sets after the three of version 1, version 3 the capped
/// set, version 4 the cancelled set; every earlier version is still read.
const SNAP_MAGIC: &[u8; 8] = b"FANOUTS4";
const SNAP_MAGIC_V3: &[u8; 8] = b"FANOUTS3";
const SNAP_MAGIC_V2: &[u8; 8] = b"FANOUTS2";
const SNAP_MAGIC_V1: &[u8; 8] = b"FANOUTS1";
/// Magic, body length, crc.
const SNAP_HEADER: usize = 8 + 8 + 4;
/// Length and crc in front of every log record.
pub(super) const RECORD_HEADER: usize = 8;
/// Longest escaped key; keeps `<key>.snap.tmp` under the usual 255-byte name limit.
const MAX_STEM: usize = 200;

/// What a log record says about its ids. Every kind but `Claim` and `Quiet` settles them
/// (done), and `Dead`, `Unreachable`, `HeldOut`, `Capped` and `Cancelled` also tag their
/// outcome; a `HeldOut`, `Capped` or `Cancelled` record is a claim and its settlement in one,
/// so no crash can leave such a user to be sent.
/// `Quiet` claims nothing: it records users held for their quiet hours, who stay claimable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Claim = 1,
    Done = 2,
    Dead = 3,
    Unreachable = 4,
    HeldOut = 5,
    Quiet = 6,
    Capped = 7,
    Cancelled = 8,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Claim),
            2 => Some(Kind::Done),
            3 => Some(Kind::Dead),
            4 => Some(Kind::Unreachable),
            5 => Some(Kind::HeldOut),
            6 => Some(Kind::Quiet),
            7 => Some(Kind::Capped),
            8 => Some(Kind::Cancelled),
            _ => None,
        }
    }
}

/// The durable sets of one ledger: done ⊆ claimed; dead, unreachable, held_out, capped and
/// cancelled ⊆ done, disjoint; quiet: ever held for quiet hours (those not claimed are held now).
#[derive(Default, Debug, PartialEq)]
pub(super) struct Sets {
    pub(super) claimed: RoaringBitmap,
    pub(super) done: RoaringBitmap,
    pub(super) dead: RoaringBitmap,
    pub(super) unreachable: RoaringBitmap,
    pub(super) held_out: RoaringBitmap,
    pub(super) quiet: RoaringBitmap,
    pub(super) capped: RoaringBitmap,
    pub(super) cancelled: RoaringBitmap,
}

/// How many sets a snapshot holds.
const SETS: usize = 8;

impl Sets {
    /// Every set, in snapshot order.
    fn all(&self) -> [&RoaringBitmap; SETS] {
        [
            &self.claimed,
            &self.done,
            &self.dead,
            &self.unreachable,
            &self.held_out,
            &self.quiet,
            &self.capped,
            &self.cancelled,
        ]
    }

    fn all_mut(&mut self) -> [&mut RoaringBitmap; SETS] {
        [
            &mut self.claimed,
            &mut self.done,
            &mut self.dead,
            &mut self.unreachable,
            &mut self.held_out,
            &mut self.quiet,
            &mut self.capped,
            &mut self.cancelled,
        ]
    }

    /// The bytes of the sets in a snapshot, less its header.
    pub(super) fn serialized_size(&self) -> usize {
        self.all().iter().map(|m| 8 + m.serialized_size()).sum()
    }

    /// Every id any set holds (the claimed, and those only held for quiet hours).
    pub(super) fn ids(&self) -> RoaringBitmap {
        &self.claimed | &self.quiet
    }

    /// The part of every set inside `mask`.
    pub(super) fn masked(&self, mask: &RoaringBitmap) -> Sets {
        let mut out = Sets::default();
        for (to, from) in out.all_mut().into_iter().zip(self.all()) {
            *to = from & mask;
        }
        out
    }

    /// Adds every set of `other` to this one's.
    pub(super) fn union_with(&mut self, other: &Sets) {
        for (to, from) in self.all_mut().into_iter().zip(other.all()) {
            *to |= from;
        }
    }

    /// The outcome set a record of `kind` adds its ids to, if any.
    pub(super) fn tag(&self, kind: Kind) -> Option<&RoaringBitmap> {
        match kind {
            Kind::Claim | Kind::Done => None,
            Kind::Dead => Some(&self.dead),
            Kind::Unreachable => Some(&self.unreachable),
            Kind::HeldOut => Some(&self.held_out),
            Kind::Quiet => Some(&self.quiet),
            Kind::Capped => Some(&self.capped),
            Kind::Cancelled => Some(&self.cancelled),
        }
    }

    fn tag_mut(&mut self, kind: Kind) -> Option<&mut RoaringBitmap> {
        match kind {
            Kind::Claim | Kind::Done => None,
            Kind::Dead => Some(&mut self.dead),
            Kind::Unreachable => Some(&mut self.unreachable),
            Kind::HeldOut => Some(&mut self.held_out),
            Kind::Quiet => Some(&mut self.quiet),
            Kind::Capped => Some(&mut self.capped),
            Kind::Cancelled => Some(&mut self.cancelled),
        }
    }

    /// Applies one record (replay) or one mark.
    pub(super) fn apply(&mut self, kind: Kind, id: u32) {
        self.apply_with(kind, |set| {
            set.insert(id);
        });
    }

    /// [`Sets::apply`] for a whole set of ids.
    pub(super) fn apply_all(&mut self, kind: Kind, ids: &RoaringBitmap) {
        self.apply_with(kind, |set| *set |= ids);
    }

    /// [`Sets::apply`] for a range of ids.
    pub(super) fn apply_range(&mut self, kind: Kind, ids: &RangeInclusive<u32>) {
        self.apply_with(kind, |set| {
            set.insert_range(ids.clone());
        });
    }

    /// [`Sets::apply_range`] of each of `runs`, taking `joined` (the runs joined across gaps
    /// whose ids are all in the set walked: [`super::runs::joined_runs`]) where the target
    /// holds that set: the claimed set always (it holds done, and done holds the tags); done
    /// and the kind's tag too where the set walked was `settled` (done, or this kind's tag:
    /// a mark's).
    pub(super) fn apply_joined(
        &mut self,
        kind: Kind,
        runs: &[RangeInclusive<u32>],
        joined: &[RangeInclusive<u32>],
        settled: bool,
    ) {
        debug_assert!(kind != Kind::Quiet, "quiet holds are not claimed");
        let insert = |set: &mut RoaringBitmap, ranges: &[RangeInclusive<u32>]| {
            for r in ranges {
                set.insert_range(r.clone());
            }
        };
        insert(&mut self.claimed, joined);
        let ranges = if settled { joined } else { runs };
        if kind != Kind::Claim {
            insert(&mut self.done, ranges);
        }
        if let Some(tag) = self.tag_mut(kind) {
            insert(tag, ranges);
        }
    }

    /// Adds ids, with `add`, to each set a record of `kind` puts them in: every kind but
    /// quiet claims, every kind but claim and quiet settles (done), and a tagged kind tags.
    fn apply_with(&mut self, kind: Kind, add: impl Fn(&mut RoaringBitmap)) {
        if kind != Kind::Quiet {
            add(&mut self.claimed);
        }
        if !matches!(kind, Kind::Claim | Kind::Quiet) {
            add(&mut self.done);
        }
        if let Some(tag) = self.tag_mut(kind) {
            add(tag);
        }
    }

    /// The ids by recorded outcome.
    pub(super) fn outcomes(&self) -> crate::store::Outcomes {
        crate::store::Outcomes {
            delivered: &(&(&(&self.done - &self.dead) - &self.unreachable) - &self.held_out)
                - &self.capped
                - &self.cancelled,
            dead_lettered: self.dead.clone(),
            unreachable: self.unreachable.clone(),
            held_out: self.held_out.clone(),
            in_flight: &self.claimed - &self.done,
            quiet_held: &self.quiet - &self.claimed,
            capped: self.capped.clone(),
            cancelled: self.cancelled.clone(),
        }
    }

    pub(super) fn encode(&self) -> Result<Vec<u8>> {
        let maps = self.all();
        let body_len = self.serialized_size();
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
        let count = match bytes.get(..8) {
            Some(m) if m == SNAP_MAGIC => SETS,
            Some(m) if m == SNAP_MAGIC_V3 => 7,
            Some(m) if m == SNAP_MAGIC_V2 => 6,
            Some(m) if m == SNAP_MAGIC_V1 => 3,
            _ => return Err("not a fanout ledger snapshot (bad header)".into()),
        };
        if bytes.len() < SNAP_HEADER {
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
        let mut maps = Vec::with_capacity(count);
        for _ in 0..count {
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
        let mut maps = maps.into_iter();
        let mut next = || maps.next().unwrap_or_default();
        Ok(Sets {
            claimed: next(),
            done: next(),
            dead: next(),
            unreachable: next(),
            held_out: next(),
            quiet: next(),
            capped: next(),
            cancelled: next(),
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

/// Set in a record's kind byte when its ids are written as runs: (first, last) pairs, both
/// inclusive, instead of one by one.
const RUNS: u8 = 0x80;

/// Fills `buf` with one log record of `kind` for `ids`: as runs of consecutive ids when that
/// takes at most half the bytes (an id-ordered batch of a densely numbered population is one
/// run: 8 bytes for thousands of ids), else id by id.
pub(super) fn encode_record(buf: &mut Vec<u8>, kind: Kind, ids: &[u32]) {
    let runs = match run_of(ids) {
        Some(run) if 4 <= ids.len() => return encode_runs(buf, kind, &[run]),
        Some(_) => 1,
        None => {
            1 + ids
                .windows(2)
                .filter(|w| w[0].checked_add(1) != Some(w[1]))
                .count()
        }
    };
    begin_record(buf);
    if 4 * runs <= ids.len() {
        buf.reserve(1 + 8 * runs);
        buf.push(kind as u8 | RUNS);
        for run in ids.chunk_by(|a, b| a.checked_add(1) == Some(*b)) {
            if let (Some(&first), Some(&last)) = (run.first(), run.last()) {
                put_run(buf, first, last);
            }
        }
    } else {
        buf.reserve(1 + 4 * ids.len());
        buf.push(kind as u8);
        for id in ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
    }
    seal_record(buf);
}

/// [`encode_record`] of ids known to be the ascending runs `runs`.
pub(super) fn encode_runs(buf: &mut Vec<u8>, kind: Kind, runs: &[RangeInclusive<u32>]) {
    begin_record(buf);
    buf.reserve(1 + 8 * runs.len());
    buf.push(kind as u8 | RUNS);
    for run in runs {
        put_run(buf, *run.start(), *run.end());
    }
    seal_record(buf);
}

fn begin_record(buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[0; RECORD_HEADER]);
}

fn put_run(buf: &mut Vec<u8>, first: u32, last: u32) {
    buf.extend_from_slice(&first.to_le_bytes());
    buf.extend_from_slice(&last.to_le_bytes());
}

/// Writes the record's length and checksum in front of it.
fn seal_record(buf: &mut [u8]) {
    let len = (buf.len() - RECORD_HEADER) as u32;
    let crc = crc32fast::hash(&buf[RECORD_HEADER..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Applies one record's payload (its kind byte, then its ids) to `sets`; an error says why
/// the payload is not a record.
fn apply_record(payload: &[u8], sets: &mut Sets) -> std::result::Result<(), &'static str> {
    let (&tag, body) = payload.split_first().ok_or("bad length")?;
    let kind = Kind::from_byte(tag & !RUNS).ok_or("bad record kind")?;
    if tag & RUNS == 0 {
        for id in body.chunks_exact(4) {
            sets.apply(kind, u32_at(id, 0));
        }
        return Ok(());
    }
    if !body.len().is_multiple_of(8) {
        return Err("bad length");
    }
    let runs = || body.chunks_exact(8).map(|r| u32_at(r, 0)..=u32_at(r, 4));
    // Every run checked before any is applied: a bad record changes nothing.
    if runs().any(|run| run.is_empty()) {
        return Err("bad run");
    }
    runs().for_each(|run| sets.apply_range(kind, &run));
    Ok(())
}

/// Replays the log at `path` into `sets`; returns (bytes of whole good records, file length).
///
/// A bad record at the end is a torn tail (a crash mid-append) and ends the replay there; a bad
/// record with data after it is corruption and an error naming the file and the byte offset
/// (see [`is_torn_tail`]).
fn replay(path: &Path, sets: &mut Sets) -> Result<(u64, u64)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(io_error(e, "cannot open", path)),
    };
    let stamp = Stamp::of(
        &file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?,
    );
    let file_len = stamp.len;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut good = 0u64;
    let mut header = [0u8; RECORD_HEADER];
    let mut payload = Vec::new();
    loop {
        if good == file_len || !read_full(&mut reader, &mut header, path)? {
            break;
        }
        let len = u64::from(u32_at(&header, 0));
        let extent = good + RECORD_HEADER as u64 + len;
        let sane = len >= 1 && (len - 1).is_multiple_of(4);
        if !sane || extent > file_len {
            check_torn_tail(path, &stamp, good, extent, "bad length")?;
            break;
        }
        payload.resize(len as usize, 0);
        if !read_full(&mut reader, &mut payload, path)? {
            // The file shrank under a reader (a writer's checkpoint emptied it): stop here.
            break;
        }
        if Kind::from_byte(payload[0] & !RUNS).is_none() {
            check_torn_tail(path, &stamp, good, extent, "bad record kind")?;
            break;
        }
        if crc32fast::hash(&payload) != u32_at(&header, 4) {
            check_torn_tail(path, &stamp, good, extent, "checksum mismatch")?;
            break;
        }
        if let Err(why) = apply_record(&payload, sets) {
            check_torn_tail(path, &stamp, good, extent, why)?;
            break;
        }
        good = extent;
    }
    Ok((good, file_len))
}

/// A log's length and modification time when its replay began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) len: u64,
    modified: Option<std::time::SystemTime>,
}

impl Stamp {
    pub(super) fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

/// Ok when the bad record at `bad` (claiming to end at `extent`) is a torn tail, else the
/// corruption error naming `path` and `bad`.
///
/// A reader without the store's lock (`fanout grants`) can race a writer's checkpoint, which
/// empties the log and appends again: the bytes under its offset then belong to other records.
/// So a log that changed since `stamp` is not called corrupt; the replay ends there, as the new
/// snapshot (read after the log) holds everything the old log did.
pub(super) fn check_torn_tail(
    path: &Path,
    stamp: &Stamp,
    bad: u64,
    extent: u64,
    why: &str,
) -> Result<()> {
    if is_torn_tail(path, bad, extent, stamp.len)? {
        return Ok(());
    }
    match fs::metadata(path) {
        Ok(now) if Stamp::of(&now) == *stamp => {}
        _ => return Ok(()),
    }
    Err(Error::runtime(format!(
        "ledger log {} is corrupt at byte offset {bad} ({why}), with records after it that \
         would be lost; not opening it (restore the file, or cut it at that offset by hand to \
         drop them)",
        path.display()
    )))
}

/// Whether a bad record at `bad` is what a crash leaves behind. Each record is one `write` in
/// append mode, so a crash leaves at most a partial last record: fewer bytes than a header
/// remain, its claimed extent reaches or passes the end of the file, or what lies past it is
/// zeros (a power loss can extend a file before its data lands). Anything else is corruption.
fn is_torn_tail(path: &Path, bad: u64, extent: u64, file_len: u64) -> Result<bool> {
    if file_len.saturating_sub(bad) < RECORD_HEADER as u64 || extent >= file_len {
        return Ok(true);
    }
    // Zeros from the bad record's own start (a zeroed header: length 0) are zeros past it too.
    all_zero_from(path, extent, file_len)
}

/// Whether the bytes of `path` in `from..file_len` are all zero (bytes past a shrunken end
/// count as zero: there is nothing there to lose).
fn all_zero_from(path: &Path, from: u64, file_len: u64) -> Result<bool> {
    let mut file = File::open(path).map_err(|e| io_error(e, "cannot open", path))?;
    file.seek(SeekFrom::Start(from))
        .map_err(|e| io_error(e, "cannot seek in", path))?;
    let mut rest = file.take(file_len.saturating_sub(from));
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match rest.read(&mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e, "cannot read", path)),
        };
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

/// Fills `buf`; false when the file ends first.
fn read_full(reader: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_error(e, "cannot read", path)),
    }
}

/// Loads a ledger's sets: the logs are read before the snapshot, so a reader racing a writer's
/// checkpoint sees either the old snapshot with the old logs or the new snapshot (which holds
/// everything the old logs did). Returns the sets and each log's good length and length.
pub(super) fn load(snap_path: &Path, logs: &[PathBuf]) -> Result<(Sets, Vec<(u64, u64)>)> {
    let mut from_logs = Sets::default();
    let lens = logs
        .iter()
        .map(|log| replay(log, &mut from_logs))
        .collect::<Result<Vec<_>>>()?;
    let mut sets = load_snapshot(snap_path)?;
    sets.union_with(&from_logs);
    Ok((sets, lens))
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
pub(super) fn file_stem(key: &str) -> Result<String> {
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
