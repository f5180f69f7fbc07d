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
            // A quarter of the batches are consecutive ids (the stores take those as a range).
            let consecutive = next(4) == 0;
            let mut ids: Vec<u32> = (0..next(300) as u32)
                .map(|i| start + i * (1 + if consecutive { 0 } else { next(3) as u32 }))
                .collect();
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

// --- Frequency caps on the Redis store, against `crate::history` as the reference. ---

use super::redis::redis_server::RedisServer;
use std::collections::BTreeSet;

use super::redis::history::HISTORY_USERS;
use crate::history::{History, SendTimes, Window};

/// A Redis store of `server` for one run, with a 1 s lease.
async fn redis_run(server: &RedisServer) -> Arc<super::redis::RedisStore> {
    let lease = std::time::Duration::from_secs(1);
    Arc::new(
        super::redis::RedisStore::open_with(&server.url(0), false, None, lease)
            .await
            .expect("open redis"),
    )
}

/// A plain connection to `server`, for reading the keys behind the store's back.
async fn redis_con(server: &RedisServer) -> ::redis::aio::ConnectionManager {
    super::redis::connect("test", &server.url(0))
        .await
        .expect("connect")
}

/// The bytes of `key` (empty when missing).
async fn redis_get(con: &mut ::redis::aio::ConnectionManager, key: &str) -> Vec<u8> {
    let v: Option<Vec<u8>> = ::redis::cmd("GET")
        .arg(key)
        .query_async(con)
        .await
        .expect("GET");
    v.unwrap_or_default()
}

/// The model of one ledger under capped claims.
#[derive(Default)]
pub(super) struct CapLedger {
    pub(super) granted: std::collections::BTreeSet<u32>,
    /// Claimed for sending (in flight until done).
    pub(super) sent: std::collections::BTreeSet<u32>,
    pub(super) done: std::collections::BTreeSet<u32>,
    /// In flight at a dead run's end: handed out once more.
    pub(super) pending: std::collections::BTreeSet<u32>,
    pub(super) dead: RoaringBitmap,
    pub(super) capped: RoaringBitmap,
}

/// The naive model of capped claims: the reference table and histories, plain sets per ledger
/// (each store is held to it: this module's Redis tests, `file::tests` the embedded store's).
#[derive(Default)]
pub(super) struct CapModel {
    pub(super) table: SendTimes,
    pub(super) histories: std::collections::BTreeMap<u32, History>,
    pub(super) ledgers: Vec<CapLedger>,
}

impl CapModel {
    /// A capped claim of `(ledger index, ids)` members, in order.
    pub(super) fn claim(
        &mut self,
        members: &[(usize, Vec<u32>)],
        at: SendAt,
        caps: &[Window],
    ) -> Vec<CappedClaim> {
        let CapModel {
            table,
            histories,
            ledgers,
        } = self;
        members
            .iter()
            .map(|(l, ids)| {
                let led = &mut ledgers[*l];
                let mut out = CappedClaim::default();
                for &id in ids {
                    if !led.granted.insert(id) {
                        match led.pending.remove(&id) {
                            true => out.claim.claimed.push(id),
                            false => out.claim.already.push(id),
                        }
                        continue;
                    }
                    let h = histories.entry(id).or_default();
                    if h.admits(table, at.t, caps) {
                        *h = h.with_send(table, at.slot);
                        led.sent.insert(id);
                        out.claim.claimed.push(id);
                    } else {
                        led.capped.insert(id);
                        out.capped.push(id);
                    }
                }
                out
            })
            .collect()
    }

    /// A new run: what was in flight is handed out once more.
    pub(super) fn crash(&mut self) {
        for led in &mut self.ledgers {
            led.pending = led.sent.difference(&led.done).copied().collect();
        }
    }

    pub(super) fn outcomes(&self, l: usize) -> Outcomes {
        let led = &self.ledgers[l];
        let done: RoaringBitmap = led.done.iter().copied().collect();
        let sent: RoaringBitmap = led.sent.iter().copied().collect();
        Outcomes {
            delivered: &done - &led.dead,
            dead_lettered: led.dead.clone(),
            in_flight: &sent - &done,
            capped: led.capped.clone(),
            ..Outcomes::default()
        }
    }

