//! The dispatcher's own tests: backoff, retries, holds, slots and lanes.

use super::*;
use crate::model::Delivery;
use std::sync::Mutex;

fn records(n: u32) -> Vec<(u32, String)> {
    (1..=n)
        .map(|user| {
            let d = Delivery {
                campaign: "c".into(),
                occurrence: None,
                user,
                title: "t".into(),
                body: "b".into(),
                key: format!("c:{user}"),
                token: None,
            };
            (user, serde_json::to_string(&d).unwrap())
        })
        .collect()
}

fn messages(records: &[(u32, String)]) -> crate::providers::MessageBuf {
    records
        .iter()
        .map(|(user, json)| Message {
            user: *user,
            json: json.as_bytes(),
            token: None,
        })
        .collect()
}

#[test]
fn backoff_stays_under_its_ceiling() {
    for attempt in 1..40 {
        assert!(backoff(attempt) <= BACKOFF_CAP);
    }
    assert!(backoff(1) <= BACKOFF_BASE);
}

#[test]
fn retry_after_is_a_floor() {
    for attempt in 1..20 {
        assert!(retry_wait(attempt, Duration::from_secs(30)) >= Duration::from_secs(30));
        assert!(retry_wait(attempt, Duration::ZERO) <= BACKOFF_CAP);
    }
    // The backoff still applies when the provider asks for less.
    let waits: Vec<_> = (0..200)
        .map(|_| retry_wait(8, Duration::from_millis(1)))
        .collect();
    assert!(waits.iter().any(|w| *w > Duration::from_secs(1)));
}

/// A dispatcher over `mock:{mock}` with 1,000 slots, 100 tokens a second and 3 attempts,
/// dead-lettering to `dead`: messages beyond the first few hundred wait for rate tokens.
fn rate_limited(mock: &str, dead: &std::path::Path) -> Dispatcher {
    let provider: Provider = Box::new(super::super::mock::MockProvider::parse(mock).unwrap());
    let dead = dead.to_str().unwrap();
    Dispatcher::new(provider, 1000, 100, 3, dead, Arc::new(Metrics::new()))
}

/// A campaign paused while its messages wait for rate tokens (holding their slots) sends
/// none of them once their token comes: each is answered `Held`, settled by nobody here
/// (its caller settles it as it does one held before its attempt). A provider whose every
/// message is a request (`mock:latency=1ms`); a list write passes its gate once, for the
/// whole list, and goes or not as one.
#[tokio::test(start_paused = true)]
async fn a_hold_that_lands_while_messages_wait_for_rate_tokens_sends_no_more() {
    for mock in ["latency=1ms", "latency=1ms,jitter=1ms"] {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("dead.jsonl");
        let d = rate_limited(mock, &dead);
        let recs = records(400);
        let buf = messages(&recs);
        let msgs = buf.messages();
        let held = AtomicBool::new(false);
        let is_held = || held.load(Relaxed);
        let hold = Hold {
            held: &is_held,
            changes: None,
        };
        let start = tokio::time::Instant::now();
        let settled_at = Mutex::new(Vec::new());
        let pause = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            held.store(true, Relaxed);
        };
        let settle = |s: Settled| {
            let at = start.elapsed();
            let fates = s.fates().map(|(i, f)| (i, f, at));
            settled_at.lock().unwrap().extend(fates);
        };
        let send = d.deliver(Priority::Normal, msgs, &settle, &hold);
        let (sent, ()) = futures::future::join(send, pause).await;
        sent.unwrap();
        let settled = settled_at.into_inner().unwrap();
        // Nothing was attempted after the pause (the mock answers within 1 ms), and most
        // of the 400 never were: at 100 a second, 4 s of tokens.
        assert!(
            settled
                .iter()
                .all(|(_, f, at)| *f == Fate::Delivered && *at <= Duration::from_millis(502)),
            "{mock}: {:?}",
            settled
                .iter()
                .filter(|(_, _, at)| *at > Duration::from_millis(502))
                .take(3)
                .collect::<Vec<_>>()
        );
        assert!(settled.len() < 100, "{mock}: {} settled", settled.len());
        assert!(!dead.exists() || std::fs::read_to_string(&dead).unwrap().is_empty());
    }
}

