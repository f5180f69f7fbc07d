//! Tests of the on-disk behaviour: escaping, torn tails, snapshots, the lock, read-only opens.

use std::fs;
use std::path::{Path, PathBuf};

use super::format::{check_torn_tail, file_stem, run_of, Stamp, RECORD_HEADER};
use super::*;
use crate::store::LedgerCounts;

/// Opens the store in `dir`, waiting a moment while its lock is still held: a test elsewhere
/// in this binary (`store::tests::kill_9_loses_no_claim`) spawns a child process, which holds
/// a copy of every descriptor open at that instant — a just-dropped store's lock among them —
/// until it execs. Another process's lock is still refused, after 5 s.
fn open(dir: &Path) -> FileStore {
    let url = format!("file:{}", dir.display());
    let started = std::time::Instant::now();
    loop {
        match FileStore::open(&url, &dir.to_string_lossy()) {
            Ok(store) => return store,
            Err(e) if e.to_string().contains("in use") && started.elapsed().as_secs() < 5 => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("open {}: {e}", dir.display()),
        }
    }
}

fn log_of(dir: &Path, key: &str) -> PathBuf {
    dir.join("ledgers")
        .join(format!("{}.log", file_stem(key).expect("stem")))
}

fn snap_of(dir: &Path, key: &str) -> PathBuf {
    log_of(dir, key).with_extension("snap")
}

