//! The log's records: torn tails cut, corruption refused, consecutive ids written as runs.

use super::super::format::{check_torn_tail, Kind, Sets, RECORD_HEADER};
use super::super::runs::{ids_in, joined_runs, run_of, runs_in, runs_of};
use super::*;

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

/// A run is consecutive ascending ids, and nothing else: not a repeat, a gap, a step down, or
/// a step over the top of the id space.
#[test]
fn a_run_is_consecutive_ascending_ids() {
    let max = u32::MAX;
    type Case<'a> = (&'a [u32], Option<(u32, u32)>);
    let cases: [Case; 9] = [
        (&[], None),
        (&[5], Some((5, 5))),
        (&[1, 2, 3], Some((1, 3))),
        (&[max - 1, max], Some((max - 1, max))),
        (&[1, 3], None),
        (&[3, 2], None),
        (&[1, 2, 2, 3], None),
        (&[max, 0], None),
        (&[max - 1, max, 0, 1], None),
    ];
    for (ids, want) in cases {
        let got = run_of(ids).map(|r| (*r.start(), *r.end()));
        assert_eq!(got, want, "{ids:?}");
    }
}

/// `runs_of` (bisection) against the runs read off id by id: strictly ascending ids within
/// the run limit give their runs; repeats, descents and too many runs give none.
#[test]
fn runs_of_finds_the_runs_of_ascending_ids() {
    let naive = |ids: &[u32], max: usize| -> Option<Vec<(u32, u32)>> {
        if ids.is_empty() || ids.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        let runs: Vec<(u32, u32)> = ids
            .chunk_by(|a, b| a.checked_add(1) == Some(*b))
            .map(|r| (r[0], r[r.len() - 1]))
            .collect();
        (runs.len() <= max).then_some(runs)
    };
    let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15);
    let max = u32::MAX;
    let mut cases: Vec<Vec<u32>> = vec![
        vec![],
        vec![7],
        vec![max - 2, max - 1, max],
        vec![0, 1, 2, 5, 6, max],
        vec![1, 2, 2, 3],
        vec![3, 4, 1, 2],
        vec![max, 0],
    ];
    for _ in 0..2000 {
        // A few runs of random lengths and gaps, sometimes a repeat or a step back.
        let mut ids = Vec::new();
        let mut id = next(1 << 20) as u32;
        for _ in 0..1 + next(20) {
            for _ in 0..1 + next(300) {
                ids.push(id);
                id += 1;
            }
            id += 1 + next(5000) as u32;
        }
        match next(10) {
            0 => ids.push(ids[ids.len() - 1]),
            1 => ids.push(ids[0]),
            _ => {}
        }
        cases.push(ids);
    }
    for ids in &cases {
        for max in [1, 4, 16] {
            let got = runs_of(ids, max).map(|runs| {
                runs.iter()
                    .map(|r| (*r.start(), *r.end()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, naive(ids, max), "{ids:?} max {max}");
        }
    }
}

/// Consecutive ids are logged as runs — a record of 17 bytes however long its run — and read
/// back as the same sets; ids with no run among them are logged one by one. A run record that
/// is no run (first past last) with a record after it is corruption, as any bad record is.
#[test]
fn consecutive_ids_are_logged_as_runs_and_read_back_whole() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let ledger = store.ledger("runs").expect("ledger");
    let claimed: Vec<u32> = (1000..=4999).collect();
    ledger.claim(&claimed).expect("claim");
    // Two runs: 1000..=1999 and 2001..=2999.
    let done: Vec<u32> = (1000..=2999).filter(|&id| id != 2000).collect();
    ledger.mark_done(&done).expect("done");
    let dead: Vec<u32> = (3000..3010).step_by(2).collect();
    ledger.mark_dead(&dead).expect("dead");
    let log = log_of(tmp.path(), "runs");
    let records = [1 + 8, 1 + 2 * 8, 1 + 4 * dead.len()];
    let want_len: usize = records.iter().map(|r| RECORD_HEADER + r).sum();
    assert_eq!(fs::metadata(&log).expect("stat").len(), want_len as u64);
    let mut settled = [done.clone(), dead.clone()].concat();
    settled.sort_unstable();
    let want = (claimed, settled, dead);
    assert_eq!(sets_of(&ledger), want);
    drop((ledger, store));
    let store = open(tmp.path());
    assert_eq!(sets_of(&store.ledger("runs").expect("ledger")), want);
    drop(store);
    // The claim's run made 5000..=4999, its checksum made good again.
    let mut bytes = fs::read(&log).expect("read log");
    bytes[RECORD_HEADER + 1..RECORD_HEADER + 5].copy_from_slice(&5000u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[RECORD_HEADER..RECORD_HEADER + records[0]]);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    fs::write(&log, &bytes).expect("write log");
    let store = open(tmp.path());
    let msg = format!("{:#}", store.ledger("runs").expect_err("bad run opened"));
    assert!(msg.contains("offset 0 (bad run)"), "{msg}");
}

/// A log of three records: claim [1, 2, 3], done [1], claim [4, 5]; returns it and where the
/// middle record starts.
fn three_record_log(dir: &Path) -> (Vec<u8>, usize) {
    {
        let store = open(dir);
        let ledger = store.ledger("k").expect("ledger");
        ledger.claim(&[1, 2, 3]).expect("claim");
        ledger.mark_done(&[1]).expect("done");
        ledger.claim(&[4, 5]).expect("claim");
    }
    let full = fs::read(log_of(dir, "k")).expect("read log");
    assert_eq!(full.len(), 3 * (RECORD_HEADER + 1) + 6 * 4);
    (full, RECORD_HEADER + 1 + 3 * 4)
}

#[test]
fn a_corrupt_record_mid_log_refuses_the_open_and_keeps_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (full, middle) = three_record_log(tmp.path());
    let log = log_of(tmp.path(), "k");
    // One flipped byte in the middle record's payload (its id): a CRC mismatch with a whole
    // good record after it. Then the same record's length (5 becomes 1: still inside the file)
    // and its kind.
    for (at, flip) in [
        (middle + RECORD_HEADER + 1, 0x40),
        (middle, 0x04),
        (middle + RECORD_HEADER, 0x40),
    ] {
        let mut bytes = full.clone();
        bytes[at] ^= flip;
        fs::write(&log, &bytes).expect("write log");
        let store = open(tmp.path());
        let err = store.ledger("k").expect_err("corrupt log opened");
        assert!(matches!(err, Error::Runtime(_)), "{err:?}");
        assert_eq!(err.exit_code(), 1);
        let msg = format!("{err:#}");
        assert!(msg.contains(&log.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("offset {middle}")), "{msg}");
        drop(store);
        assert_eq!(
            fs::read(&log).expect("read log"),
            bytes,
            "the log was changed"
        );
        // `fanout grants` reads without opening: the same refusal.
        let ro = FileStore::open_read_only("file:r", &tmp.path().to_string_lossy()).expect("ro");
        let msg = format!("{:#}", ro.granted("k").expect_err("corrupt log read"));
        assert!(msg.contains(&format!("offset {middle}")), "{msg}");
    }
}