    /// The history strings the store must hold (`id / HISTORY_USERS`).
    fn history_keys(&self) -> BTreeSet<u32> {
        self.histories.keys().map(|id| id / HISTORY_USERS).collect()
    }

    /// History string `key` as the store must hold it, up to `len` bytes.
    fn history_bytes(&self, key: u32, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let first = u64::from(key) * u64::from(HISTORY_USERS);
        let last = (first + u64::from(HISTORY_USERS) - 1).min(u64::from(u32::MAX)) as u32;
        for (&id, h) in self.histories.range(first as u32..=last) {
            let at = (u64::from(id) - first) as usize * 8;
            if let Some(bytes) = out.get_mut(at..at + 8) {
                bytes.copy_from_slice(&h.0.to_le_bytes());
            }
        }
        out
    }
}

/// Capped claims over three ledgers at a time (two campaigns and the current occurrence of
/// a recurring one), at non-decreasing send times over several runs (some ending in a crash
/// with sends in flight, adopted and handed out again by the next), answer as the reference
/// model does; outcomes, grants and the history bytes match it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capped_claims_on_redis_follow_the_reference_model() {
    let server = RedisServer::start();
    server.cli(&["CONFIG", "SET", "appendfsync", "no"]);
    let mut con = redis_con(&server).await;
    let mut next = crate::xorshift(0x9e37_79b9_7f4a_7c15u64);
    let caps = [
        Window { max: 2, per_s: 100 },
        Window {
            max: 5,
            per_s: 1_000,
        },
    ];
    let horizon = 1_000;
    let mut model = CapModel::default();
    let mut names: Vec<String> = Vec::new();
    let mut t = 1_700_000_000i64;
    let (mut claims, mut capped, mut resent, mut generation) = (0, 0, 0, 0);
    for run in 0..6 {
        let store = redis_run(&server).await;
        for _ in 0..8 {
            generation += 1;
            // A recurring campaign's ledger per occurrence, one every two generations.
            let keys = [
                "promo".to_owned(),
                format!("hot:2026-03-02T{:02}:00:00+00:00", generation / 2),
                "coupon".to_owned(),
            ];
            let mut ledgers = Vec::new();
            let mut index = Vec::new();
            for key in &keys {
                ledgers.push(Ledger::Redis(store.ledger(key).await.expect("ledger")));
                index.push(names.iter().position(|n| n == key).unwrap_or_else(|| {
                    names.push(key.clone());
                    model.ledgers.push(CapLedger::default());
                    names.len() - 1
                }));
            }
            t += next(60) as i64;
            let slot = store.send_slot(t, horizon).await.expect("send slot");
            assert_eq!(Ok(slot), model.table.alloc(t, horizon));
            let at = SendAt { slot, t };
            for _ in 0..4 {
                // One to three distinct ledgers in a random order, each with sorted ids
                // (a duplicate now and then), a few in chunk 1.
                let mut order: Vec<usize> = (0..keys.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, next(i as u64 + 1) as usize);
                }
                order.truncate(1 + next(3) as usize);
                let members: Vec<(usize, Vec<u32>)> = order
                    .into_iter()
                    .map(|k| {
                        let mut ids: Vec<u32> = (0..1 + next(25))
                            .map(|_| match next(8) {
                                0 => (1 << 24) + next(10) as u32,
                                _ => next(40) as u32,
                            })
                            .collect();
                        ids.sort_unstable();
                        if next(4) != 0 {
                            ids.dedup();
                        }
                        (k, ids)
                    })
                    .collect();
                let real: Vec<(Ledger, Vec<u32>)> = members
                    .iter()
                    .map(|(k, ids)| (ledgers[*k].clone(), ids.clone()))
                    .collect();
                let modelled: Vec<(usize, Vec<u32>)> = members
                    .iter()
                    .map(|(k, ids)| (index[*k], ids.clone()))
                    .collect();
                let pending: usize = model.ledgers.iter().map(|l| l.pending.len()).sum();
                let got = claim_capped(&real, at, &caps).await.expect("capped claim");
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
                    ledgers[k].mark_dead(&open).await.expect("dead");
                    led.dead.extend(open.iter().copied());
                } else {
                    ledgers[k].mark_done(&open).await.expect("done");
                }
                led.done.extend(open);
            }
        }
        for (l, key) in names.iter().enumerate() {
            assert_eq!(
                store.outcomes(key).await.expect("outcomes"),
                model.outcomes(l),
                "{key}"
            );
            let led = &model.ledgers[l];
            let granted: Vec<u32> = led
                .granted
                .iter()
                .filter(|id| !led.capped.contains(**id))
                .copied()
                .collect();
            assert_eq!(store.granted(key).await.expect("granted"), granted);
        }
        for key in model.history_keys() {
            let bytes = redis_get(&mut con, &format!("fanout:history:{key}")).await;
            assert_eq!(
                bytes,
                model.history_bytes(key, bytes.len()),
                "history string {key}"
            );
            assert!(model.history_bytes(key, bytes.len() + 64)[bytes.len()..]
                .iter()
                .all(|&b| b == 0));
        }
        assert_eq!(store.send_times().await.expect("table"), model.table);
        // End the run: cleanly (what is in flight is left for the next run) or by a crash
        // (the lease dropped at once, as a failed run does).
        match next(2) {
            0 => store.close().await.expect("close"),
            _ => store.abandon().await.expect("abandon"),
        }
        model.crash();
    }
    eprintln!("capped model: {claims} claimed ({resent} handed out again), {capped} capped");
    assert!(
        claims > 200 && capped > 200 && resent > 10,
        "{claims} claimed ({resent} again), {capped} capped"
    );
}