fn sets_of(ledger: &FileLedger) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let sets = ledger.sets();
    (
        sets.claimed.iter().collect(),
        sets.done.iter().collect(),
        sets.dead.iter().collect(),
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
    open(tmp.path());
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

/// Consecutive ids (taken as a range, not a set) that run into ids claimed or settled before
/// — past the start of a range, up to its end, or only at its start — claim and mark only the
/// new ones, and a reopen reads back the same sets.
#[test]
fn consecutive_batches_over_earlier_ids_claim_and_mark_only_the_new_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let ledger = store.ledger("ranges").expect("ledger");
    let range = |a: u32, b: u32| (a..=b).collect::<Vec<u32>>();
    let claim = |ledger: &FileLedger, ids: &[u32]| {
        let c = ledger.claim(ids).expect("claim");
        (c.claimed, c.already)
    };
    assert_eq!(claim(&ledger, &range(100, 199)), (range(100, 199), vec![]));
    // Over the tail of what is claimed: the set's last id lies inside the range.
    assert_eq!(
        claim(&ledger, &range(150, 249)),
        (range(200, 249), range(150, 199))
    );
    // Below everything claimed, touching its first id only.
    assert_eq!(claim(&ledger, &range(90, 100)), (range(90, 99), vec![100]));
    // Claimed in the middle of the range, free on both sides.
    assert_eq!(claim(&ledger, &range(250, 259)), (range(250, 259), vec![]));
    assert_eq!(
        claim(&ledger, &range(240, 270)),
        (range(260, 270), range(240, 259))
    );
    ledger.mark_done(&range(100, 149)).expect("done");
    // Partly settled already: marked again, changes nothing for those.
    ledger.mark_done(&range(140, 159)).expect("done");
    ledger.mark_dead(&range(160, 169)).expect("dead");
    // Done ids claim as already granted, wherever they sit in the range.
    assert_eq!(claim(&ledger, &range(95, 104)), (vec![], range(95, 104)));
    let want = (range(90, 270), range(100, 169), range(160, 169));
    assert_eq!(sets_of(&ledger), want);
    drop((ledger, store));
    let store = open(tmp.path());
    let ledger = store.ledger("ranges").expect("ledger");
    assert_eq!(sets_of(&ledger), want);
    // Claimed and not settled before the reopen: handed out once more, then already.
    assert_eq!(
        claim(&ledger, &range(165, 174)),
        (range(170, 174), range(165, 169))
    );
    assert_eq!(claim(&ledger, &range(170, 174)), (vec![], range(170, 174)));
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

/// How a run ends: a ledger is folded into a new snapshot only once its log holds a quarter
/// of what the snapshot would; else the log stays (fsynced), and either reopens to its sets.
#[test]
fn the_closing_checkpoint_folds_only_logs_worth_folding() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dense: Vec<u32> = (0..200_000).collect();
    let sparse: Vec<u32> = (0..1000).map(|i| i * 3).collect();
    {
        let store = open(tmp.path());
        // 50 records of one run each, beside four full bitmap containers.
        let runs = store.ledger("dense").expect("ledger");
        for batch in dense.chunks(4000) {
            runs.claim(batch).expect("claim");
        }
        runs.mark_done(&dense[..1000]).expect("done");
        // One record of 1,000 ids, beside one array container of the same ids.
        let ids = store.ledger("sparse").expect("ledger");
        ids.claim(&sparse).expect("claim");
        store.checkpoint_due().expect("checkpoint");
    }
    let len = |key| fs::metadata(log_of(tmp.path(), key)).expect("stat").len();
    assert!(len("dense") > 0 && !snap_of(tmp.path(), "dense").exists());
    assert!(len("sparse") == 0 && snap_of(tmp.path(), "sparse").exists());
    let store = open(tmp.path());
    let counts = |key, claimed, done| {
        let ledger = store.ledger(key).expect("ledger");
        assert_eq!(
            ledger.counts(),
            LedgerCounts {
                claimed,
                done,
                dead: 0
            },
            "{key}"
        );
    };
    counts("dense", 200_000, 1000);
    counts("sparse", 1000, 0);
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

#[test]
fn a_revival_torn_before_the_log_is_emptied_leaves_the_ids_dead() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let ledger = store.ledger("k").expect("ledger");
    ledger.claim(&[1, 2, 3]).expect("claim");
    ledger.mark_done(&[1]).expect("done");
    ledger.mark_dead(&[2]).expect("dead");
    let old_log = fs::read(log_of(tmp.path(), "k")).expect("read log");
    assert_eq!(ledger.revive_dead().expect("revive"), 1);
    assert_eq!(
        fs::metadata(log_of(tmp.path(), "k")).expect("stat").len(),
        0
    );
    assert_eq!(sets_of(&ledger), (vec![1, 2, 3], vec![1], vec![]));
    drop((ledger, store));
    // A crash between the new snapshot's rename and the log's truncation: the old log replays
    // over it and 2 is dead again — the revival did not happen, nothing is sent twice.
    fs::write(log_of(tmp.path(), "k"), &old_log).expect("write log");
    let store = open(tmp.path());
    assert_eq!(
        sets_of(&store.ledger("k").expect("ledger")),
        (vec![1, 2, 3], vec![1, 2], vec![2])
    );
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

/// The ledger's rules, read naively off one set per kind: what a claim must return, and what
/// every reopen must read back, whatever the shards.
#[derive(Default)]
struct Model {
    claimed: std::collections::BTreeSet<u32>,
    done: std::collections::BTreeSet<u32>,
    dead: std::collections::BTreeSet<u32>,
    /// Claimed, not done, at the last open: handed out once more.
    pending: std::collections::BTreeSet<u32>,
}

impl Model {
    fn claim(&mut self, ids: &[u32]) -> Vec<u32> {
        let mut got = Vec::new();
        for &id in ids {
            if self.done.contains(&id) {
                continue;
            }
            if self.claimed.insert(id) || self.pending.remove(&id) {
                got.push(id);
            }
        }
        got
    }

    fn mark(&mut self, ids: &[u32], dead: bool) {
        for &id in ids {
            self.claimed.insert(id);
            self.done.insert(id);
            self.pending.remove(&id);
            if dead {
                self.dead.insert(id);
            }
        }
    }

    fn reopened(&mut self) {
        self.pending = self.claimed.difference(&self.done).copied().collect();
    }

    fn sets(&self) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let v = |s: &std::collections::BTreeSet<u32>| s.iter().copied().collect();
        (v(&self.claimed), v(&self.done), v(&self.dead))
    }
}

#[test]
fn any_shard_count_reads_back_what_every_other_wrote() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut model = Model::default();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // Shard counts up and down: more logs are created, surplus ones folded and removed.
    for (round, shards) in [3u32, 1, 5, 2, 8, 4, 1].into_iter().enumerate() {
        let store = open(tmp.path());
        store.shard_by(Shards::new(10, 1, shards));
        let ledger = store.ledger("k").expect("ledger");
        assert_eq!(sets_of(&ledger), model.sets(), "round {round}: reopened");
        for _ in 0..200 {
            // A bucket's run of ids (one shard), or ids scattered over many (lazy logins).
            let ids: Vec<u32> = if next(2) == 0 {
                let from = next(300) as u32;
                (from..from + 1 + next(12) as u32).collect()
            } else {
                (0..1 + next(20)).map(|_| next(400) as u32).collect()
            };
            match next(4) {
                0 | 1 => {
                    let got = ledger.claim(&ids).expect("claim");
                    assert_eq!(
                        got.claimed,
                        model.claim(&ids),
                        "round {round}: claim {ids:?}"
                    );
                }
                2 => {
                    ledger.mark_done(&ids).expect("done");
                    model.mark(&ids, false);
                }
                _ => {
                    ledger.mark_dead(&ids).expect("dead");
                    model.mark(&ids, true);
                }
            }
        }
        assert_eq!(sets_of(&ledger), model.sets(), "round {round}: in memory");
        if round == 3 {
            ledger.checkpoint().expect("checkpoint");
        }
        drop(ledger);
        drop(store);
        model.reopened();
        let logs = fs::read_dir(tmp.path().join("ledgers"))
            .expect("ledgers")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".log"))
            })
            .count();
        assert_eq!(logs, shards as usize, "round {round}: one log per shard");
    }
}

