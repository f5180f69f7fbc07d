//! Tests of the store through its public API, including a kill -9 of a writing process.

use super::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// The embedded ledger behind `l` (these tests are about the file store).
fn file(l: &Ledger) -> &file::FileLedger {
    match l {
        Ledger::File(f) => f,
        Ledger::Redis(_) => panic!("a file store test got a Redis ledger"),
    }
}

fn url(dir: &Path) -> String {
    format!("file:{}", dir.display())
}

/// Opens the store in `dir`, waiting a moment while its lock is still held: a test that spawns
/// a child process (`kill_9_loses_no_claim`) gives the child a copy of every descriptor open at
/// that instant — a just-dropped store's lock among them — until the child execs. Another
/// process's lock is still refused, after 5 s.
fn open(dir: &Path) -> Store {
    let started = std::time::Instant::now();
    loop {
        match Store::open(&url(dir)) {
            Ok(store) => return store,
            Err(e) if e.to_string().contains("in use") && started.elapsed().as_secs() < 5 => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("open {}: {e}", dir.display()),
        }
    }
}

async fn ledger(store: &Store, key: &str) -> Ledger {
    store.ledger(key).await.expect("ledger")
}

/// A run's store is made durable on a timer ([`Store::sync_every`]): what a claim appended is
/// fsynced about a second later, with nothing else calling for it, and not at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_every_fsyncs_what_was_appended() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let l = ledger(&store, "c").await;
    l.claim(&[1, 2, 3]).await.expect("claim");
    assert!(file(&l).unsynced(), "a claim's record waits for a sync");
    let syncing = tokio::spawn({
        let store = store.clone();
        async move { store.sync_every().await }
    });
    tokio::time::sleep(SYNC_EVERY * 3 / 10).await;
    assert!(file(&l).unsynced(), "synced before its period");
    // Whether the ledger is synced within 4 periods.
    let synced = || async {
        let deadline = std::time::Instant::now() + SYNC_EVERY * 4;
        while file(&l).unsynced() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        !file(&l).unsynced()
    };
    assert!(synced().await, "not synced within 4 periods");
    // It goes on: a later record is synced too.
    l.claim(&[4]).await.expect("claim");
    assert!(synced().await, "the second record was not synced");
    assert!(!syncing.is_finished(), "sync_every ended: {syncing:?}");
    syncing.abort();
}