/// The send-time table on Redis allocates as [`SendTimes::alloc`] does, through two era
/// changes (a half refused while the longest window still reaches into the other, then
/// reused), with repeated and earlier times; capped claims along the way write the same
/// history bytes as the reference, stale slots dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_send_time_table_allocates_as_the_reference_across_eras() {
    let server = RedisServer::start();
    server.cli(&["CONFIG", "SET", "appendfsync", "no"]);
    let mut con = redis_con(&server).await;
    let store = redis_run(&server).await;
    let mut next = crate::xorshift(0x2545_f491_4f6c_dd1du64);
    let mut model = CapModel::default();
    let caps = [
        Window { max: 2, per_s: 500 },
        Window {
            max: 3,
            per_s: 1_000,
        },
    ];
    let (mut t, mut used, mut refused, mut calls) = (1_000_000i64, Vec::new(), false, 0u32);
    let err_text = |e: crate::error::Error| e.to_string();
    // Time 0 is refused in the reference's words.
    let zero = model.table.alloc(0, 1_000).unwrap_err();
    let got = store
        .send_slot(0, 1_000)
        .await
        .map_err(err_text)
        .unwrap_err();
    assert!(got.ends_with(&zero), "{got}");
    while model.table.era() < 2 || calls < 4_150 {
        let era = model.table.era();
        let half = if era % 2 == 0 { 1..2048 } else { 2048..4096 };
        let full = model.table.times()[half].iter().all(|&x| x != 0);
        let (at, horizon) = if era == 1 && full && !refused {
            // Half 0's newest time is 2048 s back: inside a 3000 s window, so not reused.
            refused = true;
            t += 1;
            (t, 3_000)
        } else if next(40) == 0 && !used.is_empty() {
            (used[next(used.len() as u64) as usize], 1_000)
        } else {
            t += if refused && era == 1 {
                1_000
            } else {
                next(3) as i64
            };
            (t, 200 + next(800) as i64)
        };
        calls += 1;
        let want = model.table.alloc(at, horizon);
        let got = store.send_slot(at, horizon).await.map_err(err_text);
        match (&got, &want) {
            (Ok(g), Ok(w)) => assert_eq!(g, w, "t {at}"),
            (Err(g), Err(w)) => assert!(g.ends_with(w.as_str()), "{g} / {w}"),
            _ => panic!("t {at}: store {got:?}, reference {want:?}"),
        }
        let Ok(slot) = want else { continue };
        used.push(at);
        if calls.is_multiple_of(150) {
            let key = format!("era-{calls}");
            let ledger = Ledger::Redis(store.ledger(&key).await.expect("ledger"));
            let ids: Vec<u32> = (0..24).filter(|_| next(3) != 0).collect();
            let members = [(ledger, ids.clone())];
            model.ledgers.push(CapLedger::default());
            let l = model.ledgers.len() - 1;
            let at = SendAt { slot, t: at };
            let got = claim_capped(&members, at, &caps)
                .await
                .expect("capped claim");
            assert_eq!(got, model.claim(&[(l, ids)], at, &caps), "call {calls}");
        }
        if calls.is_multiple_of(1_000) {
            assert_eq!(store.send_times().await.expect("table"), model.table);
        }
    }
    assert!(refused, "the refusal was never reached");
    assert_eq!(store.send_times().await.expect("table"), model.table);
    for key in model.history_keys() {
        let bytes = redis_get(&mut con, &format!("fanout:history:{key}")).await;
        assert_eq!(
            bytes,
            model.history_bytes(key, bytes.len()),
            "history {key}"
        );
    }
    eprintln!(
        "send-time table: {calls} allocations, era {}",
        model.table.era()
    );
}