#[test]
fn a_sharded_revival_and_claim_span_every_shard() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    store.shard_by(Shards::new(1, 1, 4));
    let ledger = store.ledger("k").expect("ledger");
    let got = ledger.claim(&[7, 1, 2, 7, 3, 0]).expect("claim");
    assert_eq!(
        got.claimed,
        vec![7, 1, 2, 3, 0],
        "input order, a repeat once"
    );
    assert_eq!(got.already, vec![7]);
    ledger.mark_dead(&[0, 1, 2, 3]).expect("dead");
    assert_eq!(ledger.revive_dead().expect("revive"), 4);
    assert_eq!(
        ledger.claim(&[3, 2, 1, 0]).expect("again").claimed,
        [3, 2, 1, 0]
    );
    assert!(!ledger.is_done(7) && ledger.counts().dead == 0);
    ledger.mark_done(&[0, 1, 2, 3, 7]).expect("done");
    assert_eq!(
        ledger.done_now().iter().collect::<Vec<_>>(),
        [0, 1, 2, 3, 7]
    );
}

#[test]
fn shard_masks_cost_a_step_per_block_with_ids_however_far_apart() {
    // Buckets of one id up to 2^32: a walk over every bucket would take minutes.
    let ids: roaring::RoaringBitmap = [0u32, 7, 1_000_000, 4_000_000_000, u32::MAX]
        .into_iter()
        .collect();
    for shards in [Shards::new(1, 1, 4), Shards::new(1000, 3, 5)] {
        let masks = shards.masks(&ids);
        for id in &ids {
            let holders: Vec<usize> = (0..masks.len())
                .filter(|&k| masks[k].contains(id))
                .collect();
            assert_eq!(holders, [shards.of(id)], "id {id}");
        }
    }
}

/// Capped claims on the embedded store: sends count across ledgers and reopens (from the
/// log, then from the snapshot), and a send whose ledger record a crash lost is handed to its
/// ledger as in flight when the store reopens — counted once, sent once more.
#[test]
fn capped_claims_survive_reopens_and_a_crash_between_the_two_records() {
    use crate::history::Window;
    use crate::store::{claim_capped_local, Ledger, SendAt};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let caps = [Window { max: 1, per_s: 100 }];
    let slot = |store: &FileStore, t: i64| SendAt {
        slot: store.send_slot(t, 100).expect("slot"),
        t,
    };
    let ledger = |store: &FileStore, key: &str| Ledger::File(store.ledger(key).expect("ledger"));
    let run = |store: &FileStore, at: SendAt, members: &[(&str, &[u32])]| {
        let members: Vec<(Ledger, Vec<u32>)> = members
            .iter()
            .map(|(k, ids)| (ledger(store, k), ids.to_vec()))
            .collect();
        claim_capped_local(&members, at, &caps)
            .expect("local")
            .expect("claim")
            .into_iter()
            .map(|c| (c.claim.claimed, c.capped))
            .collect::<Vec<_>>()
    };
    {
        let store = open(dir);
        let at = slot(&store, 1_000);
        let got = run(&store, at, &[("a", &[1, 2, 3]), ("b", &[2, 3, 4])]);
        assert_eq!(got, [(vec![1, 2, 3], vec![]), (vec![4], vec![2, 3])]);
        // A crash between a send's history record and its ledger record.
        let history = store.history.get().expect("history");
        history.lock().record("e", at.slot, &[9]).expect("record");
    }
    {
        // Reopened from the log: user 1 was sent at 1000, so a send at 1050 is capped.
        let store = open(dir);
        let at = slot(&store, 1_050);
        let got = run(&store, at, &[("c", &[1, 4, 5, 9])]);
        assert_eq!(got, [(vec![5], vec![1, 4, 9])]);
        // The lost claim is in flight: handed out once more, not capped, not counted again.
        let e = store.ledger("e").expect("ledger e");
        assert_eq!(e.sets().claimed.iter().collect::<Vec<_>>(), [9]);
        assert_eq!(run(&store, at, &[("e", &[9])]), [(vec![9], vec![])]);
        store.checkpoint().expect("checkpoint");
        // A log this small is folded into the snapshot only when asked to.
        let history = store.history.get().expect("history");
        history.checkpoint(0).expect("history checkpoint");
    }
    {
        // Reopened from the snapshot: the window (1001, 1101] no longer holds 1000, but it
        // holds 1050 for user 5.
        let store = open(dir);
        let at = slot(&store, 1_101);
        let got = run(&store, at, &[("d", &[1, 5])]);
        assert_eq!(got, [(vec![1], vec![5])]);
        let outcomes = store.outcomes("b").expect("outcomes");
        assert_eq!(outcomes.capped.iter().collect::<Vec<_>>(), [2, 3]);
        assert!(!outcomes.delivered.contains(2));
        assert_eq!(store.granted("b").expect("granted"), [4]);
    }
}