#[test]
fn urls_are_checked() {
    let usage = |u: &str| match Store::open(u) {
        Err(Error::Usage(msg)) => msg,
        other => panic!("{u}: expected a usage error, got {other:?}"),
    };
    assert!(usage("redis://localhost:6379/0").contains("Store::connect"));
    assert!(usage("rediss://user:secret@h:1/0").contains("Store::connect"));
    assert!(
        !usage("rediss://user:secret@h:1/0").contains("secret"),
        "a password was printed"
    );
    assert!(usage("s3://bucket").starts_with("unsupported store URL"));
    assert!(usage("file:").contains("names no directory"));
    assert!(usage(".fanout").starts_with("unsupported store URL"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let triple = format!("file://{}", tmp.path().join("s").display());
    let store = Store::open(&triple).expect("file:// URL");
    assert_eq!(store.url(), triple);
    assert!(tmp.path().join("s/LOCK").exists());
}

#[tokio::test]
async fn claims_once_including_duplicates_in_a_batch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let l = ledger(&store, "spring-sale-2026").await;
    let c = l.claim(&[7, 3, 7, 9, 3]).await.expect("claim");
    assert_eq!(c.claimed, vec![7, 3, 9]);
    assert_eq!(c.already, vec![7, 3]);
    let c = l.claim(&[9, 1]).await.expect("claim");
    assert_eq!((c.claimed, c.already), (vec![1], vec![9]));
    // The cache hands back the same ledger.
    let again = ledger(&store, "spring-sale-2026").await;
    assert_eq!(again.claim(&[1]).await.expect("claim").already, vec![1]);
    // Ledgers are independent.
    let other = ledger(&store, "hot-1:2026-03-02T10:00:00+00:00").await;
    assert_eq!(other.claim(&[1]).await.expect("claim").claimed, vec![1]);
    assert_eq!(
        store.granted("spring-sale-2026").await.expect("g"),
        vec![1, 3, 7, 9]
    );
    assert!(store.granted("never-opened").await.expect("g").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_hand_each_id_out_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let l = ledger(&store, "k").await;
    let tasks: Vec<_> = (1..=4u32)
        .map(|stride| {
            let l = l.clone();
            tokio::spawn(async move {
                let ids: Vec<u32> = (0..10_000u32)
                    .map(|i| (i * stride * 7919) % 10_000)
                    .collect();
                let mut mine = Vec::new();
                for batch in ids.chunks(64) {
                    mine.extend(l.claim(batch).await.expect("claim").claimed);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "an id was handed out twice");
    assert_eq!(all, store.granted("k").await.expect("granted"));
}

#[tokio::test]
async fn reopen_keeps_done_and_hands_in_flight_ids_out_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let store = open(tmp.path());
        let l = ledger(&store, "k").await;
        l.claim(&[1, 2, 3, 4]).await.expect("claim");
        l.mark_done(&[1]).await.expect("done");
        l.mark_dead(&[2]).await.expect("dead");
        // Dropped without a checkpoint: a crash with 3 and 4 in flight.
    }
    let store = open(tmp.path());
    let l = ledger(&store, "k").await;
    assert!(file(&l).is_done(1) && file(&l).is_done(2) && !file(&l).is_done(3));
    assert_eq!(
        file(&l).counts(),
        LedgerCounts {
            claimed: 4,
            done: 2,
            dead: 1
        }
    );
    let c = l.claim(&[1, 2, 3, 4, 5, 3]).await.expect("claim");
    assert_eq!((c.claimed, c.already), (vec![3, 4, 5], vec![1, 2, 3]));
    assert_eq!(
        l.claim(&[3, 4, 5]).await.expect("claim").already,
        vec![3, 4, 5]
    );
    l.mark_done(&[3]).await.expect("done");
    drop((l, store));
    // 4 and 5 were in flight at this second crash: out once more, 3 is done.
    let store = open(tmp.path());
    let l = ledger(&store, "k").await;
    let c = l.claim(&[3, 4, 5]).await.expect("claim");
    assert_eq!((c.claimed, c.already), (vec![4, 5], vec![3]));
}

#[tokio::test]
async fn checkpoint_then_more_records_reopens_to_the_same_sets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let expect_sets = |l: &Ledger| {
        (
            file(l).counts(),
            (0..12)
                .filter(|&i| file(l).is_done(i))
                .collect::<Vec<u32>>(),
        )
    };
    let (after_checkpoint, at_end) = {
        let store = open(tmp.path());
        let l = ledger(&store, "k").await;
        l.claim(&[1, 2, 3, 4, 5]).await.expect("claim");
        l.mark_done(&[1, 2]).await.expect("done");
        l.mark_dead(&[3]).await.expect("dead");
        store.sync().await.expect("sync");
        store.checkpoint().await.expect("checkpoint");
        let after_checkpoint = expect_sets(&l);
        l.claim(&[10, 11]).await.expect("claim");
        l.mark_done(&[4, 10]).await.expect("done");
        store.sync().await.expect("sync");
        (after_checkpoint, expect_sets(&l))
    };
    let store = open(tmp.path());
    let l = ledger(&store, "k").await;
    assert_eq!(expect_sets(&l), at_end);
    assert_eq!(
        store.granted("k").await.expect("g"),
        vec![1, 2, 3, 4, 5, 10, 11]
    );
    store.checkpoint().await.expect("checkpoint");
    drop((l, store));
    let store = open(tmp.path());
    let l = ledger(&store, "k").await;
    assert_eq!(expect_sets(&l), at_end);
    assert_ne!(after_checkpoint, at_end);
    // 5 and 11 were never done: still in flight after the checkpoint, handed out once.
    assert_eq!(
        l.claim(&[5, 11, 4]).await.expect("claim").claimed,
        vec![5, 11]
    );
}

#[tokio::test]
async fn revived_dead_letters_are_handed_out_once_more() {
    let tmp = tempfile::tempdir().expect("tempdir");
    {
        let store = open(tmp.path());
        let l = ledger(&store, "k").await;
        assert_eq!(l.revive_dead().await.expect("revive"), 0);
        l.claim(&[1, 2, 3, 4, 5]).await.expect("claim");
        l.mark_done(&[1]).await.expect("done");
        l.mark_dead(&[2, 3]).await.expect("dead");
        assert_eq!(l.revive_dead().await.expect("revive"), 2);
        let counts = LedgerCounts {
            claimed: 5,
            done: 1,
            dead: 0,
        };
        assert_eq!(file(&l).counts(), counts);
        // 4 and 5 are still out with this process; 2 and 3 go out once more.
        let c = l.claim(&[1, 2, 3, 4, 5]).await.expect("claim");
        assert_eq!((c.claimed, c.already), (vec![2, 3], vec![1, 4, 5]));
        assert_eq!(l.claim(&[2, 3]).await.expect("claim").already, vec![2, 3]);
        l.mark_done(&[2]).await.expect("done");
        l.mark_dead(&[3]).await.expect("dead again");
    }
    // The revival and what followed it survive a reopen (no checkpoint in between).
    let store = open(tmp.path());
    let l = ledger(&store, "k").await;
    assert_eq!(
        file(&l).counts(),
        LedgerCounts {
            claimed: 5,
            done: 3,
            dead: 1
        }
    );
    assert!(file(&l).is_done(2) && file(&l).is_done(3));
    assert_eq!(l.revive_dead().await.expect("revive"), 1);
    drop((l, store));
    // Revived but not yet sent when the process ended: still out once more.
    let store = open(tmp.path());
    let l = ledger(&store, "k").await;
    let c = l.claim(&[1, 2, 3]).await.expect("claim");
    assert_eq!((c.claimed, c.already), (vec![3], vec![1, 2]));
    drop((l, store));
    let ro = Store::open_read_only(&url(tmp.path())).expect("read-only");
    assert!(ledger(&ro, "k").await.revive_dead().await.is_err());
}

const CHILD_ENV: &str = "FANOUT_STORE_KILL9_DIR";
const BATCH: u32 = 100;

/// Child half of `kill_9_loses_no_claim`: claims batches until killed. Does nothing when run
/// as an ordinary test.
#[test]
fn kill9_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = Store::open(&format!("file:{dir}")).expect("child open");
        let l = ledger(&store, "k").await;
        for b in 0..1_000_000u32 {
            let ids: Vec<u32> = (b * BATCH..(b + 1) * BATCH).collect();
            assert_eq!(l.claim(&ids).await.expect("claim").claimed, ids);
            println!("claimed {}", ids[ids.len() - 1]);
            if b % 2 == 1 {
                l.mark_done(&ids).await.expect("done");
            }
        }
    });
}