#[test]
fn a_log_that_changed_while_read_is_not_called_corrupt() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (full, middle) = three_record_log(tmp.path());
    let log = log_of(tmp.path(), "k");
    let mut bytes = full.clone();
    bytes[middle + RECORD_HEADER + 1] ^= 0x40;
    fs::write(&log, &bytes).expect("write log");
    let stamp = Stamp::of(&fs::metadata(&log).expect("stat"));
    let extent = (middle + RECORD_HEADER + 13) as u64;
    assert!(check_torn_tail(&log, &stamp, middle as u64, extent, "test").is_err());
    // A writer's checkpoint emptied the log and appended again while a reader read it.
    bytes.truncate(bytes.len() - 1);
    fs::write(&log, &bytes).expect("write log");
    assert!(check_torn_tail(&log, &stamp, middle as u64, extent, "test").is_ok());
}

#[test]
fn a_half_written_last_record_is_dropped_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (full, _) = three_record_log(tmp.path());
    let log = log_of(tmp.path(), "k");
    let last = RECORD_HEADER + 1 + 2 * 4;
    fs::write(&log, &full[..full.len() - last / 2]).expect("write log");
    let store = open(tmp.path());
    let ledger = store.ledger("k").expect("torn tail opens");
    assert_eq!(sets_of(&ledger), (vec![1, 2, 3], vec![1], vec![]));
    assert_eq!(
        fs::metadata(&log).expect("stat").len(),
        (full.len() - last) as u64
    );
}

