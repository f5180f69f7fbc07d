//! The records of a send-history log (`DIR/history/sent.<gen>.log`, [`super`]):
//!
//! ```text
//! [len u32 LE][crc32 u32 LE][slot u16 LE][key len u16 LE][key][ids]
//! ```
//! `len` and the crc cover what follows them. The slot's top bit ([`RUNS`]) says how the ids
//! are written. Clear (every record before this bit existed): each id as a u32 LE. Set: the
//! ids, strictly ascending, as runs of consecutive ids, each run `[gap][length]` in LEB128
//! varints, the gap counted from the end of the run before (from 0 for the first), then zero
//! bytes up to a multiple of four (the last varint, a length, never ends in one). A claim's
//! ids are mostly such runs (an engine batch is a bucket's users), so a send costs a fraction
//! of a byte where it cost four, and writing the log cost a fifth of a capped claim. A fanout
//! from before the bit reads such a record whole (the padding sees to that, where it would
//! take a ragged one for a torn tail and cut the log there), finds a slot its send-time table
//! does not hold, and refuses the log rather than misread it.

use std::fs;
use std::ops::RangeInclusive;
use std::path::Path;

use super::super::io_error;
use crate::error::{Error, Result};

/// Longest ledger key a record names.
const MAX_KEY: usize = u16::MAX as usize;
/// The slot field's bit that says the ids are written as runs.
const RUNS: u16 = 0x8000;

/// One decoded `sent` record.
pub(super) struct Sent {
    pub(super) slot: u16,
    pub(super) key: String,
    pub(super) ids: Vec<u32>,
}