#[tokio::test]
async fn kill_9_loses_no_claim() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let test_name = concat!(module_path!(), "::kill9_child");
    let test_name = test_name
        .split_once("::")
        .map_or(test_name, |(_, rest)| rest);
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut reported = Vec::new();
    while reported.len() < 300 {
        let line = lines.next().expect("child ended early").expect("read");
        if let Some(id) = line.strip_prefix("claimed ") {
            reported.push(id.parse::<u32>().expect("id"));
        }
    }
    child.kill().expect("SIGKILL");
    // Lines the child wrote before it died count too.
    for line in lines {
        if let Some(id) = line.expect("read").strip_prefix("claimed ") {
            reported.push(id.parse::<u32>().expect("id"));
        }
    }
    let status = child.wait().expect("wait");
    assert!(!status.success(), "child finished before the kill");

    let store = open(tmp.path());
    let granted = store.granted("k").await.expect("granted");
    let l = ledger(&store, "k").await;
    let last = *reported.last().expect("reports");
    for id in 0..=last {
        assert!(granted.binary_search(&id).is_ok(), "claim of {id} was lost");
    }
    // Every reported id is either done or handed out once more, never twice.
    let ids: Vec<u32> = (0..=last).collect();
    let c = l.claim(&ids).await.expect("claim");
    assert!(c.claimed.iter().all(|&id| !file(&l).is_done(id)));
    assert_eq!(c.claimed.len() + c.already.len(), ids.len());
    assert!(l.claim(&ids).await.expect("claim").claimed.is_empty());
    eprintln!("kill -9 after {} reported batches", reported.len());
}