/// A user's send history costs 8 bytes on Redis: after N users each got one capped send,
/// the history string is 8 N bytes long, and its memory is that up to the allocator's
/// rounding (jemalloc's size classes are at most 25% apart) and a small constant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_send_history_costs_eight_bytes_on_redis() {
    let server = RedisServer::start();
    server.cli(&["CONFIG", "SET", "appendfsync", "no"]);
    let store = redis_run(&server).await;
    let slot = store.send_slot(1_000, 86_400).await.expect("slot");
    let at = SendAt { slot, t: 1_000 };
    let caps = [Window {
        max: 1,
        per_s: 86_400,
    }];
    let n: u32 = 100_000;
    let ledger = Ledger::Redis(store.ledger("memory").await.expect("ledger"));
    for batch in (0..n).collect::<Vec<u32>>().chunks(10_000) {
        let got = claim_capped(&[(ledger.clone(), batch.to_vec())], at, &caps)
            .await
            .expect("capped claim");
        assert_eq!(got[0].claim.claimed, batch);
    }
    let keys: Vec<String> = (0..=(n - 1) / HISTORY_USERS)
        .map(|k| format!("fanout:history:{k}"))
        .collect();
    let sum = |cmd: &str| -> u64 {
        keys.iter()
            .map(|k| {
                let args: Vec<&str> = cmd.split(' ').chain([k.as_str()]).collect();
                server.cli(&args).parse::<u64>().expect(cmd)
            })
            .sum()
    };
    let grown = sum("MEMORY USAGE");
    // The end of the run rewrites each string at its exact size.
    store.close().await.expect("close");
    let (len, usage) = (sum("STRLEN"), sum("MEMORY USAGE"));
    let full: u64 = server
        .cli(&["MEMORY", "USAGE", "fanout:history:0"])
        .parse()
        .expect("MEMORY USAGE");
    eprintln!(
        "history of {n} users: {len} bytes ({:.2} a user), MEMORY USAGE {usage} ({:.3} a \
         user; {grown} before the end of the run compacted it); a full string: {full} for \
         {HISTORY_USERS} users ({:.4} a user)",
        len as f64 / f64::from(n),
        usage as f64 / f64::from(n),
        full as f64 / f64::from(HISTORY_USERS)
    );
    assert_eq!(len, 8 * u64::from(n));
    // A full string fills its allocation exactly: 8 bytes a user and the key's own cost.
    assert!(
        full <= 8 * u64::from(HISTORY_USERS) + 256,
        "{full} bytes for a full history string"
    );
    assert!(usage <= len + len / 4 + 256, "{usage} bytes for {n} users");
}
