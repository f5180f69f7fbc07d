//! Frequency caps on the Redis store, against `crate::history` and [`CapModel`] as the
//! reference.

use super::cap_model::CapLedger;
use super::*;
use crate::history::Window;
use crate::store::redis::history::HISTORY_USERS;
use crate::store::redis::redis_server::RedisServer;

/// A Redis store of `server` for one run, with a 1 s lease.
async fn redis_run(server: &RedisServer) -> Arc<crate::store::redis::RedisStore> {
    let lease = std::time::Duration::from_secs(1);
    Arc::new(
        crate::store::redis::RedisStore::open_with(&server.url(0), false, None, lease)
            .await
            .expect("open redis"),
    )
}

/// A plain connection to `server`, for reading the keys behind the store's back.
async fn redis_con(server: &RedisServer) -> ::redis::aio::ConnectionManager {
    crate::store::redis::connect("test", &server.url(0))
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