/// Capped claims on the embedded store answer as the reference model does (the one the Redis
/// store is held to, `store::tests`), over runs at non-decreasing send times with a new
/// shard count each: batches dense enough for the first-run path and sparse ones with
/// repeats, some spanning several shards; runs that end cleanly (the history's log folded now
/// and then), by a crash with sends in flight, or by a crash between a send's history record
/// and its ledger record. After every run the outcomes, grants (read by this process and by a
/// read-only one) and every history match the model.
#[test]
fn capped_claims_follow_the_reference_model_across_shards_and_crashes() {
    use crate::history::Window;
    use crate::store::tests::CapModel;
    use crate::store::{claim_capped_local, Ledger, SendAt};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
    let caps = [
        Window { max: 2, per_s: 100 },
        Window {
            max: 5,
            per_s: 1_000,
        },
    ];
    let mut model = CapModel::default();
    let mut names: Vec<String> = Vec::new();
    let mut t = 1_700_000_000i64;
    let (mut claims, mut capped, mut resent, mut fast, mut torn) = (0, 0, 0, 0, 0);
    let (mut fresh_from, mut generation) = (70_000u32, 0);
    for run in 0..10 {
        let store = open(dir);
        store.shard_by(Shards::new(1 + next(8) as u32, 1, 1 + next(3) as u32));
        let mut at = SendAt { slot: 0, t };
        let mut keys = Vec::new();
        for _ in 0..6 {
            generation += 1;
            // A recurring campaign's ledger per occurrence, one every two generations.
            keys = vec![
                "promo".to_owned(),
                format!("hot:2026-03-02T{:02}:00:00+00:00", generation / 2),
                "coupon".to_owned(),
            ];
            let mut files = Vec::new();
            let mut index = Vec::new();
            for key in &keys {
                files.push(store.ledger(key).expect("ledger"));
                index.push(names.iter().position(|n| n == key).unwrap_or_else(|| {
                    names.push(key.clone());
                    model.ledgers.push(Default::default());
                    names.len() - 1
                }));
            }
            t += next(60) as i64;
            let slot = store.send_slot(t, 1_000).expect("send slot");
            assert_eq!(Ok(slot), model.table.alloc(t, 1_000));
            at = SendAt { slot, t };
            for _ in 0..4 {
                let mut order: Vec<usize> = (0..keys.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, next(i as u64 + 1) as usize);
                }
                order.truncate(1 + next(3) as usize);
                let members: Vec<(usize, Vec<u32>)> = order
                    .into_iter()
                    .map(|k| {
                        let ids: Vec<u32> = match next(3) {
                            // Dense and strictly ascending (the engine's batches): ids never
                            // claimed take the first-run path; some cross a 2^16 boundary.
                            0 => {
                                let from = match next(2) {
                                    0 => 65_500 + next(60) as u32,
                                    _ => {
                                        fresh_from += 100;
                                        fresh_from
                                    }
                                };
                                (from..from + 8 + next(60) as u32)
                                    .filter(|_| next(5) != 0)
                                    .collect()
                            }
                            // Sparse, now and then with repeats, over ids seen before.
                            _ => {
                                let mut ids: Vec<u32> = (0..1 + next(25))
                                    .map(|_| match next(8) {
                                        0 => 65_500 + next(60) as u32,
                                        _ => next(40) as u32,
                                    })
                                    .collect();
                                ids.sort_unstable();
                                if next(4) != 0 {
                                    ids.dedup();
                                }
                                ids
                            }
                        };
                        (k, ids)
                    })
                    .collect();
                let real: Vec<(Ledger, Vec<u32>)> = members
                    .iter()
                    .map(|(k, ids)| (Ledger::File(files[*k].clone()), ids.clone()))
                    .collect();
                let modelled: Vec<(usize, Vec<u32>)> = members
                    .iter()
                    .map(|(k, ids)| (index[*k], ids.clone()))
                    .collect();
                fast += modelled
                    .iter()
                    .filter(|(l, ids)| {
                        ids.len() >= 8
                            && ids.iter().all(|id| !model.ledgers[*l].granted.contains(id))
                    })
                    .count();
                let pending: usize = model.ledgers.iter().map(|l| l.pending.len()).sum();
                let got = claim_capped_local(&real, at, &caps)
                    .expect("local")
                    .expect("capped claim");
                let want = model.claim(&modelled, at, &caps);
                assert_eq!(got, want, "run {run}, t {t}, members {modelled:?}");
                resent += pending - model.ledgers.iter().map(|l| l.pending.len()).sum::<usize>();
                claims += got.iter().map(|c| c.claim.claimed.len()).sum::<usize>();
                capped += got.iter().map(|c| c.capped.len()).sum::<usize>();
                // Settle some of what is in flight (not what waits to be handed out again).
                let k = next(keys.len() as u64) as usize;
                let led = &mut model.ledgers[index[k]];
                let open: Vec<u32> = led
                    .sent
                    .iter()
                    .filter(|id| !led.done.contains(id) && !led.pending.contains(id))
                    .copied()
                    .filter(|_| next(3) == 0)
                    .collect();
                if next(4) == 0 {
                    files[k].mark_dead(&open).expect("dead");
                    led.dead.extend(open.iter().copied());
                } else {
                    files[k].mark_done(&open).expect("done");
                }
                led.done.extend(open);
            }
        }
        let check = |store: &FileStore, model: &CapModel, what: &str| {
            for (l, key) in names.iter().enumerate() {
                let outcomes = store.outcomes(key).expect("outcomes");
                assert_eq!(outcomes, model.outcomes(l), "{what}: {key}");
                let led = &model.ledgers[l];
                let granted: Vec<u32> = led
                    .granted
                    .iter()
                    .filter(|id| !led.capped.contains(**id))
                    .copied()
                    .collect();
                assert_eq!(
                    store.granted(key).expect("granted"),
                    granted,
                    "{what}: {key}"
                );
            }
        };
        check(&store, &model, &format!("run {run}"));
        let ids: Vec<u32> = model.histories.keys().copied().collect();
        let (table, histories) = store.histories(&ids).expect("histories");
        assert_eq!(table, model.table, "run {run}");
        let want: Vec<_> = model.histories.values().copied().collect();
        assert_eq!(histories, want, "run {run}");
        let mut lost_a_record = false;
        match next(3) {
            0 => {
                store.checkpoint().expect("checkpoint");
                if next(2) == 0 {
                    let history = store.history.get().expect("history");
                    history.checkpoint(0).expect("history checkpoint");
                }
            }
            1 => {
                // A crash between a send's two records: its history's only.
                let key = &keys[next(keys.len() as u64) as usize];
                let l = names.iter().position(|n| n == key).expect("name");
                fresh_from += 100;
                let lost: Vec<u32> = (fresh_from..fresh_from + 1 + next(20) as u32).collect();
                let history = store.history.get().expect("history");
                history.lock().record(key, at.slot, &lost).expect("record");
                for &id in &lost {
                    let h = model.histories.entry(id).or_default();
                    *h = h.with_send(&model.table, at.slot);
                    model.ledgers[l].granted.insert(id);
                    model.ledgers[l].sent.insert(id);
                }
                lost_a_record = true;
                torn += 1;
            }
            _ => {}
        }
        drop(store);
        model.crash();
        // What the files hold, read as `fanout report` does (a send whose ledger record was
        // lost is in its ledger once a writer has reopened the store), and once reopened.
        let url = format!("file:{}", dir.display());
        let read_only = || FileStore::open_read_only(&url, &dir.to_string_lossy()).expect("read");
        if !lost_a_record {
            check(&read_only(), &model, &format!("run {run}, read-only"));
        }
        let store = open(dir);
        for key in &names {
            store.ledger(key).expect("ledger");
        }
        check(&store, &model, &format!("run {run}, reopened"));
        drop(store);
        check(
            &read_only(),
            &model,
            &format!("run {run}, read-only, reopened"),
        );
    }
    eprintln!(
        "capped model: {claims} claimed ({resent} handed out again), {capped} capped, {fast} \
         first-run batches, {torn} torn"
    );
    assert!(
        claims > 500 && capped > 200 && resent > 10 && fast > 50 && torn > 0,
        "{claims} claimed ({resent} again), {capped} capped, {fast} first-run, {torn} torn"
    );
}