/// The naive model of one ledger: plain sets and per-id rules.
#[derive(Default)]
struct Model {
    claimed: std::collections::BTreeSet<u32>,
    done: std::collections::BTreeSet<u32>,
    pending: std::collections::BTreeSet<u32>,
    dead: RoaringBitmap,
    unreachable: RoaringBitmap,
    held_out: RoaringBitmap,
    quiet: RoaringBitmap,
    cancelled: RoaringBitmap,
}

/// Which outcome set of the [`Model`] a settling step tags.
type Tag = fn(&mut Model) -> &mut RoaringBitmap;

impl Model {
    /// A hold for quiet hours: (held, already), per id in order.
    fn hold_quiet(&mut self, ids: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let (mut held, mut already) = (Vec::new(), Vec::new());
        let mut seen = std::collections::BTreeSet::new();
        for &id in ids {
            if self.claimed.contains(&id) || !seen.insert(id) {
                already.push(id);
            } else {
                held.push(id);
                self.quiet.insert(id);
            }
        }
        (held, already)
    }

    /// A claim (settled at once in `settle` unless `None`: held out, cancelled): (claimed,
    /// already), per id in order.
    fn claim(&mut self, ids: &[u32], settle: Option<Tag>) -> (Vec<u32>, Vec<u32>) {
        let (mut claimed, mut already) = (Vec::new(), Vec::new());
        for &id in ids {
            if self.done.contains(&id) {
                already.push(id);
            } else if self.claimed.insert(id) || self.pending.remove(&id) {
                claimed.push(id);
                if let Some(tag) = settle {
                    self.done.insert(id);
                    tag(self).insert(id);
                }
            } else {
                already.push(id);
            }
        }
        (claimed, already)
    }

    /// A mark: done, and tagged in `tag` unless `None`.
    fn mark(&mut self, ids: &[u32], tag: Option<Tag>) {
        for &id in ids {
            self.claimed.insert(id);
            self.done.insert(id);
            self.pending.remove(&id);
            if let Some(tag) = tag {
                tag(self).insert(id);
            }
        }
    }

    /// The outcomes the store must report.
    fn outcomes(&self) -> Outcomes {
        let claimed: RoaringBitmap = self.claimed.iter().copied().collect();
        let done: RoaringBitmap = self.done.iter().copied().collect();
        Outcomes {
            delivered: &(&(&(&done - &self.dead) - &self.unreachable) - &self.held_out)
                - &self.cancelled,
            dead_lettered: self.dead.clone(),
            unreachable: self.unreachable.clone(),
            held_out: self.held_out.clone(),
            in_flight: &claimed - &done,
            quiet_held: &self.quiet - &claimed,
            capped: RoaringBitmap::new(),
            cancelled: self.cancelled.clone(),
        }
    }
}

