//! A ledger split in shards read back whatever the shard count, and capped claims against
//! the reference model across shards and crashes.

use super::*;

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
        history
            .lock()
            .record("e", at.slot, &[9..=9])
            .expect("record");
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
                            // Gaps of one id in five or in sixteen: runs too short to take
                            // whole, and runs the ledger takes as ranges.
                            0 => {
                                let from = match next(2) {
                                    0 => 65_500 + next(60) as u32,
                                    _ => {
                                        fresh_from += 100;
                                        fresh_from
                                    }
                                };
                                let gaps = 5 + 11 * next(2);
                                (from..from + 8 + next(60) as u32)
                                    .filter(|_| next(gaps) != 0)
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
                history
                    .lock()
                    .record(key, at.slot, &crate::store::file::runs::runs_in(&lost))
                    .expect("record");
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

/// A send is recorded in the history before its ledger claim is written, and the history's
/// lock is not held in between: a checkpoint in that window must leave the send in the log,
/// for a crash before the claim to hand it to its ledger at the next open.
#[test]
fn the_history_is_not_folded_while_a_send_awaits_its_ledger_claim() {
    use crate::store::SendAt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    {
        let store = open(dir);
        let t = 1_000;
        let at = SendAt {
            slot: store.send_slot(t, 100).expect("slot"),
            t,
        };
        let history = store.history.get().expect("history");
        let mut st = history.lock_at(at).expect("slot holds the time");
        let recorded = history
            .record(&mut st, "e", at.slot, &[9..=9])
            .expect("record");
        drop(st);
        history.checkpoint(0).expect("history checkpoint");
        // The crash: the claim of 9 is never written.
        drop(recorded);
    }
    let store = open(dir);
    let e = store.ledger("e").expect("ledger e");
    assert_eq!(e.sets().claimed.iter().collect::<Vec<_>>(), [9]);
}

/// A batch of users never claimed whom a cap binds, every one: nothing is sent, so nothing
/// is written to the send history's log (a record of no sends).
#[test]
fn a_fresh_batch_capped_whole_writes_no_send() {
    use crate::history::Window;
    use crate::store::{claim_capped_local, Ledger, SendAt};
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let caps = [Window { max: 1, per_s: 100 }];
    let t = 1_000;
    let at = SendAt {
        slot: store.send_slot(t, 100).expect("slot"),
        t,
    };
    let claim = |key: &str| {
        let members = [(
            Ledger::File(store.ledger(key).expect("ledger")),
            (1..=8).collect(),
        )];
        let got = claim_capped_local(&members, at, &caps)
            .expect("local")
            .expect("claim");
        (got[0].claim.claimed.clone(), got[0].capped.clone())
    };
    assert_eq!(claim("a"), ((1..=8).collect(), vec![]));
    let log = tmp.path().join("history").join("sent.1.log");
    let before = std::fs::metadata(&log).expect("history log").len();
    assert_eq!(claim("b"), (vec![], (1..=8).collect()));
    assert_eq!(std::fs::metadata(&log).expect("history log").len(), before);
}

/// The send history takes runs, cut where they cross a page of histories: sends recorded as
/// runs around page boundaries (and up to the last id) land on exactly their ids, as the
/// history of each id read alone says, and `refused` under a cap of one send names exactly
/// the ids of the runs asked about that were sent, in order.
#[test]
fn the_send_history_takes_runs_across_its_pages() {
    use crate::history::Window;
    use crate::store::SendAt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(tmp.path());
    let t = 1_000;
    let at = SendAt {
        slot: store.send_slot(t, 100).expect("slot"),
        t,
    };
    let history = store.history.get().expect("history");
    let mut next = crate::xorshift(0x0f3a_6d21_c4b8_9e57);
    let mut sent = std::collections::BTreeSet::new();
    let asked_runs = |next: &mut dyn FnMut(u64) -> u64| {
        let mut runs = Vec::new();
        let mut at = [65_400, 131_000, u32::MAX - 70_000][next(3) as usize] + next(100) as u32;
        for _ in 0..1 + next(6) {
            let long = next(3) == 0;
            let end = at.saturating_add(next(if long { 70_000 } else { 40 }) as u32);
            runs.push(at..=end);
            match end.checked_add(2 + next(50) as u32) {
                Some(n) => at = n,
                None => break,
            }
        }
        runs
    };
    let caps = [Window { max: 1, per_s: 100 }];
    for _ in 0..40 {
        let runs = asked_runs(&mut next);
        let ids: Vec<u32> = runs.iter().flat_map(|r| r.clone()).collect();
        let mut st = history.lock_at(at).expect("slot holds the time");
        let refused = st.refused(&runs, t, &caps);
        let expected: Vec<u32> = ids.iter().copied().filter(|id| sent.contains(id)).collect();
        assert_eq!(refused, expected);
        if next(2) == 0 {
            let fresh: Vec<u32> = ids.into_iter().filter(|id| !sent.contains(id)).collect();
            let fresh_runs = super::super::runs::runs_in(&fresh);
            drop(
                history
                    .record(&mut st, "e", at.slot, &fresh_runs)
                    .expect("record"),
            );
            sent.extend(fresh);
        }
    }
    assert!(sent.len() > 100_000, "{}", sent.len());
    let st = history.lock();
    let edges = [
        65_535,
        65_536,
        131_071,
        131_072,
        u32::MAX - 65_536,
        u32::MAX,
    ];
    for &id in sent.iter().step_by(97).chain(&edges) {
        let sends = st.get(id).sends(&st.table).len();
        assert_eq!(sends, usize::from(sent.contains(&id)), "{id}");
    }
    for id in (65_300..66_000).chain(130_900..131_300) {
        let sends = st.get(id).sends(&st.table).len();
        assert_eq!(sends, usize::from(sent.contains(&id)), "{id}");
    }
}