/// A lease lost while messages wait for rate tokens (the process was stopped past its lease,
/// say, and another took over): none of them is sent once its token comes, and the delivery
/// fails, so that the run stops instead of settling them. A list write (`mock:latency=0ms`,
/// the whole list behind one gate) and a request per message (`mock:latency=1ms`).
#[tokio::test(start_paused = true)]
async fn a_lease_lost_while_messages_wait_for_rate_tokens_sends_no_more() {
    for mock in ["latency=0ms", "latency=1ms"] {
        let dir = tempfile::tempdir().unwrap();
        let lost = Arc::new(AtomicBool::new(false));
        let guard_lost = lost.clone();
        let d =
            rate_limited(mock, &dir.path().join("dead.jsonl")).with_guard(Arc::new(move || {
                match guard_lost.load(Relaxed) {
                    true => Err(Error::runtime("lease lost")),
                    false => Ok(()),
                }
            }));
        let recs = records(400);
        let buf = messages(&recs);
        let never = || false;
        let hold = Hold {
            held: &never,
            changes: None,
        };
        let start = tokio::time::Instant::now();
        let settled_at = Mutex::new(Vec::new());
        let take_over = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            lost.store(true, Relaxed);
        };
        let settle = |s: Settled| {
            let at = start.elapsed();
            settled_at
                .lock()
                .unwrap()
                .extend(s.fates().map(|(i, _)| (i, at)));
        };
        // Deliveries of 400 in a row: the limiter lets a list's first writes go at once (a
        // lane may borrow an idle lane's clock) and makes the next wait for its tokens (4 s
        // at 100 a second).
        let send = async {
            for _ in 0..8 {
                d.deliver(Priority::Normal, buf.messages(), &settle, &hold)
                    .await?;
            }
            Ok::<(), Error>(())
        };
        let (sent, ()) = futures::future::join(send, take_over).await;
        let err = sent.expect_err("a delivery past a lost lease fails");
        assert!(err.to_string().contains("lease lost"), "{mock}: {err}");
        let settled = settled_at.into_inner().unwrap();
        // None settled after the takeover (the mock answers within 1 ms).
        assert!(
            settled
                .iter()
                .all(|(_, at)| *at <= Duration::from_millis(502)),
            "{mock}: {} settled, the last at {:?}",
            settled.len(),
            settled.iter().map(|(_, at)| *at).max()
        );
        assert!(settled.len() < 8 * 400, "{mock}: {} settled", settled.len());
    }
}

#[tokio::test(start_paused = true)]
async fn retries_until_delivered_or_dead() {
    let dir = tempfile::tempdir().unwrap();
    let dead_path = dir.path().join("dead.jsonl");
    let provider: Provider =
        Box::new(super::super::mock::MockProvider::parse("fail=0.3,permanent=0.05").unwrap());
    let d = Dispatcher::new(
        provider,
        7,
        0,
        3,
        dead_path.to_str().unwrap(),
        Arc::new(Metrics::new()),
    );
    let recs = records(2000);
    let buf = messages(&recs);
    let msgs = buf.messages();
    let fates = Mutex::new(Vec::new());
    d.deliver(
        Priority::Normal,
        msgs,
        &|s: Settled| fates.lock().unwrap().extend(s.fates()),
        &Hold::never(),
    )
    .await
    .unwrap();
    let mut fates = fates.into_inner().unwrap();
    fates.sort_unstable_by_key(|(i, _)| *i);
    assert!(
        fates.iter().map(|(i, _)| *i).eq(0..msgs.len()),
        "every message settled exactly once"
    );
    let dead_at: Vec<usize> = fates
        .iter()
        .filter(|(_, f)| *f == Fate::Dead)
        .map(|(i, _)| *i)
        .collect();
    let dead = dead_at.len();
    assert!(fates.iter().all(|(_, f)| *f != Fate::Unreachable));
    // Dead: permanent on some attempt, or retryable three times in a row.
    assert!(dead > 50 && dead < 300, "{dead}");
    let lines = std::fs::read_to_string(&dead_path).unwrap();
    assert_eq!(lines.lines().count(), dead);
    let mut lettered: Vec<u64> = Vec::new();
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        lettered.push(v["user"].as_u64().unwrap());
        assert!(v["error"].is_string() && v["attempts"].as_u64().unwrap() <= 3);
        assert!(v["key"].as_str().unwrap().starts_with("c:"));
    }
    lettered.sort_unstable();
    let reported: Vec<u64> = dead_at
        .iter()
        .map(|&i| u64::from(msgs.get(i).user))
        .collect();
    assert_eq!(lettered, reported);
}

