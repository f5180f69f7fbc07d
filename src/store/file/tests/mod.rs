//! Tests of the on-disk behaviour: escaping, snapshots and checkpoints, the lock, read-only
//! opens; the log's records ([`log`]); shards and capped claims ([`shards`]).

use std::fs;
use std::path::{Path, PathBuf};

use super::format::{file_stem, Stamp};
use super::*;
use crate::store::LedgerCounts;

mod log;
mod shards;

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