#[test]
fn a_zero_filled_tail_opens() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (full, _) = three_record_log(tmp.path());
    let log = log_of(tmp.path(), "k");
    // Power loss: the file grew but the data never landed, after whole records and in place of
    // the last one.
    let last = RECORD_HEADER + 1 + 2 * 4;
    let mut grown = full.clone();
    grown.extend_from_slice(&[0; 4096]);
    let mut zeroed = full.clone();
    let n = zeroed.len();
    zeroed[n - last..].fill(0);
    zeroed.extend_from_slice(&[0; 100]);
    for (bytes, claimed) in [(grown, vec![1, 2, 3, 4, 5]), (zeroed, vec![1, 2, 3])] {
        fs::write(&log, &bytes).expect("write log");
        let store = open(tmp.path());
        let ledger = store.ledger("k").expect("zero tail opens");
        assert_eq!(sets_of(&ledger), (claimed, vec![1], vec![]));
        drop((ledger, store));
    }
}

/// `joined_runs`' walk over a set's ids against the naive reading (no id of any run in the set),
/// for runs and sets near each other, near a container's edge and near the last id.
#[test]
fn runs_fit_a_set_exactly_when_no_id_of_theirs_is_in_it() {
    let mut next = crate::xorshift(0x51ed_270b_0c1a_4d3f);
    let (mut disjoint, mut not) = (0, 0);
    for _ in 0..5_000 {
        let base = [0, 65_000, u32::MAX - 3_000][next(3) as usize];
        let set: roaring::RoaringBitmap =
            (0..next(40)).map(|_| base + next(2_500) as u32).collect();
        let mut runs = Vec::new();
        let mut at = base + next(100) as u32;
        for _ in 0..1 + next(12) {
            let end = at + next(30) as u32;
            runs.push(at..=end);
            at = end + 2 + next(200) as u32;
        }
        let naive = runs.iter().all(|r| r.clone().all(|id| !set.contains(id)));
        assert_eq!(
            joined_runs(&runs, &set).is_some(),
            naive,
            "{runs:?} {set:?}"
        );
        if naive {
            disjoint += 1;
        } else {
            not += 1;
        }
    }
    assert!(disjoint > 500 && not > 500, "{disjoint} {not}");
}