/// A message delivered on its first attempt is handed over at once, not when a
/// batch-mate's retries end; and its slot is held until the handover is dropped.
#[tokio::test(start_paused = true)]
async fn each_message_settles_when_it_is_answered_and_holds_its_slot_until_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let provider: Provider =
        Box::new(super::super::mock::MockProvider::parse("fail=0.3,latency=10ms").unwrap());
    let d = Dispatcher::new(
        provider,
        1000,
        0,
        5,
        dir.path().join("dead.jsonl").to_str().unwrap(),
        Arc::new(Metrics::new()),
    );
    let recs = records(500);
    let buf = messages(&recs);
    let msgs = buf.messages();
    let started = tokio::time::Instant::now();
    let seen = Mutex::new(Vec::new());
    let held = Mutex::new(Vec::new());
    d.deliver(
        Priority::Normal,
        msgs,
        &|s: Settled| {
            let at = started.elapsed();
            let mut seen = seen.lock().unwrap();
            seen.extend(s.fates().map(|(i, f)| (i, f, at)));
            held.lock().unwrap().push(s);
        },
        &Hold::never(),
    )
    .await
    .unwrap();
    let seen = seen.into_inner().unwrap();
    let first = seen
        .iter()
        .filter(|(_, _, at)| *at <= Duration::from_millis(10))
        .count();
    let later = seen.len() - first;
    // About 70% answer on the first attempt, at 10 ms; the rest retry after a backoff.
    assert!(first > 250 && later > 50, "{first} then {later}");
    assert_eq!(seen.len(), msgs.len(), "every message settled");
    // Every settled message still holds its slot until its handover is dropped.
    assert_eq!(d.in_flight(), seen.len());
    drop(held);
    assert_eq!(d.in_flight(), 0);
}

/// SPEC: transactional is never queued behind bulk. Bulk saturates the slots with a
/// backlog of 2,000 messages (5 s of work); a transactional batch within the reserve is
/// answered in one push, and one ten times larger still within two: it takes the first
/// slots bulk gives back. A normal run alone gets every slot.
/// How long `batch` takes until its last message is answered.
async fn answered(d: &Dispatcher, lane: Priority, batch: Messages<'_>) -> Duration {
    let t0 = tokio::time::Instant::now();
    let last = Mutex::new(Duration::ZERO);
    d.deliver(
        lane,
        batch,
        &|_: Settled| *last.lock().unwrap() = t0.elapsed(),
        &Hold::never(),
    )
    .await
    .unwrap();
    last.into_inner().unwrap()
}

#[tokio::test(start_paused = true)]
async fn transactional_is_answered_while_bulk_saturates_and_one_lane_gets_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let latency = Duration::from_millis(50);
    let dispatcher = || {
        let provider: Provider =
            Box::new(super::super::mock::MockProvider::parse("latency=50ms").unwrap());
        Dispatcher::new(
            provider,
            20,
            0,
            1,
            dir.path().join("dead.jsonl").to_str().unwrap(),
            Arc::new(Metrics::new()),
        )
    };
    let d = dispatcher();
    let bulk = records(2000);
    let bulk = messages(&bulk);
    let bulk = bulk.messages();
    let tx = records(20);
    let tx = messages(&tx);
    let tx = tx.messages();
    let reserve = super::super::lanes::reserve_of(20);
    let (bulk_took, small, large) = tokio::join!(
        answered(&d, Priority::Bulk, bulk),
        async {
            tokio::time::sleep(Duration::from_millis(1010)).await;
            answered(&d, Priority::Transactional, tx.slice(0..reserve)).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(2010)).await;
            answered(&d, Priority::Transactional, tx).await
        },
    );
    assert!(bulk_took >= Duration::from_secs(5), "{bulk_took:?}");
    assert!(small <= latency + Duration::from_millis(1), "{small:?}");
    assert!(large <= 2 * latency + Duration::from_millis(1), "{large:?}");

    let d = dispatcher();
    let normal = answered(&d, Priority::Normal, bulk).await;
    // 100 rounds of 20 slots × 50 ms.
    assert!(normal <= Duration::from_millis(5010), "{normal:?}");
}

/// A record that fails (a full disk) halts the dispatcher before its messages give their
/// slots back: no attempt starts after it, so no more than the slots' worth is sent and
/// unrecorded. Without the halt, the 20 waiting messages would take the freed slots.
#[tokio::test(start_paused = true)]
async fn a_failed_record_halts_before_its_slots_are_freed() {
    let dir = tempfile::tempdir().unwrap();
    let provider: Provider =
        Box::new(super::super::mock::MockProvider::parse("latency=10ms").unwrap());
    let dead = dir.path().join("dead.jsonl");
    let d = Dispatcher::new(
        provider,
        10,
        0,
        3,
        dead.to_str().unwrap(),
        Arc::new(Metrics::new()),
    );
    let recs = records(30);
    let buf = messages(&recs);
    let sent = AtomicU32::new(0);
    let failure = Error::runtime("cannot append to the log: No space left on device");
    let outcome = d
        .deliver(
            Priority::Normal,
            buf.messages(),
            &|s: Settled| {
                sent.fetch_add(s.fates().count() as u32, Relaxed);
                // As `record` does on a failed write: halt, then let the slots go.
                d.halt_unrecorded(&failure);
                drop(s);
            },
            &Hold::never(),
        )
        .await;
    let err = outcome.expect_err("a halted dispatcher fails the delivery");
    assert!(err.to_string().contains("No space left"), "{err}");
    let sent = sent.into_inner();
    assert!(
        sent <= 10,
        "{sent} sent after the first failed record, slots 10"
    );
    assert_eq!(d.in_flight(), 0);
}