/// Fills `buf` with one `sent` record of the ids of `runs`: as runs where they are strictly
/// ascending (a claim's are), else each id in four bytes.
pub(super) fn encode(
    buf: &mut Vec<u8>,
    key: &str,
    slot: u16,
    runs: &[RangeInclusive<u32>],
) -> Result<()> {
    if key.len() > MAX_KEY {
        return Err(Error::runtime(format!("ledger key too long: {key}")));
    }
    if slot & RUNS != 0 {
        return Err(Error::runtime(format!(
            "send-time slot {slot} out of range"
        )));
    }
    buf.clear();
    buf.extend_from_slice(&[0; 8]);
    buf.extend_from_slice(&(slot | RUNS).to_le_bytes());
    buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    let from = buf.len();
    if push_runs(buf, runs) {
        let padded = from + (buf.len() - from).next_multiple_of(4);
        buf.resize(padded, 0);
    } else {
        buf[8..10].copy_from_slice(&slot.to_le_bytes());
        for id in runs.iter().flat_map(|r| r.clone()) {
            buf.extend_from_slice(&id.to_le_bytes());
        }
    }
    let len = (buf.len() - 8) as u32;
    let crc = crc32fast::hash(&buf[8..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Appends `runs` as gaps and lengths; `false` (and `buf` as it was) if their ids are not
/// strictly ascending.
fn push_runs(buf: &mut Vec<u8>, runs: &[RangeInclusive<u32>]) -> bool {
    let from = buf.len();
    let mut end = 0u64;
    for run in runs.iter().filter(|r| !r.is_empty()) {
        let (start, last) = (u64::from(*run.start()), u64::from(*run.end()));
        if start < end {
            buf.truncate(from);
            return false;
        }
        push_varint(buf, start - end);
        push_varint(buf, last + 1 - start);
        end = last + 1;
    }
    true
}

fn push_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// A varint off the front of `bytes` (at most 2^35 − 1: every one written is below 2^33).
fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..35).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The ids of a record written as runs; `None` if they do not decode.
fn read_runs(mut bytes: &[u8]) -> Option<Vec<u32>> {
    let mut ids = Vec::new();
    let mut end = 0u64;
    while !bytes.is_empty() {
        let start = end + take_varint(&mut bytes)?;
        let stop = start + take_varint(&mut bytes)?;
        if stop == start || stop > 1 << 32 {
            return None;
        }
        ids.extend(start as u32..=(stop - 1) as u32);
        end = stop;
    }
    Some(ids)
}

/// The whole records of a log, and the bytes they fill; a bad record ends the log (what a
/// crash mid-append leaves).
pub(super) fn read_log(path: &Path) -> Result<(Vec<Sent>, u64)> {
    let bytes = fs::read(path).map_err(|e| io_error(e, "cannot read", path))?;
    let (mut out, mut at) = (Vec::new(), 0usize);
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if len < 4 || crc32fast::hash(body) != crc {
            break;
        }
        let Some(sent) = decode(body) else {
            break;
        };
        out.push(sent);
        at += 8 + len;
    }
    if at < bytes.len() {
        tracing::warn!(log = %path.display(), kept_bytes = at, "torn tail in a send-history log; cut");
    }
    Ok((out, at as u64))
}

/// One record's body (after its length and crc).
fn decode(body: &[u8]) -> Option<Sent> {
    let slot = u16::from_le_bytes([body[0], body[1]]);
    let key_len = usize::from(u16::from_le_bytes([body[2], body[3]]));
    let key = body.get(4..4 + key_len)?;
    let ids = &body[4 + key_len..];
    let ids = match slot & RUNS {
        0 if ids.len().is_multiple_of(4) => ids
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect(),
        0 => return None,
        _ => {
            let padding = ids.iter().rev().take_while(|&&b| b == 0).count();
            if padding > 3 {
                return None;
            }
            read_runs(&ids[..ids.len() - padding])?
        }
    };
    Some(Sent {
        slot: slot & !RUNS,
        key: String::from_utf8_lossy(key).into_owned(),
        ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::runs::runs_in;

    fn round_trip(ids: &[u32]) -> (Vec<u32>, usize) {
        let mut buf = Vec::new();
        encode(&mut buf, "promo", 7, &runs_in(ids)).expect("encode");
        let sent = decode(&buf[8..]).expect("decode");
        assert_eq!((sent.slot, sent.key.as_str()), (7, "promo"));
        // What a fanout from before runs reads: a whole record (ids in fours) whose slot, if
        // written as runs, no send-time table holds.
        let raw_slot = usize::from(u16::from_le_bytes([buf[8], buf[9]]));
        assert!((buf.len() - 8 - 4 - 5).is_multiple_of(4), "{ids:?}");
        let ascending = ids.windows(2).all(|w| w[0] < w[1]);
        assert_eq!(raw_slot >= crate::history::SLOTS, ascending, "{ids:?}");
        // Runs as a caller may cut them (here, each id its own run) read back the same ids.
        let mut single = Vec::new();
        let each: Vec<_> = ids.iter().map(|&id| id..=id).collect();
        encode(&mut single, "promo", 7, &each).expect("encode");
        assert_eq!(decode(&single[8..]).expect("decode").ids, sent.ids);
        (sent.ids, buf.len())
    }

    #[test]
    fn any_ids_read_back_as_written() {
        let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
        let edges = [
            vec![],
            vec![0],
            vec![u32::MAX],
            vec![0, u32::MAX],
            vec![u32::MAX - 1, u32::MAX],
        ];
        for ids in edges {
            assert_eq!(round_trip(&ids).0, ids);
        }
        for _ in 0..2_000 {
            let mut id = next(1 << 33).saturating_sub(1 << 32) as u32;
            let mut ids: Vec<u32> = (0..next(300))
                .map(|_| {
                    id = id.saturating_add(match next(4) {
                        0 => next(1 << 20) as u32,
                        _ => 1,
                    });
                    id
                })
                .collect();
            match next(6) {
                0 => ids.reverse(),
                1 => ids.extend_from_slice(&ids.clone()),
                _ => {}
            }
            assert_eq!(round_trip(&ids).0, ids);
        }
    }

    #[test]
    fn a_bucket_of_sends_costs_bytes_a_run_not_an_id() {
        // 1000 users with every tenth held out: 101 runs, two bytes each (the first's gap
        // three), after 8 + 4 + 5 of header and key.
        let ids: Vec<u32> = (5_000..6_000).filter(|id| id % 10 != 3).collect();
        let (back, len) = round_trip(&ids);
        assert_eq!(back, ids);
        assert_eq!(len, 8 + 4 + 5 + 3 + 100 * 2 + 1);
        // Not ascending: four bytes an id, as before.
        let mut shuffled = ids.clone();
        shuffled.swap(0, 500);
        assert_eq!(
            round_trip(&shuffled),
            (shuffled.clone(), 8 + 4 + 5 + 4 * 900)
        );
    }

    #[test]
    fn records_of_either_form_are_read_from_one_log() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("sent.1.log");
        let mut log = Vec::new();
        // A record as written before runs: the slot's top bit clear.
        let mut old = vec![0u8; 8];
        old.extend_from_slice(&3u16.to_le_bytes());
        old.extend_from_slice(&1u16.to_le_bytes());
        old.push(b'a');
        for id in [9u32, 4] {
            old.extend_from_slice(&id.to_le_bytes());
        }
        let len = (old.len() - 8) as u32;
        let crc = crc32fast::hash(&old[8..]);
        old[..4].copy_from_slice(&len.to_le_bytes());
        old[4..8].copy_from_slice(&crc.to_le_bytes());
        log.extend_from_slice(&old);
        let mut buf = Vec::new();
        encode(&mut buf, "b", 5, &runs_in(&[1, 2, 3, 10])).expect("encode");
        log.extend_from_slice(&buf);
        // A torn tail.
        log.extend_from_slice(&buf[..buf.len() - 1]);
        fs::write(&path, &log).expect("write");
        let (records, good) = read_log(&path).expect("read");
        let got: Vec<(u16, &str, &[u32])> = records
            .iter()
            .map(|r| (r.slot, r.key.as_str(), r.ids.as_slice()))
            .collect();
        assert_eq!(got, [(3, "a", &[9, 4][..]), (5, "b", &[1, 2, 3, 10][..])]);
        assert_eq!(good as usize, old.len() + buf.len());
    }
}