/// `joined_runs` against the naive reading: `None` exactly when the set holds an id of a run,
/// else the runs joined across every gap whose ids the set all holds. Applied to a ledger's
/// sets (claimed ⊇ done ⊇ each tag) with `Sets::apply_joined` — by a mark, walked against
/// the set it settles into, or by a claim, walked against the claimed set — they come out as
/// inserting each run by itself makes them.
#[test]
fn runs_join_across_the_gaps_a_set_holds_and_apply_as_the_runs_do() {
    use std::ops::RangeInclusive;
    let mut next = crate::xorshift(0x7c1f_94e2_03ab_58d1);
    let (mut joined_some, mut refused) = (0, 0);
    for _ in 0..5_000 {
        let base = [0, 65_000, u32::MAX - 3_000][next(3) as usize];
        let mut runs = Vec::new();
        let mut at = base + next(100) as u32;
        for _ in 0..1 + next(12) {
            let end = at + next(30) as u32;
            runs.push(at..=end);
            // Gaps of an id or three (users set apart), now and then a long one.
            at = end + 2 + if next(4) == 0 { next(200) } else { next(3) } as u32;
        }
        // The set walked holds most gap ids, and a few ids anywhere (in a run: refused).
        let mut set: roaring::RoaringBitmap = runs
            .windows(2)
            .flat_map(|w| *w[0].end() + 1..*w[1].start())
            .filter(|_| next(8) != 0)
            .collect();
        for _ in 0..next(3) {
            set.insert(base + next(2_500) as u32);
        }
        let disjoint = runs.iter().all(|r| r.clone().all(|id| !set.contains(id)));
        let got = joined_runs(&runs, &set);
        assert_eq!(got.is_some(), disjoint, "{runs:?} {set:?}");
        let Some(joined) = got else {
            refused += 1;
            continue;
        };
        let mut want: Vec<RangeInclusive<u32>> = Vec::new();
        for r in &runs {
            match want.last_mut() {
                Some(w) if (*w.end() + 1..*r.start()).all(|id| set.contains(id)) => {
                    *w = *w.start()..=*r.end()
                }
                _ => want.push(r.clone()),
            }
        }
        assert_eq!(joined, want, "{runs:?} {set:?}");
        if joined.len() < runs.len() {
            joined_some += 1;
        }
        let some = |next: &mut dyn FnMut(u64) -> u64| -> roaring::RoaringBitmap {
            (0..next(20)).map(|_| base + next(2_500) as u32).collect()
        };
        // A mark walked against the set it settles into, or a claim walked against claimed.
        let (kind, settled) = [
            (Kind::Done, true),
            (Kind::Dead, true),
            (Kind::Claim, false),
            (Kind::HeldOut, false),
        ][next(4) as usize];
        let mut sets = Sets::default();
        if settled {
            match kind {
                Kind::Done => sets.done = set.clone(),
                _ => {
                    sets.dead = set.clone();
                    sets.done = &set | &some(&mut next);
                }
            }
            sets.claimed = &sets.done | &some(&mut next);
        } else {
            sets.claimed = set.clone();
            sets.done = &set & &some(&mut next);
            sets.held_out = &sets.done & &some(&mut next);
        }
        let mut by_run = Sets {
            claimed: sets.claimed.clone(),
            done: sets.done.clone(),
            dead: sets.dead.clone(),
            held_out: sets.held_out.clone(),
            ..Sets::default()
        };
        for r in &runs {
            by_run.apply_range(kind, r);
        }
        sets.apply_joined(kind, &runs, &joined, settled);
        assert_eq!(sets, by_run, "{kind:?} {runs:?} {set:?}");
    }
    assert!(
        joined_some > 1_000 && refused > 100,
        "{joined_some} {refused}"
    );
}

/// `runs_in` against the ids it was given: expanded, its runs are those ids in their order;
/// each run is consecutive ascending ids and none could take the next id in (maximal); and
/// `ids_in` counts them.
#[test]
fn runs_in_any_ids_expand_to_those_ids() {
    let mut next = crate::xorshift(0x51d3_0c2e_9a47_b86f);
    for _ in 0..3_000 {
        let mut id = [0, 65_530, u32::MAX - 40][next(3) as usize] + next(8) as u32;
        let ids: Vec<u32> = (0..next(40))
            .map(|_| {
                id = match next(5) {
                    0 => id.wrapping_sub(next(4) as u32),
                    1 => id.saturating_add(2 + next(3) as u32),
                    _ => id.saturating_add(1),
                };
                id
            })
            .collect();
        let runs = runs_in(&ids);
        let expanded: Vec<u32> = runs.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(expanded, ids);
        assert_eq!(ids_in(&runs), ids.len() as u64);
        for w in runs.windows(2) {
            assert_ne!(w[0].end().checked_add(1), Some(*w[1].start()), "{runs:?}");
        }
    }
}