/// The set-operation path (ascending batches) and the per-id path (any order) follow the
/// same rules, for claims, held-out and cancelled claims, quiet-hours holds and every kind of
/// mark: both
/// checked against a naive model over random operations and crashes (a reopen: what was
/// claimed and not settled is handed out once more).
#[tokio::test]
async fn claims_follow_the_naive_model_in_any_batch_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
    let mut model = Model::default();
    for _crash in 0..4 {
        let store = open(tmp.path());
        let l = ledger(&store, "model").await;
        model.pending = model.claimed.difference(&model.done).copied().collect();
        for _ in 0..300 {
            let start = next(3000) as u32;
            // A quarter of the batches are consecutive ids (the stores take those as a range),
            // a quarter ascending runs with a gap now and then (a task's sends once policy set
            // some users apart: runs the file store takes as ranges while they average eight
            // ids or more).
            let mut ids: Vec<u32> = match next(4) {
                0 => (start..start + next(300) as u32).collect(),
                1 => {
                    let gaps = 2 + next(20);
                    let mut id = start;
                    (0..next(300))
                        .map(|_| {
                            id += 1 + u32::from(next(gaps) == 0) * (1 + next(4) as u32);
                            id
                        })
                        .collect()
                }
                _ => (0..next(300) as u32)
                    .map(|i| start + i * (1 + next(3) as u32))
                    .collect(),
            };
            if next(3) == 0 {
                ids.reverse();
                ids.extend(ids.clone().iter().take(5));
            }
            match next(10) {
                8 => {
                    let c = l.claim_cancelled(&ids).await.expect("claim cancelled");
                    let want = model.claim(&ids, Some(|m| &mut m.cancelled));
                    assert_eq!((c.claimed, c.already), want);
                }
                9 => {
                    l.mark_cancelled(&ids).await.expect("cancelled");
                    model.mark(&ids, Some(|m| &mut m.cancelled));
                }
                7 => {
                    let c = l.hold_quiet(&ids).await.expect("hold");
                    assert_eq!((c.claimed, c.already), model.hold_quiet(&ids));
                }
                0..=2 => {
                    let c = l.claim(&ids).await.expect("claim");
                    assert_eq!((c.claimed, c.already), model.claim(&ids, None));
                }
                3 => {
                    let c = l.claim_held_out(&ids).await.expect("claim held out");
                    let want = model.claim(&ids, Some(|m| &mut m.held_out));
                    assert_eq!((c.claimed, c.already), want);
                }
                4 => {
                    l.mark_done(&ids).await.expect("done");
                    model.mark(&ids, None);
                }
                5 => {
                    l.mark_dead(&ids).await.expect("dead");
                    model.mark(&ids, Some(|m| &mut m.dead));
                }
                _ => {
                    l.mark_unreachable(&ids).await.expect("unreachable");
                    model.mark(&ids, Some(|m| &mut m.unreachable));
                }
            }
        }
        assert_eq!(file(&l).counts().claimed, model.claimed.len() as u64);
        assert_eq!(file(&l).counts().done, model.done.len() as u64);
        assert_eq!(
            store.outcomes("model").await.expect("outcomes"),
            model.outcomes()
        );
        if next(2) == 0 {
            store.checkpoint().await.expect("checkpoint");
        }
    }
    // Read back from the files by a read-only store, after a last checkpoint.
    let read = Store::open_read_only(&url(tmp.path())).expect("read-only");
    assert_eq!(
        read.outcomes("model").await.expect("outcomes"),
        model.outcomes()
    );
}

#[tokio::test]
async fn a_file_stores_fence_always_passes_and_abandon_does_nothing() {
    fn shareable<T: Send + Sync + std::fmt::Debug + Default + Clone>(_: &T) {}
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let fence = store.fence();
    shareable(&fence);
    fence
        .check()
        .expect("the directory lock already excludes a second writer");
    Fence::default().check().expect("the default fence");
    let l = ledger(&store, "k").await;
    assert_eq!(l.claim(&[1, 2]).await.expect("claim").claimed, vec![1, 2]);
    store.abandon().await.expect("abandon");
    // Still this process's: the lock is held until the store is dropped.
    assert_eq!(l.claim(&[2, 3]).await.expect("claim").claimed, vec![3]);
}

/// An unclaimed id (claimed here, never settled) is handed out once more by the next claim;
/// a settled one is not, and an id never claimed stays a plain new claim.
#[tokio::test]
async fn unclaimed_ids_are_handed_out_once_more() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let l = ledger(&store, "cut").await;
    assert_eq!(
        l.claim(&[1, 2, 3, 4]).await.expect("claim").claimed,
        [1, 2, 3, 4]
    );
    l.mark_done(&[2]).await.expect("done");
    l.unclaim(&[1, 2, 3, 9]).await.expect("unclaim");
    let c = l.claim(&[1, 2, 3, 4, 9]).await.expect("claim");
    assert_eq!((c.claimed, c.already), (vec![1, 3, 9], vec![2, 4]));
    // Once only.
    assert_eq!(l.claim(&[1, 3]).await.expect("claim").already, [1, 3]);
}

mod cap_model;
mod redis_caps;

pub(super) use cap_model::CapModel;
